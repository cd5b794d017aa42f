"""Run every benchmark script in benchmarks/ that exists (quick mode where offered), then summarize.

    python benchmarks/run_all.py [--full] [--only bench_model bench_onnx]

A script offers quick mode when its ``--help`` mentions ``--quick``. Each script writes its own JSON
into benchmarks/results/; this runner records which scripts ran and their exit codes in
benchmarks/results/_run_log.json and then runs benchmarks/summarize.py. It exits non-zero when a
script failed (after summarizing what there is)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from summarize import DEFAULT_RESULTS, KNOWN, RUN_LOG  # noqa: E402
from summarize import main as summarize_main  # noqa: E402


def offers_quick(script: Path) -> bool:
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    ).stdout
    return "--quick" in help_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="do not pass --quick")
    parser.add_argument("--only", nargs="*", default=None, help="script names (without .py) to run")
    args = parser.parse_args(argv)
    DEFAULT_RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log: list[dict[str, object]] = []
    failed = False
    others = sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in KNOWN)
    for name in args.only or [*KNOWN, *others]:
        script = HERE / f"{name}.py"
        if not script.is_file():
            print(f"[bench] {name}.py: not present, skipped", flush=True)
            continue
        extra = [] if args.full or not offers_quick(script) else ["--quick"]
        print(f"[bench] running {script.relative_to(ROOT)} {' '.join(extra)}", flush=True)
        started = time.time()
        proc = subprocess.run([sys.executable, str(script), *extra], cwd=ROOT, env=env)
        log.append(
            {"script": f"{name}.py", "args": extra, "returncode": proc.returncode, "started_unix": started}
        )
        failed |= proc.returncode != 0
        print(f"[bench] {name}.py exited {proc.returncode}", flush=True)
    (DEFAULT_RESULTS / RUN_LOG).write_text(json.dumps({"scripts": log}, indent=2) + "\n")
    summarize_main([])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
