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
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import httpx

from e2vpt.config import Settings, env_names, get_settings
from e2vpt.dev.localredis import free_ports
from e2vpt.registry.cli import EXIT_NOINPUT, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, backbone_problem
from e2vpt.torchserve import BACKBONE_FILE, ENGINE_CONFIG

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


@dataclass(frozen=True)
class BuiltArchive:
    path: Path  # the .mar
    fingerprint: str  # the packed backbone's (`name@sha256:...`): prompt sets registered for it are served
    source: str  # where the backbone came from: a checkpoint path, or "<timm name> (random init)" etc.


def build_archive(
    export_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    backbone: str | None = None,
    settings: Settings | None = None,
    model_name: str | None = None,
    engine_config: dict[str, Any] | None = None,
    version: str = "1.0",
) -> BuiltArchive:
    """Package backbone weights + handler + engine config into `<export_dir>/<model_name>.mar`.

    `checkpoint`: a safetensors file written by `save_checkpoint` (spec included); else `backbone` (a timm
    name), else the settings' `backbone_checkpoint`, else their `backbone` (timm init, or pretrained when
    E2VPT_BACKBONE_PRETRAINED), built and saved. The packed backbone is the one the workers serve.
    `engine_config`: Settings fields baked into the archive (engine.json); E2VPT_* variables override them.
    """
    from e2vpt.core.backbone import load_backbone, read_checkpoint_spec, save_checkpoint  # torch

    settings = settings or get_settings()
    model_name = model_name or settings.ts_model_name
    config = dict(engine_config or {})
    unknown = set(config) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"unknown engine settings {sorted(unknown)}")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="e2vpt-mar-") as tmp:
        staging = Path(tmp)
        ckpt = checkpoint if checkpoint is not None or backbone else settings.backbone_checkpoint
        if ckpt is not None:
            if not Path(ckpt).is_file():
                raise FileNotFoundError(f"backbone checkpoint {ckpt} does not exist")
            if read_checkpoint_spec(ckpt) is None:
                raise ValueError(f"{ckpt} is not a checkpoint written by e2vpt.core.backbone.save_checkpoint")
            shutil.copyfile(ckpt, staging / BACKBONE_FILE)
            fingerprint, source = load_backbone(checkpoint=ckpt).info.fingerprint, str(ckpt)
        else:
            name = backbone or settings.backbone
            bb = load_backbone(name, pretrained=settings.backbone_pretrained)
            save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, staging / BACKBONE_FILE)
            init = "pretrained" if settings.backbone_pretrained else "random init"
            fingerprint, source = bb.info.fingerprint, f"{name} ({init})"
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
    log.debug("built %s (backbone %s from %s)", mar, fingerprint, source)
    return BuiltArchive(mar, fingerprint, source)


def build_mar(export_dir: str | Path, **kwargs: Any) -> Path:
    """`build_archive`, returning only the .mar's path."""
    return build_archive(export_dir, **kwargs).path


def packed_backbone_differs(mar: str | Path, checkpoint: str | Path) -> bool:
    """Whether the backbone packed in `mar` is another file than `checkpoint` (size and CRC-32 compared:
    the archive's zip index holds both, so only the checkpoint is read)."""
    with zipfile.ZipFile(mar) as zf:
        packed = zf.getinfo(BACKBONE_FILE)
    path = Path(checkpoint)
    if path.stat().st_size != packed.file_size:
        return True
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc != packed.CRC


