"""The registry HTTP API: register, inspect, roll back and delete prompt sets in the Redis `PromptStore`.

`create_app(settings)` builds the app (loading the configured backbone only to learn its fingerprint and
shapes); `create_app(store)` serves an existing store. Run it with `python -m e2vpt.cli registry serve`.

Writes need `Authorization: Bearer <token>` (token from `registry_token_file` or `registry_token`);
reads need it too when `registry_auth_reads` is set. Every error is a typed `E2VPTError` answered with
its own `http_status` by one exception handler, as JSON `{"error": code, "detail": message}`.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.routing import Match

from e2vpt.config import Settings, get_settings
from e2vpt.core import safejson
from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.promptset import TASK_ID_RE, check_task_id
from e2vpt.errors import (
    BadRequest,
    E2VPTError,
    InvalidTaskId,
    PreconditionFailed,
    PromptSetTooLarge,
    RequestTooLarge,
    StoreUnavailable,
    Unauthorized,
    excerpt,
    http_status,
)
from e2vpt.registry.client import read_token
from e2vpt.registry.conditions import HEADER_PATTERN, MAX_HEADER_CHARS, Precondition, etag, parse_tags
from e2vpt.registry.store import CURSOR_PATTERN, MAX_LIST_LIMIT, PromptStore

log = logging.getLogger(__name__)

# A multipart envelope (boundaries, part headers) around a file is small; bodies beyond this slack over
# the prompt-set limit are refused before they are read.
MULTIPART_SLACK_BYTES = 64 * 1024
# JSON request bodies (rollback) are tiny: larger or deeper ones are refused before FastAPI parses them.
MAX_JSON_BODY_BYTES = 64 * 1024
MAX_JSON_BODY_DEPTH = 8
BODY_METHODS = ("POST", "PUT", "PATCH")
OCTET_STREAM = "application/octet-stream"
SIZE_BUCKETS = tuple(float(2**k) for k in range(10, 28, 1))  # 1 KiB .. 128 MiB
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RollbackRequest(BaseModel):
    version: int = Field(ge=1, description="the kept version whose content becomes current as a new version")


class RegistryMetrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.changes = Counter(
            "e2vpt_registry_changes_total", "Accepted changes by action", ["action"], registry=self.registry
        )
        self.rejections = Counter(
            "e2vpt_registry_rejections_total",
            "Refused registrations by reason (error code)",
            ["reason"],
            registry=self.registry,
        )
        self.sizes = Histogram(
            "e2vpt_registry_prompt_set_bytes",
            "Size of registered prompt-set files in bytes",
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "e2vpt_registry_request_duration_seconds",
            "Registry API request latency by route template, method and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


async def _check_json_body(request: Request) -> None:
    """A JSON body is read here (capped) and checked for depth and finite numbers, so that the route's
    own parsing only ever sees a small, shallow document. The body is kept for the route."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method not in BODY_METHODS or "json" not in ctype:
        return
    body = await _read_capped(request, MAX_JSON_BODY_BYTES, RequestTooLarge)
    request._body = body  # what Request.body() caches: the route (and FastAPI) read it from there
    safejson.loads(body, max_depth=MAX_JSON_BODY_DEPTH, what="request body")


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route serves on this path (what OPTIONS and 405 answers list in `Allow`)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods | {"OPTIONS"}) if methods else []


def _error_response(exc: E2VPTError) -> JSONResponse:
    """The one place where errors become HTTP responses."""
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="e2vpt-registry"'
    if isinstance(exc, StoreUnavailable) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))  # whole seconds (RFC 9110)
    if isinstance(exc, PreconditionFailed) and exc.current is not None:
        headers["ETag"] = etag(exc.current)  # what the condition would have to name now
    return JSONResponse(status_code=http_status(exc), content=exc.to_dict(), headers=headers or None)


