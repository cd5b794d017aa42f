"""Build the .mar and run TorchServe: used by `e2vpt serve ...`, the tests, the benchmark and the demo.

    mar = build_mar("model_store/build", checkpoint="runs/backbone.safetensors")
    with TorchServe(mar, workdir="runs/ts", workers=2, env={"E2VPT_REDIS_URL": url}) as ts:
        httpx.post(ts.predictions_url, content=jpeg, headers={**ts.auth(), "X-Task-Id": "pets"})

Each instance is isolated: its own working directory (logs, key_file.json, config snapshots), TMPDIR
(pid file, worker sockets), initial_worker_port and free TCP ports, so several run on one host.
TorchServe runs in the foreground in its own process group; `stop()` ends that group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template
from typing import Any

import httpx

from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import load_backbone, read_checkpoint_spec, save_checkpoint
from e2vpt.dev.localredis import free_ports
from e2vpt.torchserve.adapter import BACKBONE_FILE, ENGINE_CONFIG

log = logging.getLogger(__name__)

# Package data: both travel with an installed wheel, so `e2vpt serve build-mar` works outside a checkout.
HERE = Path(__file__).resolve().parent
HANDLER = HERE / "e2vpt_handler.py"
CONFIG_TEMPLATE = HERE / "config.properties.template"


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (pip install torchserve torch-model-archiver)")
    return found


def build_mar(
    export_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    settings: Settings | None = None,
    model_name: str | None = None,
    engine_config: dict[str, Any] | None = None,
    version: str = "1.0",
) -> Path:
    """Package backbone weights + handler + engine config into `<export_dir>/<model_name>.mar`.

    `checkpoint`: a safetensors file written by `save_checkpoint` (spec included); without one the backbone
    named in the settings is built (timm init, or pretrained when E2VPT_BACKBONE_PRETRAINED) and saved.
    `engine_config`: Settings fields baked into the archive (engine.json); E2VPT_* variables override them.
    """
    settings = settings or get_settings()
    model_name = model_name or settings.ts_model_name
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="e2vpt-mar-") as tmp:
        staging = Path(tmp)
        ckpt = checkpoint or settings.backbone_checkpoint
        if ckpt is not None:
            if read_checkpoint_spec(ckpt) is None:
                raise ValueError(f"{ckpt} is not a checkpoint written by e2vpt.core.backbone.save_checkpoint")
            shutil.copyfile(ckpt, staging / BACKBONE_FILE)
        else:
            bb = load_backbone(settings.backbone, pretrained=settings.backbone_pretrained)
            save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, staging / BACKBONE_FILE)
        config = dict(engine_config or {})
        unknown = set(config) - set(Settings.model_fields)
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)}")
        (staging / ENGINE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        cmd = [
            _bin("torch-model-archiver"),
            "--model-name", model_name,
            "--version", version,
            "--serialized-file", str(staging / BACKBONE_FILE),
            "--handler", str(HANDLER),
            "--extra-files", str(staging / ENGINE_CONFIG),
            "--export-path", str(export_dir),
            "--force",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    mar = export_dir / f"{model_name}.mar"
    log.info("built %s", mar)
    return mar


class TorchServeError(RuntimeError):
    pass


class TorchServe:
    """One private TorchServe instance serving one .mar. Ports given as 0 (default) are picked free."""

    def __init__(
        self,
        mar: str | Path,
        workdir: str | Path,
        *,
        settings: Settings | None = None,
        workers: int | None = None,
        batch_size: int | None = None,
        max_batch_delay_ms: int | None = None,
        inference_port: int = 0,
        management_port: int = 0,
        metrics_port: int = 0,
        worker_metrics_port: int = 0,
        bind: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        s = settings or get_settings()
        self.settings = s
        self.mar = Path(mar).resolve()
        self.model_name = self.mar.stem
        self.workdir = Path(workdir).resolve()
        ts_workers, ts_batch_size, ts_delay_ms = s.ts_batching  # GPU values on a CUDA device
        self.workers = workers if workers is not None else ts_workers
        self.batch_size = batch_size if batch_size is not None else ts_batch_size
        self.max_batch_delay_ms = max_batch_delay_ms if max_batch_delay_ms is not None else ts_delay_ms
        self.bind = bind or s.ts_bind
        # every port this instance needs, reserved in one go (distinct by construction); explicit ones kept
        given = (inference_port, management_port, metrics_port, worker_metrics_port)
        free = iter(free_ports(sum(1 for p in given if not p) + 3))
        self.inference_port, self.management_port, self.metrics_port, self.worker_metrics_port = (
            p or next(free) for p in given
        )
        self.initial_worker_port, self.grpc_inference_port, self.grpc_management_port = (
            next(free),
            next(free),
            next(free),
        )
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._keys: dict[str, str] = {}

    # ------------------------------------------------------------------ urls and auth
    def _url(self, port: int) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        return f"http://{host}:{port}"

    @property
    def inference_url(self) -> str:
        return self._url(self.inference_port)

    @property
    def management_url(self) -> str:
        return self._url(self.management_port)

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}"

    @property
    def metrics_url(self) -> str:
        """TorchServe's own metrics (queue time, inference latency, ...), Prometheus format, no token."""
        return f"{self._url(self.metrics_port)}/metrics"

    @property
    def worker_metrics_url(self) -> str:
        """The engine's per-task metrics (all workers summed), Prometheus format."""
        return f"{self._url(self.worker_metrics_port)}/metrics"

    def keys(self) -> dict[str, str]:
        """The tokens TorchServe wrote to key_file.json: {"inference", "management", "api"}."""
        if not self._keys:
            path = self.workdir / "key_file.json"
            data = json.loads(path.read_text())
            self._keys = {k.lower(): v["key"] for k, v in data.items() if isinstance(v, dict) and "key" in v}
        return self._keys

    def auth(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    # ------------------------------------------------------------------ lifecycle
    def config_text(self) -> str:
        s = self.settings
        models = {
            self.model_name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": self.mar.name,
                    "minWorkers": self.workers,
                    "maxWorkers": self.workers,
                    "batchSize": self.batch_size,
                    "maxBatchDelay": self.max_batch_delay_ms,
                    "responseTimeout": s.ts_response_timeout_s,
                    "startupTimeout": s.ts_startup_timeout_s,
                }
            }
        }
        return Template(CONFIG_TEMPLATE.read_text()).substitute(
            bind=self.bind,
            inference_port=self.inference_port,
            management_port=self.management_port,
            metrics_port=self.metrics_port,
            model_store=self.mar.parent,
            mar_name=self.mar.name,
            workers=self.workers,
            models_json=json.dumps(models, separators=(",", ":")),
            response_timeout_s=s.ts_response_timeout_s,
            token_expiration_min=s.ts_token_expiration_min,
            initial_worker_port=self.initial_worker_port,
            grpc_inference_port=self.grpc_inference_port,
            grpc_management_port=self.grpc_management_port,
            max_request_size=s.ts_max_request_size,
            max_response_size=s.ts_max_request_size,
            job_queue_size=s.ts_job_queue_size,
            java_heap_mb=s.ts_java_heap_mb,
        )

    def start(self, timeout: float | None = None) -> TorchServe:
        """Start and wait until every worker is READY (raises TorchServeError with the log tail if not)."""
        if not self.mar.is_file():
            raise FileNotFoundError(
                f"{self.mar} does not exist (build it: python -m e2vpt.cli serve build-mar)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        prom = self.workdir / "prometheus"
        for d in (tmp, prom):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        self._keys = {}
        config = self.workdir / "config.properties"
        config.write_text(self.config_text())
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            "PROMETHEUS_MULTIPROC_DIR": str(prom),
            "E2VPT_METRICS_PORT": str(self.worker_metrics_port),
            # An explicit E2VPT_METRICS_BIND wins (in a container Prometheus scrapes from outside it);
            # otherwise the worker metrics follow TorchServe's bind address, loopback for 0.0.0.0.
            "E2VPT_METRICS_BIND": self.settings.metrics_bind
            if "metrics_bind" in self.settings.model_fields_set
            else (self.bind if self.bind not in ("", "0.0.0.0") else "127.0.0.1"),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **self.env,
        }
        cmd = [
            _bin("torchserve"), "--start", "--foreground", "--ncs",
            "--model-store", str(self.mar.parent), "--ts-config", str(config),
        ]  # fmt: skip
        out = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        (self.workdir / "state.json").write_text(json.dumps(self.state()))
        try:
            self.wait_ready(timeout if timeout is not None else self.settings.ts_startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict[str, Any]:
        return {
            "pid": self.proc.pid if self.proc else None,
            "model": self.model_name,
            "predictions_url": self.predictions_url,
            "management_url": self.management_url,
            "metrics_url": self.metrics_url,
            "worker_metrics_url": self.worker_metrics_url,
            "workdir": str(self.workdir),
        }

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("torchserve.out", "logs/model_log.log", "logs/ts_log.log"):
            p = self.workdir / name
            if p.is_file():
                parts.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise TorchServeError(f"TorchServe exited during start-up\n{self.log_tail()}")
            try:
                if (self.workdir / "key_file.json").is_file():
                    ready = self.ready_workers()
                    if ready >= self.workers:
                        r = httpx.get(f"{self.inference_url}/ping", headers=self.auth(), timeout=5)
                        if r.status_code == 200:
                            return
                        last = f"ping {r.status_code}"
                    else:
                        last = f"{ready}/{self.workers} workers ready"
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise TorchServeError(f"TorchServe not ready after {timeout:.0f}s ({last})\n{self.log_tail()}")

    def describe_model(self) -> list[dict[str, Any]]:
        r = httpx.get(
            f"{self.management_url}/models/{self.model_name}", headers=self.auth("management"), timeout=5
        )
        r.raise_for_status()
        return r.json()

    def ready_workers(self) -> int:
        try:
            desc = self.describe_model()
        except httpx.HTTPStatusError:
            return 0
        return sum(1 for m in desc for w in m.get("workers", []) if w.get("status") == "READY")

    def stop(self, timeout: float = 20.0) -> bool:
        """End TorchServe's process group; returns as soon as every process of it has exited (True when
        it had to be killed after `timeout`)."""
        if self.proc is None:
            return False
        killed = stop_group(self.proc.pid, timeout, leader=self.proc)
        self.proc.wait(timeout=5)
        self.proc = None
        return killed

    def __enter__(self) -> TorchServe:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(pid: int, timeout: float = 20.0, leader: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM the process group led by `pid` (TorchServe, its JVM and workers), SIGKILL what remains.

    Returns as soon as the group is empty: False, or True when it had to SIGKILL after `timeout`.
    `leader`: the group leader when it is our child; it is reaped while waiting (an exited but unreaped
    child still counts as a member of its group, which made every stop wait the full timeout)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()  # reap the launcher once it exits
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


# ---------------------------------------------------------------------- CLI: e2vpt serve ...
def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _cmd_build(args: argparse.Namespace) -> int:
    settings = get_settings()
    mar = build_mar(
        args.export_dir or settings.ts_mar_dir,
        checkpoint=args.checkpoint,
        model_name=args.model_name,
        engine_config=_parse_sets(args.set),
    )
    print(mar)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    settings = get_settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling is not news
    mar = Path(args.mar or Path(settings.ts_mar_dir) / f"{settings.ts_model_name}.mar")
    ts = TorchServe(
        mar,
        args.workdir or settings.ts_workdir,
        workers=args.workers,
        inference_port=settings.ts_inference_port,
        management_port=settings.ts_management_port,
        metrics_port=settings.ts_metrics_port,
        worker_metrics_port=settings.metrics_port or 0,
    ).start()
    state = {**ts.state(), "inference_token": ts.keys().get("inference")}
    print(json.dumps(state, indent=2))
    ts.proc = None  # leave it running; `serve stop` ends it
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or get_settings().ts_workdir)
    state_file = workdir / "state.json"
    if not state_file.is_file():
        print(f"no TorchServe state in {workdir}", file=sys.stderr)
        return 1
    pid = json.loads(state_file.read_text()).get("pid")
    if pid:
        stop_group(int(pid))
    state_file.unlink()
    print(f"stopped TorchServe (pid {pid})")
    return 0


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="build the .mar and run TorchServe")
    sub = serve.add_subparsers(dest="serve_command", metavar="SERVE_COMMAND")
    b = sub.add_parser("build-mar", help="package backbone + handler + engine config as a .mar")
    b.add_argument("--checkpoint", help="backbone safetensors written by save_checkpoint (default: settings)")
    b.add_argument("--export-dir", help="where the .mar goes (default: model_store/build)")
    b.add_argument("--model-name")
    b.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="engine setting baked in"
    )
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("start", help="start TorchServe in the background and wait until it is ready")
    s.add_argument("--mar")
    s.add_argument("--workdir")
    s.add_argument("--workers", type=int)
    s.set_defaults(func=_cmd_start)
    t = sub.add_parser("stop", help="stop the TorchServe started by `serve start`")
    t.add_argument("--workdir")
    t.set_defaults(func=_cmd_stop)