class TorchServeError(RuntimeError):
    """TorchServe could not start. `str()` is the cause in a line or two; `details` the relevant log lines."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details


# Path settings a worker reads: relative ones are made absolute where the user gave them (the workers run
# in TorchServe's working directory, not the user's).
WORKER_PATH_SETTINGS = frozenset(
    {"backbone_checkpoint", "registry_token_file", "onnx_path", "onnx_cache_dir", "pretrained_dir"}
)
# A worker's death, as TorchServe logs it, and a Python exception line in the worker's log.
WORKER_DIED = re.compile(r"Backend worker process died|Load model failed|Worker died|Backend worker error")
MODEL_LOG_LINE = re.compile(r"MODEL_LOG - (.*)$")
EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Unavailable|Backbone|NotFound)(:.*)?$"
)
FRONTEND_ERROR = re.compile(r"(Address already in use|BindException|Exception|Error)[^\n]*")


def absolute_path_env(env: dict[str, str], cwd: str | Path | None = None) -> dict[str, str]:
    """`env` with every relative path setting (WORKER_PATH_SETTINGS) made absolute against `cwd`."""
    base = Path(cwd or os.getcwd())
    out = dict(env)
    for name, field in env_names().items():
        value = out.get(name)
        if field in WORKER_PATH_SETTINGS and value:
            path = Path(value).expanduser()
            out[name] = str(path if path.is_absolute() else (base / path).resolve())
    return out


def port_in_use(host: str, port: int) -> bool:
    """Whether `port` cannot be bound on `host` (another process listens on it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


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
        ports = {
            "inference (E2VPT_TS_INFERENCE_PORT)": self.inference_port,
            "management (E2VPT_TS_MANAGEMENT_PORT)": self.management_port,
            "metrics (E2VPT_TS_METRICS_PORT)": self.metrics_port,
            "engine metrics (E2VPT_METRICS_PORT)": self.worker_metrics_port,
        }
        for what, port in ports.items():
            if port_in_use(self.bind, port):
                raise TorchServeError(
                    f"port {port} for TorchServe's {what} is in use: another TorchServe "
                    "(python -m e2vpt.cli serve stop) or another server; set that variable to a free port"
                )
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        prom = self.workdir / "prometheus"
        for d in (tmp, prom):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        shutil.rmtree(self.workdir / "logs", ignore_errors=True)  # start-up failures are read from these
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        self._keys = {}
        config = self.workdir / "config.properties"
        config.write_text(self.config_text())
        env = {
            **absolute_path_env(dict(os.environ)),
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
            **absolute_path_env(self.env),
            # the workers check their answers against the max_response_size written into config.properties
            "E2VPT_TS_MAX_REQUEST_SIZE": str(self.settings.ts_max_request_size),
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
            (self.workdir / "state.json").unlink(missing_ok=True)
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

    def _read(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.is_file() else ""

    def worker_failure(self) -> TorchServeError | None:
        """The first worker's death during start-up, with the worker's own exception, if one died."""
        ts_log = self._read("logs/ts_log.log") + self._read("torchserve.out")
        if not WORKER_DIED.search(ts_log):
            return None
        worker_lines = [
            m.group(1) for m in map(MODEL_LOG_LINE.search, self._read("logs/model_log.log").splitlines()) if m
        ]
        causes = [line for line in worker_lines if EXCEPTION_LINE.match(line.strip())]
        cause = causes[-1].strip() if causes else "no exception in the worker log"
        tail = worker_lines[-30:]
        return TorchServeError(
            f"TorchServe's worker died while loading the model: {cause}",
            f"last lines of {self.workdir / 'logs' / 'model_log.log'}:\n" + "\n".join(tail),
        )

    def frontend_failure(self) -> TorchServeError:
        """TorchServe itself exited during start-up: its own error line."""
        out = self._read("torchserve.out") + self._read("logs/ts_log.log")
        errors = [m.group(0) for m in FRONTEND_ERROR.finditer(out)]
        cause = errors[-1].strip() if errors else f"exit code {self.proc.returncode if self.proc else '?'}"
        return TorchServeError(f"TorchServe exited during start-up: {cause}", self.log_tail(30))

    def wait_ready(self, timeout: float) -> None:
        """Return once every worker is READY; raise TorchServeError as soon as TorchServe exits or a worker
        dies while loading the model (TorchServe would retry it until its own timeout)."""
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self.frontend_failure()
            failure = self.worker_failure()
            if failure is not None:
                raise failure
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
        raise TorchServeError(f"TorchServe not ready after {timeout:.0f}s ({last})", self.log_tail())

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


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _cmd_build(args: argparse.Namespace) -> int:
    settings = get_settings()
    problem = backbone_problem(
        settings,
        checkpoint=args.checkpoint,
        backbone=args.backbone,
        accept_default=args.default_backbone,
        flags=", or pass --checkpoint / --backbone",
    )
    if problem is not None:
        _err(problem[1])
        return problem[0]
    checkpoint = args.checkpoint or (None if args.backbone else settings.backbone_checkpoint)
    try:
        built = build_archive(
            args.export_dir or settings.ts_mar_dir,
            checkpoint=Path(checkpoint).expanduser().resolve() if checkpoint else None,
            backbone=args.backbone,
            model_name=args.model_name,
            engine_config=_parse_sets(args.set),
        )
    except (ValueError, OSError) as exc:
        _err(f"error: {exc}")
        return EXIT_REFUSED
    except Exception as exc:  # an unknown timm name, an unsupported model: typed by the core
        _err(f"error: cannot build the backbone: {getattr(exc, 'message', None) or exc}")
        return EXIT_REFUSED
    _err(f"packed backbone {built.fingerprint} from {built.source}")
    if checkpoint is None and "random init" in built.source:
        _err(
            "warning: a randomly initialised backbone: only tasks registered against this fingerprint are served"
        )
    print(built.path)
    return EXIT_OK


def _state_pid(workdir: Path) -> int | None:
    """The pid of the TorchServe `serve start` left running in `workdir`, if it still runs."""
    state_file = workdir / "state.json"
    if not state_file.is_file():
        return None
    try:
        pid = int(json.loads(state_file.read_text()).get("pid") or 0)
        if pid:
            os.killpg(pid, 0)
            return pid
    except (ValueError, ProcessLookupError, PermissionError, json.JSONDecodeError):
        pass
    return None


def _cmd_start(args: argparse.Namespace) -> int:
    settings = get_settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling is not news
    mar = Path(args.mar or Path(settings.ts_mar_dir) / f"{settings.ts_model_name}.mar")
    workdir = Path(args.workdir or settings.ts_workdir)
    if not mar.is_file():
        _err(f"error: {mar} does not exist: build it first (python -m e2vpt.cli serve build-mar)")
        return EXIT_NOINPUT
    running = _state_pid(workdir)
    if running is not None:
        _err(
            f"error: TorchServe (pid {running}) is already running from {workdir}: python -m e2vpt.cli serve stop"
        )
        return EXIT_UNAVAILABLE
    if settings.backbone_checkpoint and Path(settings.backbone_checkpoint).is_file():
        with contextlib.suppress(OSError, KeyError, zipfile.BadZipFile):
            if packed_backbone_differs(mar, settings.backbone_checkpoint):
                _err(
                    f"warning: serving the backbone packed in {mar}, not E2VPT_BACKBONE_CHECKPOINT="
                    f"{settings.backbone_checkpoint}: rebuild with python -m e2vpt.cli serve build-mar"
                )
    metrics_port = (
        settings.metrics_port if settings.metrics_port is not None else settings.ts_engine_metrics_port
    )
    ts = TorchServe(
        mar,
        workdir,
        workers=args.workers,
        inference_port=settings.ts_inference_port,
        management_port=settings.ts_management_port,
        metrics_port=settings.ts_metrics_port,
        worker_metrics_port=metrics_port,
    )
    try:
        ts.start()
    except TorchServeError as exc:
        _err(f"error: {exc.message}")
        if args.verbose and exc.details:
            _err(exc.details)
        _err(f"logs: {ts.workdir / 'logs'} ({ts.workdir / 'torchserve.out'}); -v prints the last lines")
        return EXIT_REFUSED
    state = {**ts.state(), "inference_token": ts.keys().get("inference")}
    print(json.dumps(state, indent=2))
    _err(
        f"TorchServe is ready: predictions {ts.predictions_url}, engine metrics {ts.worker_metrics_url}, "
        f"TorchServe metrics {ts.metrics_url}; the inference token (python -m e2vpt.cli serve token) "
        f"expires after {settings.ts_token_expiration_min} min (serve token --refresh makes a new one)"
    )
    ts.proc = None  # leave it running; `serve stop` ends it
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or get_settings().ts_workdir)
    state_file = workdir / "state.json"
    if not state_file.is_file():
        _err(f"no TorchServe state in {workdir}")
        return EXIT_REFUSED
    pid = json.loads(state_file.read_text()).get("pid")
    if pid:
        stop_group(int(pid))
    state_file.unlink()
    print(f"stopped TorchServe (pid {pid})")
    return EXIT_OK


def running_keys(workdir: Path) -> dict[str, dict[str, Any]]:
    """The keys of the TorchServe running from `workdir` ({"inference": {"key", "expiration time"}, ...}:
    its key_file.json), or {} when there is none."""
    key_file = workdir / "key_file.json"
    if not key_file.is_file():
        return {}
    return {k.lower(): v for k, v in json.loads(key_file.read_text()).items() if isinstance(v, dict)}


def running_state(workdir: Path) -> dict[str, Any]:
    """What `serve start` recorded of the TorchServe running from `workdir` (URLs, pid), or {}."""
    state_file = workdir / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def _cmd_token(args: argparse.Namespace) -> int:
    """Print a key of the running TorchServe (from its key_file.json); --refresh asks TorchServe for a new
    one first (its token API, with the API key)."""
    settings = get_settings()
    workdir = Path(args.workdir or settings.ts_workdir)
    keys = running_keys(workdir)
    if not keys:
        _err(
            f"error: {workdir / 'key_file.json'} does not exist: is TorchServe running? "
            "(python -m e2vpt.cli serve start)"
        )
        return EXIT_NOINPUT
    if args.refresh:
        management = running_state(workdir).get("management_url") or (
            f"http://127.0.0.1:{settings.ts_management_port}"
        )
        try:
            r = httpx.get(
                f"{management}/token",
                params={"type": args.kind},
                headers={"Authorization": f"Bearer {keys['api']['key']}"},
                timeout=10,
            )
        except httpx.HTTPError as exc:
            _err(f"error: TorchServe's management API at {management} is unreachable: {exc}")
            return EXIT_UNAVAILABLE
        if r.status_code != 200:
            _err(
                f"error: TorchServe refused a new {args.kind} key: HTTP {r.status_code} {r.text.strip()[:200]}"
            )
            return EXIT_REFUSED
        keys = running_keys(workdir)
    entry = keys.get(args.kind) or {}
    if "expiration time" in entry:
        _err(f"{args.kind} key expires at {entry['expiration time']}")
    print(entry.get("key", ""))
    return EXIT_OK


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="build the .mar and run TorchServe")
    sub = serve.add_subparsers(dest="serve_command", metavar="SERVE_COMMAND")
    b = sub.add_parser("build-mar", help="package backbone + handler + engine config as a .mar")
    b.add_argument(
        "--checkpoint",
        help="backbone checkpoint written by save_checkpoint (default: E2VPT_BACKBONE_CHECKPOINT)",
    )
    b.add_argument("--backbone", help="timm model name to pack (default: E2VPT_BACKBONE)")
    b.add_argument(
        "--default-backbone",
        action="store_true",
        help="accept the default backbone when none is configured (randomly initialised)",
    )
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
    k = sub.add_parser("token", help="print the running TorchServe's inference key (or another)")
    k.add_argument("--workdir")
    k.add_argument("--kind", choices=("inference", "management"), default="inference")
    k.add_argument("--refresh", action="store_true", help="ask TorchServe for a new key first (keys expire)")
    k.set_defaults(func=_cmd_token)
