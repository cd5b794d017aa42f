"""TorchServe request/response adaptation, testable without TorchServe.

Requests are read by `e2vpt.serving.requests` (the formats, shared with every front end). Query
parameters never reach a TorchServe handler, so they are not a way to pass the task id. Each failed item
gets its own HTTP status; any exception while reading one request becomes that request's error only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from e2vpt.config import Settings, settings_with_defaults
from e2vpt.errors import BadRequest, E2VPTError
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.serving.metrics import MetricsEndpoint
from e2vpt.serving.requests import parse_items
from e2vpt.torchserve import BACKBONE_FILE, ENGINE_CONFIG

log = logging.getLogger(__name__)

WORKER_HEADER = "X-E2VPT-Worker"  # response header: the worker process that answered (debugging, tests)
FORM_TYPE = "application/x-www-form-urlencoded"
# TorchServe decodes a form-encoded body into form fields before the handler sees it (lossy: the image is
# gone). It is what curl sends with --data-binary and no Content-Type, so say exactly what to send.
FORM_BODY_ERROR = (
    "the body arrived as a form (Content-Type: application/x-www-form-urlencoded, curl's default for "
    "--data-binary), which TorchServe decodes before the handler sees it: send the image bytes with "
    "'Content-Type: application/octet-stream' (curl -H 'Content-Type: application/octet-stream' "
    '--data-binary @img.jpg), as JSON {"task_id", "image": base64}, or as multipart (curl -F image=@img.jpg)'
)


class TSContext(Protocol):
    """The part of TorchServe's `Context` the adapter uses."""

    def get_all_request_header(self, idx: int) -> Mapping[str, Any]: ...

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None: ...

    def set_response_header(self, idx: int, key: str, value: str) -> None: ...

    def set_response_content_type(self, idx: int, value: str) -> None: ...


def parse_batch(data: list[Mapping[str, Any]] | None, context: TSContext) -> list[RequestItem | E2VPTError]:
    def headers(idx: int) -> Mapping[Any, Any]:
        try:
            return context.get_all_request_header(idx)
        except Exception:  # a context without request headers (tests, some TorchServe paths)
            return {}

    items = parse_items((request, headers(idx)) for idx, request in enumerate(data or []))
    for idx, item in enumerate(items):
        content_type = {str(k).lower(): v for k, v in headers(idx).items()}.get("content-type", "")
        if isinstance(content_type, (bytes, bytearray)):
            content_type = content_type.decode("latin-1")
        if str(content_type).lower().startswith(FORM_TYPE) and isinstance(item, E2VPTError):
            items[idx] = BadRequest(FORM_BODY_ERROR)
    return items


def handle_batch(
    engine: MultiTaskEngine, data: list[Mapping[str, Any]] | None, context: TSContext
) -> list[bytes]:
    """What the TorchServe handler's `handle` returns: one JSON document per request (encoded here, so that
    its size is known), each failed item with its own HTTP status (`context.set_response_status(code,
    phrase, idx)`); the others stay 200. An answer over TorchServe's `max_response_size` would make its
    front end drop the worker with every request of the batch ("Worker died"): such an answer is replaced
    by that item's own 500."""
    items = parse_batch(data, context)
    try:
        results = engine.predict(items)
    except Exception as exc:  # the engine isolates items itself; this only keeps TorchServe's 503 out
        log.exception("engine failed on a batch of %d requests", len(items))
        failure = E2VPTError(f"inference failed: {type(exc).__name__}")
        results = [item if isinstance(item, E2VPTError) else failure for item in items]
    out: list[bytes] = []
    worker = str(os.getpid())
    limit = engine.settings.ts_max_request_size  # TorchServe's max_response_size too (archive.TorchServe)
    for idx, res in enumerate(results):
        body = json.dumps(res.to_dict()).encode()
        if len(body) > limit:
            log.warning("answer %d of a batch is %d bytes, over max_response_size %d", idx, len(body), limit)
            engine.metrics.observe_failure(res.task_id if isinstance(res, Result) else None, "response")
            res = E2VPTError(
                f"the answer is {len(body)} bytes, over the server's limit of {limit} "
                "(E2VPT_TS_MAX_REQUEST_SIZE): ask for fewer labels (top_k)"
            )
            body = json.dumps(res.to_dict()).encode()
        with contextlib.suppress(Exception):  # contexts without response headers
            context.set_response_header(idx, WORKER_HEADER, worker)
            context.set_response_content_type(idx, "application/json")
        if not isinstance(res, Result):
            context.set_response_status(res.http_status, res.code, idx)
        out.append(body)
    return out


def engine_from_model_dir(model_dir: str | Path, gpu_id: int | None = None) -> MultiTaskEngine:
    """The engine of a TorchServe worker: settings from the .mar's engine.json (env overrides), the backbone
    packed in the .mar (always: E2VPT_BACKBONE[_CHECKPOINT] name the registry's backbone, and a relative
    path would not even resolve here, in TorchServe's working directory; to serve another backbone, build
    the .mar with it), the device from TorchServe's gpu assignment when the settings ask for cuda."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / ENGINE_CONFIG
    defaults = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    settings = settings_with_defaults(defaults)
    updates: dict[str, Any] = {}
    if (model_dir / BACKBONE_FILE).is_file():
        updates["backbone_checkpoint"] = str(model_dir / BACKBONE_FILE)
    if settings.device.startswith("cuda") and gpu_id is not None and torch.cuda.is_available():
        updates["device"] = f"cuda:{gpu_id}"
    settings = Settings(**{**settings.model_dump(), **updates}) if updates else settings
    engine = MultiTaskEngine.from_settings(settings)
    if settings.metrics_port:
        engine.metrics_endpoint = MetricsEndpoint(
            engine.metrics, settings.metrics_port, settings.metrics_bind
        )
    log.info(
        "e2vpt engine ready: backbone %s on %s, backend %s, store %s",
        engine.info.fingerprint, engine.device, settings.backend, engine.store,
    )  # fmt: skip
    return engine
