"""TorchServe request/response adaptation, testable without TorchServe.

A request carries a task id and an image in one of three shapes:

- raw image bytes (any content type but JSON/form) with the task id in the ``X-Task-Id`` header;
- JSON ``{"task_id": "...", "image": "<base64 or data: URL>", "top_k": 3}`` (header may carry the id);
- multipart/form-data with fields ``task_id`` and ``image`` (or ``file``), optionally ``top_k``.

Query parameters never reach a TorchServe handler, so they are not a way to pass the task id. Header
names arrive as the client sent them: they are compared case-insensitively. Every bad input becomes a
typed error for that item only (400 missing/bad input, 404, 413, 422, 503 come from the engine).
JSON bodies are read with `e2vpt.core.safejson` (nesting depth bounded, finite numbers only). Any
exception while reading one request, expected or not, becomes that request's error: never the batch's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from e2vpt.config import Settings, settings_with_defaults
from e2vpt.core import safejson
from e2vpt.errors import BadRequest, E2VPTError, InvalidImage
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.serving.metrics import MetricsEndpoint

log = logging.getLogger(__name__)

TASK_HEADER = "x-task-id"
WORKER_HEADER = "X-E2VPT-Worker"  # response header: the worker process that answered (debugging, tests)
TOP_K_HEADER = "x-top-k"
MAX_JSON_DEPTH = 8  # {"task_id": ..., "image": ..., "top_k": ...} is 1 level deep
IMAGE_FIELDS = ("image", "file")
RAW_FIELDS = ("body", "data")
ENGINE_CONFIG = "engine.json"  # settings packed into the .mar (environment variables still override)
BACKBONE_FILE = "backbone.safetensors"


class TSContext(Protocol):
    """The part of TorchServe's `Context` the adapter uses."""

    def get_all_request_header(self, idx: int) -> Mapping[str, Any]: ...

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None: ...

    def set_response_header(self, idx: int, key: str, value: str) -> None: ...


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise BadRequest("a text field is not UTF-8") from exc
    return str(value).strip()


