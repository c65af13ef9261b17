"""`python -m jaxground.demo --quick`: the whole demo end to end on a small world."""

import json
import os
import subprocess
import sys

REPO = __file__.rsplit("/tests/", 1)[0]
FIELDS = ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1",
          "pope_adversarial_f1", "token_auroc")


def test_quick_demo_writes_every_report_file(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "jaxground.demo", "--out", str(out),
                           "--quick"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in ("report.md", "report.html", "results.json", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"grounded", "guided", "ungrounded", "vcd"}
    for model, values in results.items():
        missing = [f for f in FIELDS if values.get(f) is None]
        assert not missing, f"{model} lacks {missing}"
        assert 0 <= values["chair_i"] <= 1
    # Training time only for the two trained models; the decoding variants reuse them.
    assert results["grounded"]["train_seconds"] > 0 and results["ungrounded"]["train_seconds"] > 0
    assert "train_seconds" not in results["vcd"] and "train_seconds" not in results["guided"]
    report = (out / "report.md").read_text()
    assert "ungrounded (λ = 0)" in report and "grounded (λ = 1)" in report
    assert "ungrounded + VCD" in report
    assert "CHAIR_i" in report and "curves.png" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "curves.png" in html
    # The terminal ends with the table and the report's path.
    assert "POPE adversarial F1" in proc.stdout and str(out / "report.md") in proc.stdout
    # Heatmap pages the report links to exist.
    pages = [line.split("(")[-1].rstrip(")") for line in report.splitlines()
             if line.startswith("- [") and "heatmaps/" in line and "index.html" in line]
    assert pages and all((out / p).exists() for p in pages)