async def _read_capped(
    request: Request, limit: int, too_large: type[E2VPTError] = PromptSetTooLarge
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` (never read whole)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError as exc:
            raise BadRequest(f"invalid Content-Length {length!r}") from exc
        if declared > limit:
            raise too_large(f"request body is {declared} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _file_from_multipart(request: Request, body: bytes) -> bytes:
    """The `file` field of a multipart body already read (with its size cap)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
    except Exception as exc:  # starlette/python-multipart raise several types for malformed envelopes
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise BadRequest("multipart body has no file field named 'file'")
    return await upload.read()


_REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "description": "a prompt-set file (safetensors), raw or as multipart field `file`",
        "content": {
            OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad request (task id, query, body)"},
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "unknown task or version"},
    503: {"description": "the prompt store (Redis) is unavailable"},
}
_PRECONDITION = {"description": "If-Match / If-None-Match does not hold; nothing changed (ETag: the current)"}
_NOT_MODIFIED = {"description": "If-None-Match names this version (no body)"}


_bearer = HTTPBearer(auto_error=False, description="the registry token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _task_id(
    task_id: Annotated[str, PathParam(pattern=TASK_ID_RE.pattern, max_length=128, description="the task id")],
) -> str:
    return check_task_id(task_id)


TaskId = Annotated[str, Depends(_task_id)]


def _no_auth() -> None:
    """Reads are open (registry_auth_reads is off)."""


VersionQ = Annotated[int | None, Query(ge=1, description="a kept version (default: current)")]


def _header_doc(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": HEADER_PATTERN, "maxLength": MAX_HEADER_CHARS}
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


# The conditional headers are read from the request (`_precondition`, `_unchanged`) and documented here:
# declared as FastAPI parameters they would be nullable in the schema, which no header can be.
_IF_MATCH = _header_doc(
    "If-Match", 'only if the current version is one of these entity tags ("4"); *: it exists'
)
_IF_NONE_MATCH_WRITE = _header_doc(
    "If-None-Match", "only if the current version is none of these; *: no task"
)
_IF_NONE_MATCH_READ = _header_doc("If-None-Match", "304 Not Modified if the version is one of these tags")
_CONDITIONAL_WRITE = {"parameters": [_IF_MATCH, _IF_NONE_MATCH_WRITE]}
_CONDITIONAL_READ = {"parameters": [_IF_NONE_MATCH_READ]}


def _header(request: Request, name: str) -> str | None:
    """A list-valued header as one value: lines repeated are one comma-separated list (RFC 9110 5.3)."""
    values = request.headers.getlist(name)
    return ", ".join(values) if values else None


def _precondition(request: Request) -> Precondition:
    """A write's condition from If-Match / If-None-Match (RFC 9110 13.1): see `e2vpt.registry.conditions`."""
    return Precondition(
        if_match=parse_tags(_header(request, "if-match"), "If-Match", weak=False),
        if_none_match=parse_tags(_header(request, "if-none-match"), "If-None-Match", weak=True),
    )


When = Annotated[Precondition, Depends(_precondition)]


def _unchanged(request: Request, version: int) -> bool:
    """A read's If-None-Match names `version` (weak comparison): the answer is 304 Not Modified."""
    tags = parse_tags(_header(request, "if-none-match"), "If-None-Match", weak=True)
    return not Precondition(if_none_match=tags).holds(version)


def _tagged(request: Request, body: dict[str, Any] | bytes, version: int, **kw: Any) -> Response:
    """A read's answer with its ETag, or 304 Not Modified when If-None-Match already names it."""
    headers = {"ETag": etag(version), **kw.pop("headers", {})}
    if _unchanged(request, version):
        return Response(status_code=304, headers={"ETag": headers["ETag"]})
    if isinstance(body, bytes):
        return Response(content=body, headers=headers, **kw)
    return JSONResponse(content=body, headers=headers, **kw)


Cursor = Annotated[
    str, Query(pattern=CURSOR_PATTERN, description="'0' to start, then the previous page's next_cursor")
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)]


def create_app(
    source: Settings | PromptStore | None = None,
    *,
    settings: Settings | None = None,
    token: str | None = None,
) -> FastAPI:
    """The registry app over a store, or over one built from settings (Redis URL, namespace, backbone).

    `settings` (default: the process settings) gives the token, auth and size options when `source` is a
    store; `token` overrides the configured token.
    """
    store, settings = _store_and_settings(source, settings)
    write_token = token if token is not None else read_token(settings)
    if write_token is None:
        log.warning("no registry token configured (E2VPT_REGISTRY_TOKEN[_FILE]): every write is refused")
    info: BackboneInfo = store.info
    metrics = RegistryMetrics()
    app = FastAPI(
        title="E2VPT prompt registry",
        version="1",
        description=f"Prompt sets of backbone {info.name} ({info.fingerprint}), stored in Redis.",
    )
    app.state.store, app.state.metrics = store, metrics
    write, read = _auth_dependencies(write_token, settings.registry_auth_reads)
    _add_error_handlers(app, metrics)
    _add_timing(app, metrics)
    _add_write_routes(app, store, metrics, write, settings.max_prompt_set_bytes)
    _add_read_routes(app, store, read)
    _add_ops_routes(app, store, metrics)
    return app


def _store_and_settings(
    source: Settings | PromptStore | None, settings: Settings | None
) -> tuple[PromptStore, Settings]:
    if isinstance(source, PromptStore):
        return source, settings or get_settings()
    settings = source or settings or get_settings()
    from e2vpt.core.backbone import backbone_from_settings

    info = backbone_from_settings(settings).info
    store = PromptStore.from_settings(info, settings, fail_fast_ms=settings.registry_store_backoff_ms)
    return store, settings


def _auth_dependencies(write_token: str | None, auth_reads: bool) -> tuple[Any, Any]:
    """(write, read) route dependencies: writes need the bearer token, reads only with `auth_reads`."""

    def require_write(credentials: Credentials) -> None:
        if write_token is None:
            raise Unauthorized("this registry has no token configured: writes are disabled")
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("missing bearer token")
        if not hmac.compare_digest(credentials.credentials.encode(), write_token.encode()):
            raise Unauthorized("invalid bearer token")

    write = Depends(require_write)
    # reads declare (and check) the bearer scheme only when they need it, so the schema says the truth
    return write, (write if auth_reads else Depends(_no_auth))


def _add_error_handlers(app: FastAPI, metrics: RegistryMetrics) -> None:
    """Every error as JSON {error, detail} with its typed status; refused uploads are counted."""

    @app.exception_handler(E2VPTError)
    async def on_error(request: Request, exc: E2VPTError) -> JSONResponse:
        if request.method == "PUT" and request.url.path.startswith("/tasks/"):
            metrics.rejections.labels(reason=exc.code).inc()
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error_response(E2VPTError(f"internal error: {type(exc).__name__}"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        bad_id = next((e for e in exc.errors() if tuple(e["loc"]) == ("path", "task_id")), None)
        if bad_id is not None:
            return await on_error(
                request, InvalidTaskId(f"invalid task id {excerpt(bad_id.get('input'))}: {bad_id['msg']}")
            )
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return await on_error(request, BadRequest(problems))


def _add_timing(app: FastAPI, metrics: RegistryMetrics) -> None:
    @app.middleware("http")
    async def timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            if request.method == "OPTIONS":
                allow = allowed_methods(app, request.scope)
                response = (
                    Response(status_code=204, headers={"Allow": ", ".join(allow)})
                    if allow
                    else _error_response(BadRequest(f"no route serves {request.url.path}"))
                )
            else:
                try:
                    await _check_json_body(request)
                except E2VPTError as exc:
                    response = _error_response(exc)
                else:
                    response = await call_next(request)
                if response.status_code == 405:  # Starlette lists only the first matching route's methods
                    response.headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.latency.labels(request.method, path, str(status)).observe(time.perf_counter() - start)


def _add_write_routes(
    app: FastAPI, store: PromptStore, metrics: RegistryMetrics, write: Any, max_bytes: int
) -> None:
    @app.put(
        "/tasks/{task_id}",
        status_code=201,
        dependencies=[write],
        openapi_extra={**_REGISTER_BODY, **_CONDITIONAL_WRITE},
        responses={
            **_ERROR_RESPONSES,
            200: {"description": "the current version's file again: nothing written (`created` false)"},
            412: _PRECONDITION,
            413: {"description": "too large"},
            422: {"description": "invalid file"},
        },
        summary="Register a prompt set as the task's new current version",
    )
    async def register_task(
        task_id: TaskId, request: Request, when: When, response: Response
    ) -> dict[str, Any]:
        ctype = request.headers.get("content-type", OCTET_STREAM).split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            body = await _read_capped(request, max_bytes + MULTIPART_SLACK_BYTES)
            data = await _file_from_multipart(request, body)
            if len(data) > max_bytes:
                raise PromptSetTooLarge(f"prompt set is {len(data)} bytes; the limit is {max_bytes}")
        elif ctype in (OCTET_STREAM, "application/vnd.safetensors", "application/x-safetensors"):
            data = await _read_capped(request, max_bytes)
        else:
            raise BadRequest(
                f"unsupported content type {ctype!r}: send {OCTET_STREAM} or multipart/form-data"
            )
        _, version, created = await run_in_threadpool(store.register_bytes, data, task_id=task_id, when=when)
        if created:
            metrics.changes.labels(action="register").inc()
            metrics.sizes.observe(len(data))
        else:  # the current version's file again: PUT is idempotent, a retried upload creates nothing
            response.status_code = 200
            metrics.changes.labels(action="unchanged").inc()
        summary = await run_in_threadpool(store.summary, task_id, version)
        response.headers["ETag"] = etag(version)
        return {"task_id": task_id, "version": version, "created": created, "summary": summary}

    @app.post(
        "/tasks/{task_id}/rollback",
        dependencies=[write],
        openapi_extra=_CONDITIONAL_WRITE,
        responses={**_ERROR_RESPONSES, 412: _PRECONDITION},
        summary="Make an earlier version's content current again, as a NEW version",
    )
    def rollback(task_id: TaskId, body: RollbackRequest, when: When, response: Response) -> dict[str, Any]:
        version = store.rollback(task_id, body.version, when=when)
        metrics.changes.labels(action="rollback").inc()
        response.headers["ETag"] = etag(version)
        return {"task_id": task_id, "version": version, "rolled_back_from": body.version}

    @app.delete(
        "/tasks/{task_id}",
        status_code=204,
        dependencies=[write],
        openapi_extra=_CONDITIONAL_WRITE,
        response_class=Response,
        responses={**_ERROR_RESPONSES, 412: _PRECONDITION},
        summary="Delete a task and all its versions",
    )
    def delete_task(task_id: TaskId, when: When) -> Response:
        store.delete(task_id, when=when)
        metrics.changes.labels(action="delete").inc()
        return Response(status_code=204)


def _add_read_routes(app: FastAPI, store: PromptStore, read: Any) -> None:
    @app.get("/tasks", dependencies=[read], responses=_ERROR_RESPONSES, summary="List tasks (paginated)")
    def list_tasks(cursor: Cursor = "0", limit: Limit = 100) -> dict[str, Any]:
        tasks, next_cursor = store.list_tasks(cursor=cursor, limit=limit)
        return {"tasks": tasks, "next_cursor": next_cursor}

    @app.get(
        "/tasks/{task_id}",
        dependencies=[read],
        response_model=None,
        responses={**_ERROR_RESPONSES, 304: _NOT_MODIFIED},
        openapi_extra=_CONDITIONAL_READ,
        summary="A task's summary",
    )
    def show_task(task_id: TaskId, request: Request, version: VersionQ = None) -> Response:
        summary = store.summary(task_id, version)
        return _tagged(request, {"task_id": task_id, **summary}, summary["version"])

    @app.get(
        "/tasks/{task_id}/file",
        dependencies=[read],
        response_class=Response,
        responses={
            **_ERROR_RESPONSES,
            200: {"content": {OCTET_STREAM: {"schema": {"type": "string"}}}},
            304: _NOT_MODIFIED,
        },
        openapi_extra=_CONDITIONAL_READ,
        summary="The prompt-set file (export)",
    )
    def task_file(task_id: TaskId, request: Request, version: VersionQ = None) -> Response:
        if "if-none-match" in request.headers and version is None:  # revalidating: no blob read if unchanged
            current = store.current_version(task_id)
            if current is not None and _unchanged(request, current):
                return Response(status_code=304, headers={"ETag": etag(current)})
        data, v = store.get_bytes(task_id, version)
        headers = {
            "X-Task-Version": str(v),
            "Content-Disposition": f'attachment; filename="{task_id}.v{v}.safetensors"',
        }
        return _tagged(request, data, v, media_type=OCTET_STREAM, headers=headers)

    @app.get(
        "/tasks/{task_id}/versions", dependencies=[read], responses=_ERROR_RESPONSES, summary="Kept versions"
    )
    def task_versions(task_id: TaskId) -> dict[str, Any]:
        return {"task_id": task_id, "versions": store.versions(task_id)}


def _add_ops_routes(app: FastAPI, store: PromptStore, metrics: RegistryMetrics) -> None:
    info = store.info

    @app.get("/healthz", responses={503: _ERROR_RESPONSES[503]}, summary="Liveness and Redis reachability")
    def healthz() -> dict[str, Any]:
        store.ping()
        return {"status": "ok", "backbone": info.name, "fingerprint": info.fingerprint}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def prometheus() -> Response:
        return Response(content=generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
