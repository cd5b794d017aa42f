"""Container health checks (Docker HEALTHCHECK / compose `healthcheck`), stdlib + e2vpt.config only.

    python deploy/healthcheck.py torchserve   # /ping says "Healthy" and E2VPT_TS_WORKERS workers are READY
    python deploy/healthcheck.py registry     # GET /healthz on the registry port

Ports come from e2vpt.config.Settings (the same environment the service reads). TorchServe's token
authorization protects even /ping: the inference key is read from key_file.json in TorchServe's working
directory (E2VPT_TS_WORKDIR, where `serve start` runs it)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_settings_class() -> type:
    """e2vpt/config.py loaded on its own: importing the e2vpt package would pull in torch, far too slow
    for a check that runs every few seconds. The class is the same code the services read."""
    spec = importlib.util.spec_from_file_location("_e2vpt_config", ROOT / "e2vpt" / "config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves annotations through the module
    spec.loader.exec_module(module)
    return module.Settings


Settings = _load_settings_class()


def key(paths: list[Path], kind: str) -> str | None:
    """TorchServe's `kind` ("inference" or "management") key from the first readable key_file.json."""
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = data.get(kind, {}).get("key") if isinstance(data, dict) else None
        if isinstance(found, str):
            return found
    return None


def get(url: str, token: str | None, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def check(service: str, host: str, timeout: float, key_files: list[Path]) -> tuple[bool, str]:
    settings = Settings()
    if service == "torchserve":
        # /ping answers "Healthy" as soon as the frontend runs, before a worker has loaded the model:
        # also ask the management API how many workers are READY.
        status, body = get(
            f"http://{host}:{settings.ts_inference_port}/ping", key(key_files, "inference"), timeout
        )
        if status != 200 or "Healthy" not in body:
            return False, f"/ping -> {status} {body.strip()[:200]}"
        url = f"http://{host}:{settings.ts_management_port}/models/{settings.ts_model_name}"
        status, body = get(url, key(key_files, "management"), timeout)
        if status != 200:
            return False, f"/models/{settings.ts_model_name} -> {status} {body.strip()[:200]}"
        try:
            workers = [w for m in json.loads(body) for w in m.get("workers", [])]
        except (ValueError, AttributeError, TypeError):
            return False, f"unexpected model description {body[:200]!r}"
        ready = sum(1 for w in workers if w.get("status") == "READY")
        want = settings.ts_batching[0]  # the workers `serve start` asked for (GPU default on cuda)
        return ready >= max(1, want), f"{ready}/{want} workers READY"
    status, body = get(f"http://{host}:{settings.registry_port}/healthz", None, timeout)
    return status == 200, f"/healthz -> {status} {body.strip()[:200]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=["torchserve", "registry"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=4.0)
    parser.add_argument("--key-file", type=Path, action="append", default=None)
    args = parser.parse_args(argv)
    try:
        key_files = args.key_file or [Path(Settings().ts_workdir) / "key_file.json"]
        ok, detail = check(args.service, args.host, args.timeout, key_files)
    except OSError as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    print(("healthy: " if ok else "unhealthy: ") + detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
