# The two commands a newcomer types: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# For now: train the shapes model and show its held-out metrics. The full demo (grounded vs
# ungrounded, POPE/CHAIR, report with plots) lands with the demo issue.
demo: $(STAMP)
	$(BIN)/python -m jaxground.train --config configs/shapes.py --workdir runs/demo/grounded
	@echo "held-out metrics (runs/demo/grounded/metrics.jsonl):"
	@grep '"split": "eval"' runs/demo/grounded/metrics.jsonl

bench: $(STAMP)
	$(BIN)/python bench/cpu_vs_hf.py

clean:
	rm -rf $(VENV) runs
