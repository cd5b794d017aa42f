"""`make bench`: the runner is wired, and the summarizer copies numbers and nothing else."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.cli_helpers import ROOT


def benchmark_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (they are not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_summarize_copies_numbers_and_reports_missing_and_broken(tmp_path: Path) -> None:
    summarize = benchmark_module("summarize")
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


def test_worker_message_is_what_torchserve_reads() -> None:
    """bench_gpu's `worker` section feeds a worker the frame format of TorchServe's front end: TorchServe's
    own reader gets every request back (id, headers, body), and the worker answers each one."""
    pytest.importorskip("ts")
    from ts.protocol.otf_message_handler import retrieve_msg

    bench_gpu = benchmark_module("bench_gpu")
    bodies, tasks = [b"\xff\xd8 one", b"two" * 1000], ["task-a", "task-b"]
    cmd, batch = retrieve_msg(bench_gpu._MessageReader(bench_gpu.otf_predict_message(bodies, tasks, "tok")))
    assert cmd == b"I" and len(batch) == 2
    for req, body, task in zip(batch, bodies, tasks, strict=True):
        headers = {h["name"].decode(): h["value"].decode() for h in req["headers"]}
        assert headers["X-Task-Id"] == task and headers["Authorization"] == "Bearer tok"
        assert req["parameters"] == [{"name": "body", "contentType": "image/jpeg", "value": body}]
    prof = bench_gpu.profile("cpu", True, (1, 8, 5), (1, 8, 5))
    prof.engine_seconds = 0.05
    rows = bench_gpu.section_worker(["task-a", "task-b"], bodies, prof, batches=(1, 4))
    assert [r["B"] for r in rows] == [1, 4] and all(r["requests_per_s"] > 0 for r in rows)


def test_stages_section_accounts_for_every_stage(backbone, store) -> None:  # noqa: ANN001
    """bench_gpu's `stages` section: one row per engine stage, each with the time the profiler saw, and
    the stages (disjoint ranges of the calling thread) never add up to more than the whole call."""
    bench_gpu = benchmark_module("bench_gpu")
    from e2vpt.config import Settings
    from e2vpt.dev.images import image_bytes
    from e2vpt.serving.engine import STAGES
    from tests.helpers import make_set

    tasks = ["a", "b"]
    for i, t in enumerate(tasks):
        store.register(make_set(t, backbone, 3, i))
    jpegs = [image_bytes(i, (64, 48), "JPEG") for i in range(3)]
    rows = bench_gpu.section_stages(backbone, store, tasks, jpegs, Settings(), B=4, calls=2)
    assert [r["stage"] for r in rows] == [*STAGES, "predict (whole call)"]
    assert all(r["host_ms"] > 0 for r in rows)
    whole = rows[-1]
    assert sum(r["host_ms"] for r in rows[:-1]) <= whole["host_ms"] and whole["outside_stages_ms"] >= 0
