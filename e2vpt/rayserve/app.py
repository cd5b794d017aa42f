"""The Ray Serve application: an HTTP ingress over engine replicas that batch mixed tasks.

- `Ingress` (HTTP): the same requests as the TorchServe front end (`e2vpt.serving.requests`: raw bytes +
  X-Task-Id, JSON, multipart) at `POST /predictions/<model>` (or `POST /`), the same answers (a result's
  JSON, or a typed error's JSON with its HTTP status: 400/404/413/422/503/500) and `GET /ping`. With an
  inference token configured (`inference_token[_file]`) every request needs `Authorization: Bearer
  <token>` (401 otherwise). An item whose replica dies under it is sent again (`ray_retries`).
- `EngineReplica`: one `MultiTaskEngine` (one per GPU, or per `ray_replica_cpus` on CPUs) with its Redis
  prompt cache and pub/sub updates as in any other process; `@serve.batch` gathers concurrent items of
  any task into one `engine.predict` call. It reports its resident tasks, cache hits, cold loads and queue
  length to the router (`record_routing_stats`) and to Prometheus (Ray's metrics endpoint, `e2vpt_replica_*`).
- Routing: `e2vpt.rayserve.router.TaskAffinityRouter` on the engine deployment (`ray_affinity`).
- Scaling: `ray_min_replicas`..`ray_max_replicas`, autoscaled on ongoing requests when they differ.

Run it with `python -m e2vpt.rayserve` (settings from E2VPT_* variables) or `serve run
e2vpt.rayserve.app:app_builder` / a Serve config file (KubeRay: deploy/kuberay/rayservice.yaml).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Gauge
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from e2vpt.config import Settings, settings_with_defaults
from e2vpt.errors import BadRequest, E2VPTError, RequestTooLarge, Unauthorized
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.serving.requests import parse_items

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "E2VPTEngine"
INGRESS_DEPLOYMENT = "E2VPTIngress"
ROUTER_CLASS = "e2vpt.rayserve.router:TaskAffinityRouter"
REPLICA_HEADER = "X-E2VPT-Replica"  # response header: the engine replica that answered (debugging, tests)
BATCH_TASKS_HEADER = "X-E2VPT-Batch-Tasks"  # response header: distinct tasks in the batch that answered
# A replica or its node gone under a request: worth sending the item to another replica.
RETRIABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# Settings that only shape the deployment (replica count, autoscaling): kept out of the replicas' init
# arguments, so that changing them adds or removes replicas without restarting the others.
DEPLOYMENT_ONLY = frozenset(
    {
        "ray_min_replicas",
        "ray_max_replicas",
        "ray_target_ongoing_requests",
        "ray_autoscale_look_back_s",
        "ray_upscale_delay_s",
        "ray_downscale_delay_s",
    }
)


@dataclass(frozen=True)
class Answer:
    """One item's answer from an engine replica: HTTP status, JSON body, who answered, and how mixed the
    batch was."""

    status: int
    body: dict[str, Any]
    replica: str = ""
    batch_tasks: int = 0

    @classmethod
    def of(cls, res: Result | E2VPTError, replica: str = "", batch_tasks: int = 0) -> Answer:
        status = 200 if isinstance(res, Result) else res.http_status
        return cls(status, res.to_dict(), replica, batch_tasks)


def inference_token(settings: Settings) -> str | None:
    """The inference token: the secret file wins over the environment; blank means none (no auth)."""
    if settings.inference_token_file:
        token = Path(settings.inference_token_file).read_text().strip()
    else:
        token = (settings.inference_token or "").strip()
    return token or None


def check_auth(token: str | None, authorization: str | None) -> None:
    """Raise `Unauthorized` unless `authorization` is `Bearer <token>` (no token configured: open)."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("missing bearer token")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("invalid bearer token")