def normalise_headers(headers: Mapping[Any, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        key = _text(k).lower()
        try:
            out[key] = _text(v)
        except BadRequest:
            continue
    return out


def _json_body(value: Any, content_type: str) -> dict[str, Any] | None:
    """The JSON object of a body (TorchServe decodes `application/json` itself; other JSON types arrive raw)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (bytes, bytearray)) and "json" in content_type:
        # also what TorchServe forwards raw when its own json.loads fails (e.g. RecursionError)
        obj = safejson.loads(value, max_depth=MAX_JSON_DEPTH, what="JSON body")
        if not isinstance(obj, dict):
            raise BadRequest("a JSON body must be an object with 'task_id' and 'image'")
        return obj
    if isinstance(value, (list, str, int, float)) and "json" in content_type:
        raise BadRequest("a JSON body must be an object with 'task_id' and 'image'")
    return None


def _b64_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise InvalidImage("JSON field 'image' must be a base64 string")
    text = value.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("JSON field 'image' is not valid base64") from exc


def _top_k(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest("top_k must be a positive integer")
    try:
        k = int(_text(value)) if not isinstance(value, int) else value
    except ValueError as exc:
        raise BadRequest(f"top_k must be a positive integer, got {value!r}") from exc
    if k < 1:
        raise BadRequest(f"top_k must be a positive integer, got {k}")
    return k


def parse_request(request: Mapping[str, Any] | None, headers: Mapping[Any, Any] | None = None) -> RequestItem:
    """One TorchServe request (its input fields by name) and its headers -> `RequestItem`, or raise a
    typed error (BadRequest / InvalidImage)."""
    hdr = normalise_headers(headers)
    fields = dict(request or {})
    content_type = hdr.get("content-type", "").lower()
    header_task = hdr.get(TASK_HEADER) or None
    top_k = _top_k(hdr.get(TOP_K_HEADER))

    body_task: str | None = None
    image: bytes | None = None
    raw = next((fields[k] for k in RAW_FIELDS if k in fields), None)
    obj = _json_body(raw, content_type) if raw is not None else None
    if obj is not None:
        if obj.get("task_id") is not None:
            body_task = _text(obj["task_id"]) if isinstance(obj["task_id"], str) else None
            if body_task is None:
                raise BadRequest("JSON field 'task_id' must be a string")
        if obj.get("image") is not None:
            image = _b64_image(obj["image"])
        if "top_k" in obj:
            top_k = _top_k(obj["top_k"])
    elif raw is not None:
        image = bytes(raw) if isinstance(raw, (bytes, bytearray)) else _text(raw).encode()
    else:  # multipart/form-data: one field per part
        if fields.get("task_id") is not None:
            body_task = _text(fields["task_id"])
        part = next((fields[k] for k in IMAGE_FIELDS if k in fields), None)
        if part is not None:
            image = bytes(part) if isinstance(part, (bytes, bytearray)) else _text(part).encode()
        if "top_k" in fields:
            top_k = _top_k(fields["top_k"])

    if header_task and body_task and header_task != body_task:
        raise BadRequest(f"task id in the X-Task-Id header ({header_task!r}) and body ({body_task!r}) differ")
    task_id = header_task or body_task
    if not task_id:
        raise BadRequest(
            "missing task id: send the X-Task-Id header, a JSON field 'task_id' or a form field 'task_id'"
        )
    if not image:
        raise InvalidImage(
            "missing image: send the image bytes as the body, base64 in JSON field 'image', "
            "or a form field 'image'/'file'"
        )
    return RequestItem(task_id=task_id, image=image, top_k=top_k)


def parse_batch(data: list[Mapping[str, Any]] | None, context: TSContext) -> list[RequestItem | E2VPTError]:
    items: list[RequestItem | E2VPTError] = []
    for idx, request in enumerate(data or []):
        try:
            headers = context.get_all_request_header(idx)
        except Exception:  # a context without request headers (tests, some TorchServe paths)
            headers = {}
        try:
            items.append(parse_request(request, headers))
        except E2VPTError as exc:
            items.append(exc)
        except Exception as exc:  # a parser bug must fail its own request only
            log.exception("request %d of a batch could not be read", idx)
            items.append(BadRequest(f"unreadable request: {type(exc).__name__}"))
    return items


def handle_batch(
    engine: MultiTaskEngine, data: list[Mapping[str, Any]] | None, context: TSContext
) -> list[Any]:
    """What the TorchServe handler's `handle` returns: one JSON object per request, each failed item with
    its own HTTP status (`context.set_response_status(code, phrase, idx)`); the others stay 200."""
    items = parse_batch(data, context)
    try:
        results = engine.predict(items)
    except Exception as exc:  # the engine isolates items itself; this only keeps TorchServe's 503 out
        log.exception("engine failed on a batch of %d requests", len(items))
        failure = E2VPTError(f"inference failed: {type(exc).__name__}")
        results = [item if isinstance(item, E2VPTError) else failure for item in items]
    out: list[Any] = []
    worker = str(os.getpid())
    for idx, res in enumerate(results):
        with contextlib.suppress(Exception):  # contexts without response headers
            context.set_response_header(idx, WORKER_HEADER, worker)
        if isinstance(res, Result):
            out.append(res.to_dict())
        else:
            status = res.http_status
            context.set_response_status(status, res.code, idx)
            out.append(res.to_dict())
    return out


def engine_from_model_dir(model_dir: str | Path, gpu_id: int | None = None) -> MultiTaskEngine:
    """The engine of a TorchServe worker: settings from the .mar's engine.json (env overrides), the backbone
    checkpoint from the .mar, the device from TorchServe's gpu assignment when the settings ask for cuda."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / ENGINE_CONFIG
    defaults = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    settings = settings_with_defaults(defaults)
    updates: dict[str, Any] = {}
    if (model_dir / BACKBONE_FILE).is_file() and not os.environ.get("E2VPT_BACKBONE_CHECKPOINT"):
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
