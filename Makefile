# The two commands a newcomer types: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo demo-hard test venv bench mutation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo needs no test extras (no torch): a fresh machine gets there faster.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(DEMO_STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# Grounded vs ungrounded on the shapes world -> runs/demo/report.md (re-running reuses
# finished trainings; `make clean` starts over).
demo: $(DEMO_STAMP)
	$(BIN)/python -m jaxground.demo --out runs/demo

# The same question on the hard world (random colours, up to 4 objects) with LLaVA's recipe:
# vision tower pretrained, projector aligned, then the fine-tunes -> runs/demo_hard/report.md,
# beside the default world's results when `make demo` ran first.
demo-hard: $(DEMO_STAMP)
	$(BIN)/python -m jaxground.demo --world hard --out runs/demo_hard \
		$$(test -f runs/demo/results.json && echo --compare runs/demo)

bench: $(STAMP)
	$(BIN)/python bench/cpu_vs_hf.py

# Mutation testing ([tool.mutmut] in pyproject.toml names the files and tests). Hours on 2
# cores for all four files: `$(BIN)/mutmut run "jaxground.training.optim*"` runs one file.
mutation: $(STAMP)
	$(BIN)/pip install --quiet 'mutmut>=3.8,<4'
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) runs mutants