def engine_settings(settings: Settings) -> Settings:
    """A replica's settings: on a CUDA device, the one GPU Ray gives the replica (cuda:0 of its view)."""
    return settings.model_copy(update={"device": "cuda"}) if settings.on_cuda else settings


class EngineReplica:
    """One engine per replica; `predict(item)` calls are batched across tasks (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = engine_settings(Settings(**settings))
        self.engine = MultiTaskEngine.from_settings(self.settings)
        self.batch.set_max_batch_size(self.settings.ray_max_batch_size)
        self.batch.set_batch_wait_timeout_s(self.settings.ray_batch_wait_ms / 1000)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.ongoing = 0
        self.batches = 0
        self.gauges = {
            name: Gauge(f"e2vpt_replica_{name}", description=text)
            for name, text in (
                ("resident_tasks", "Prompt sets resident in this engine replica"),
                ("cache_hits", "Prompt cache hits of this replica (total)"),
                ("cold_loads", "Prompt sets loaded from Redis by this replica (total)"),
                ("queue_len", "Requests queued or running in this replica"),
            )
        }

    async def predict(self, item: RequestItem) -> Answer:
        self.ongoing += 1
        self.gauges["queue_len"].set(self.ongoing)
        try:
            return await self.batch(item)
        finally:
            self.ongoing -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def batch(self, items: list[RequestItem]) -> list[Answer]:
        try:
            results = await asyncio.to_thread(self.engine.predict, items)
        except Exception as exc:  # the engine isolates items itself; this only keeps the batch answered
            log.exception("engine failed on a batch of %d items", len(items))
            results = [E2VPTError(f"inference failed: {type(exc).__name__}")] * len(items)
        self.batches += 1
        tasks = len({item.task_id for item in items})
        self.publish(self.counts())
        return [Answer.of(res, self.replica_id, tasks) for res in results]

    def counts(self) -> dict[str, Any]:
        cache = self.engine.cache
        return {
            "replica": self.replica_id,
            "resident_tasks": cache.resident_tasks,
            "hits": cache.stats.hits,
            "cold_loads": cache.stats.cold_loads,
            "queue_len": self.ongoing,
            "batches": self.batches,
        }

    def publish(self, counts: dict[str, Any]) -> None:
        """The counts to Prometheus (Ray's metrics endpoint)."""
        for name, key in (("resident_tasks", "resident_tasks"), ("cache_hits", "hits"),
                          ("cold_loads", "cold_loads"), ("queue_len", "queue_len")):  # fmt: skip
            self.gauges[name].set(counts[key])

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router sees of this replica (Ray calls it every `ray_routing_stats_period_s`): the
        counts, the node, and which task versions it holds."""
        counts = self.counts()
        self.publish(counts)
        node = ray.get_runtime_context().get_node_id()
        return {**counts, "node": node, "resident": self.engine.cache.resident()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class Ingress:
    """HTTP front door (see the module docstring); holds the engine deployment's handle."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.token = inference_token(self.settings)
        self.engine = engine

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path == "/ping":
            return JSONResponse({"status": "Healthy"})
        if request.method != "POST" or not (path == "" or path.startswith("/predictions/")):
            return JSONResponse(
                {"error": "not_found", "detail": f"no route {request.method} {path or '/'}"}, 404
            )
        try:
            check_auth(self.token, request.headers.get("authorization"))
            fields = await self.read(request)
        except E2VPTError as exc:
            return self.respond(Answer.of(exc))
        item = parse_items([(fields, request.headers)])[0]
        if isinstance(item, E2VPTError):
            return self.respond(Answer.of(item))
        return self.respond(await self.predict(item))

    async def read(self, request: Request) -> dict[str, Any]:
        """The request's input fields by name, as `e2vpt.serving.requests` reads them: {"body": bytes}, or
        one field per multipart part. The body is read up to `ray_max_request_size` (413 beyond)."""
        limit = self.settings.ray_max_request_size
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request body over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLarge(f"request body over {limit} bytes")
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return {"body": bytes(body)}

        async def replay() -> dict[str, Any]:  # the body already read, for starlette's form parser
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
            fields: dict[str, Any] = {}
            for name, value in form.multi_items():
                fields[name] = await value.read() if isinstance(value, UploadFile) else value
        except MultiPartException as exc:
            raise BadRequest(f"unreadable multipart body: {exc.message}") from exc
        return fields

    async def predict(self, item: RequestItem) -> Answer:
        for attempt in range(self.settings.ray_retries + 1):
            try:
                return await self.engine.predict.remote(item)
            except RETRIABLE as exc:
                log.warning("engine replica lost under a request (attempt %d): %s", attempt + 1, exc)
            except Exception as exc:
                log.exception("engine call failed")
                return Answer.of(E2VPTError(f"inference failed: {type(exc).__name__}"))
        return Answer.of(E2VPTError("inference failed: engine replicas lost"))

    @staticmethod
    def respond(answer: Answer) -> Response:
        headers = {REPLICA_HEADER: answer.replica} if answer.replica else {}
        if answer.batch_tasks:
            headers[BATCH_TASKS_HEADER] = str(answer.batch_tasks)
        return JSONResponse(answer.body, answer.status, headers=headers)


def engine_options(settings: Settings) -> dict[str, Any]:
    """The engine deployment's Ray options: replicas (fixed or autoscaled), resources, batching, router."""
    opts: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": settings.ray_replica_cpus,
            "num_gpus": 1 if settings.on_cuda else 0,
        },
    }
    if settings.ray_max_replicas > settings.ray_min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
            "look_back_period_s": settings.ray_autoscale_look_back_s,
            "upscale_delay_s": settings.ray_upscale_delay_s,
            "downscale_delay_s": settings.ray_downscale_delay_s,
        }
    else:
        opts["num_replicas"] = settings.ray_min_replicas
    router: dict[str, Any] = {"request_routing_stats_period_s": settings.ray_routing_stats_period_s}
    if settings.ray_affinity:
        router |= {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"overload": settings.ray_overload_queue},
        }
    opts["request_router_config"] = RequestRouterConfig(**router)
    return opts


