"""Reading one inference request, whatever front end received it (TorchServe, Ray Serve).

A request carries a task id and an image in one of three shapes:

- raw image bytes (any content type but JSON/form) with the task id in the ``X-Task-Id`` header;
- JSON ``{"task_id": "...", "image": "<base64 or data: URL>", "top_k": 3}`` (header may carry the id);
- multipart/form-data with fields ``task_id`` and ``image`` (or ``file``), optionally ``top_k``.

A request arrives as its input fields by name (TorchServe's shape: ``body``/``data`` for a raw or JSON
body, one field per multipart part) plus its headers. Header names are compared case-insensitively.
Every bad input becomes a typed error for that item only (400 missing/bad input; 404, 413, 422, 503 come
from the engine). JSON bodies are read with `e2vpt.core.safejson` (nesting depth bounded, finite numbers
only). `parse_items` turns any exception while reading one request, expected or not, into that request's
error: never the batch's.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from e2vpt.core import safejson
from e2vpt.errors import BadRequest, E2VPTError, InvalidImage, excerpt
from e2vpt.serving import TASK_HEADER, TOP_K_HEADER
from e2vpt.serving.engine import RequestItem

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 8  # {"task_id": ..., "image": ..., "top_k": ...} is 1 level deep
IMAGE_FIELDS = ("image", "file")
RAW_FIELDS = ("body", "data")


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
        raise BadRequest(f"top_k must be a positive integer, got {excerpt(value)}") from exc
    if k < 1:
        raise BadRequest(f"top_k must be a positive integer, got {k}")
    return k


def parse_request(request: Mapping[str, Any] | None, headers: Mapping[Any, Any] | None = None) -> RequestItem:
    """One request (its input fields by name) and its headers -> `RequestItem`, or raise a
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
        raise BadRequest(
            f"task id in the X-Task-Id header ({excerpt(header_task)}) and body ({excerpt(body_task)}) differ"
        )
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


def parse_items(
    requests: Iterable[tuple[Mapping[str, Any] | None, Mapping[Any, Any] | None]],
) -> list[RequestItem | E2VPTError]:
    """(fields, headers) per request -> a `RequestItem` or that request's own typed error."""
    items: list[RequestItem | E2VPTError] = []
    for idx, (request, headers) in enumerate(requests):
        try:
            items.append(parse_request(request, headers))
        except E2VPTError as exc:
            items.append(exc)
        except Exception as exc:  # a parser bug must fail its own request only
            log.exception("request %d of a batch could not be read", idx)
            items.append(BadRequest(f"unreadable request: {type(exc).__name__}"))
    return items
