"""`make bench`: the runner is wired, and the summarizer copies numbers and nothing else."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.cli_helpers import ROOT


def test_summarize_copies_numbers_and_reports_missing_and_broken(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import summarize
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = tmp_path / "results"
    results.mkdir()
    (results / "model_cpu.json").write_text(
        json.dumps(
            {"device": "cpu", "rows": [{"batch": 8, "ms_p50": 12.3456789}, {"batch": 16, "ms_p50": 20.5}]}
        )
    )
    (results / "onnx_cpu.json").write_text("{not json")
    assert summarize.main(["--results", str(results)]) == 0
    text = (results / "SUMMARY.md").read_text()
    assert "| 8 | 12.35 |" in text and "| 16 | 20.5 |" in text and "| device | cpu |" in text
    assert "onnx_cpu" in text and "unreadable" in text
    missing = text.split("## Missing", 1)[1]
    assert "bench_registry" in missing and "bench_serving" in missing and "bench_model" not in missing
    # Nothing but what the files hold: every number in the tables comes from the input.
    numbers = set(
        re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", text.split("## model_cpu", 1)[1].split("\n## ", 1)[0])
    )
    assert numbers <= {"8", "16", "12.35", "20.5"}, numbers
    empty = tmp_path / "none"
    assert summarize.main(["--results", str(empty)]) == 0
    assert "No result files found" in (empty / "SUMMARY.md").read_text()


def test_make_bench_runs_the_runner() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/run_all.py" in recipe and (ROOT / "benchmarks" / "run_all.py").is_file()