def code_fingerprint() -> str:
    """A hash of the e2vpt package's source: the replicas' code version (with their settings)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build_app(settings: Settings) -> serve.Application:
    """The application: ingress -> engine replicas, configured by `settings`."""
    dumped = settings.model_dump(exclude=set(DEPLOYMENT_ONLY))
    # Serve's Python API gives every `serve.run` a random code version, which restarts every replica; the
    # version here is what the replicas are built from, so a new replica count only adds or removes some.
    # (`version` is internal in Serve's options; Serve config files derive it from the import path.)
    version = hashlib.sha256(code_fingerprint().encode())
    version.update(json.dumps(dumped, sort_keys=True, default=str).encode())
    engine = serve.deployment(EngineReplica).options(
        **engine_options(settings), version=version.hexdigest()[:16], _internal=True
    )
    engine = engine.bind(dumped)
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024
    )
    return ingress.bind(engine, dumped)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run e2vpt.rayserve.app:app_builder key=value ...` / a Serve config's `import_path`: settings
    from E2VPT_* variables, `args` (settings field names) as defaults under them."""
    return build_app(settings_with_defaults(dict(args)))


def run(settings: Settings, *, address: str | None = None, blocking: bool = True) -> DeploymentHandle:
    """Start (or join, `address`) a Ray cluster, serve the application over HTTP at ray_http_host:port."""
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": settings.ray_http_host, "port": settings.ray_http_port})
    handle = serve.run(build_app(settings), name=settings.ray_app_name, route_prefix="/")
    log.info("e2vpt on Ray Serve: http://%s:%d", settings.ray_http_host, settings.ray_http_port)
    while blocking:
        time.sleep(3600)
    return handle
