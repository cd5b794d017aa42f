"""End to end on a local Ray cluster of three one-CPU "nodes": the Ray Serve application (ingress +
engine replicas with the task-affinity router), a real Redis and the tiny backbone.

The cluster and the application start once for the module; the tests run in file order and build on each
other's state: two replicas first, load makes the autoscaler add a third, then the node of one is removed
under load."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from e2vpt.config import Settings  # noqa: E402
from e2vpt.core.backbone import Backbone  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import image_bytes  # noqa: E402
from e2vpt.dev.localredis import free_port  # noqa: E402
from e2vpt.rayserve.affinity import assignment, owner_and_backup  # noqa: E402
from e2vpt.rayserve.app import BATCH_TASKS_HEADER, ENGINE_DEPLOYMENT, REPLICA_HEADER, build_app  # noqa: E402
from e2vpt.registry.store import PromptStore  # noqa: E402
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result  # noqa: E402
from tests.helpers import make_set, tiny_checkpoint, wait_for  # noqa: E402

pytestmark = pytest.mark.integration

TOKEN = "ray-test-token"
TASKS = [f"t{i}" for i in range(48)]
APP = "e2vpt"
MAX_REQUEST = 200_000


@dataclass
class Served:
    cluster: Cluster
    settings: Settings
    store: PromptStore
    backbone: Backbone
    sets: dict[str, PromptSet]
    url: str

    def headers(self, task: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", **({"X-Task-Id": task} if task else {})}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ray")
    ckpt, backbone = tiny_checkpoint(root / "backbone.safetensors")
    namespace = f"ray-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        backbone_checkpoint=str(ckpt),
        store_namespace=namespace,
        top_k=3,
        image_decode_threads=1,
        cache_version_check_ms=600_000,  # updates must arrive by pub/sub alone
        inference_token=TOKEN,
        ray_min_replicas=2,
        ray_max_replicas=2,
        ray_replica_cpus=1,
        ray_http_port=free_port(),
        ray_max_batch_size=32,
        ray_batch_wait_ms=20,
        ray_overload_queue=4,
        ray_routing_stats_period_s=0.5,
        ray_max_request_size=MAX_REQUEST,
    )
    store = PromptStore(settings.redis_url, backbone.info, namespace=namespace)
    sets = {t: make_set(t, backbone, classes=3 + i % 4, seed=i) for i, t in enumerate(TASKS)}
    for ps in sets.values():
        store.register(ps)
    ray_env = {
        # handles report their load to the autoscaler every 0.5 s (Ray's default, 10 s, is for production)
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        # a loaded 2-core machine (the suite, CI) can take longer than Ray's 5 s / 10 s to start and answer
        # for the HTTP proxy; the controller would kill and restart it in a loop
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    }
    os.environ.update(ray_env)
    # a lost node is noticed within about 2 s (GCS health checks; Ray's defaults take ~15 s)
    fast_failover = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast_failover},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        for attempt in range(3):  # Serve waits 60 s (a constant) for its HTTP proxy; a loaded machine can
            try:  # take longer, and the proxy keeps starting meanwhile: wait again
                serve.start(
                    proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": settings.ray_http_port},
                )
                break
            except TimeoutError:
                if attempt == 2:
                    raise
        serve.run(build_app(settings), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{settings.ray_http_port}/predictions/e2vpt"
        yield Served(cluster, settings, store, backbone, sets, url)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for name in ray_env:
            os.environ.pop(name, None)
        store.drop_all()
        store.close()


def engine_replicas() -> dict[str, Any]:
    """replica id -> actor handle of every live engine replica."""
    prefix = f"SERVE_REPLICA::{APP}#{ENGINE_DEPLOYMENT}#"
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            out[entry["name"][len(prefix) :]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
    return out


def replica_stats() -> dict[str, dict[str, Any]]:
    """replica id -> its routing stats, for the replicas that answer."""
    out = {}
    for rid, actor in engine_replicas().items():
        try:
            out[rid] = ray.get(actor.record_routing_stats.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            continue
    return out


async def _send(
    client: httpx.AsyncClient, served: Served, kind: str, task: str, data: bytes
) -> httpx.Response:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if kind == "json":
        return await client.post(served.url, json={"task_id": task, "image": base64.b64encode(data).decode()},
                                 headers=auth)  # fmt: skip
    if kind == "multipart":
        return await client.post(served.url, data={"task_id": task}, files={"image": ("x.png", data, "image/png")},
                                 headers=auth)  # fmt: skip
    return await client.post(served.url, content=data, headers={**auth, "X-Task-Id": task})


def burst(served: Served, requests: list[tuple[str, str, bytes]]) -> list[httpx.Response]:
    """Send all (kind, task, image) requests at once."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_send(client, served, *r) for r in requests))

    return asyncio.run(run())


def owners_seen(served: Served, tasks: list[str], rounds: int = 2) -> dict[str, set[str]]:
    """Light load (one request at a time): task -> the replicas that answered it."""
    seen: dict[str, set[str]] = defaultdict(set)
    with httpx.Client(timeout=60) as client:
        for _ in range(rounds):
            for t in tasks:
                r = client.post(served.url, content=image_bytes(1), headers=served.headers(t))
                assert r.status_code == 200, r.text
                seen[t].add(r.headers[REPLICA_HEADER])
    return seen


def pinned_to_owners(served: Served, replicas: Iterable[str], rounds: int = 2) -> bool:
    """Light load: every task answered by its owner among `replicas`, and by it alone."""
    seen = owners_seen(served, TASKS, rounds)
    return {t: next(iter(r)) if len(r) == 1 else None for t, r in seen.items()} == assignment(TASKS, replicas)


def test_answers_match_the_single_process_engine(served: Served) -> None:
    kinds = ["raw", "json", "multipart"]
    reqs = [(kinds[i % 3], TASKS[i % 12], image_bytes(100 + i, (40 + i, 32 + i % 5))) for i in range(36)]
    local = MultiTaskEngine.from_settings(served.settings, start=False)
    try:
        expected = local.predict([RequestItem(task, img) for _, task, img in reqs])
    finally:
        local.close()
    for r, exp in zip(burst(served, reqs), expected, strict=True):
        assert r.status_code == 200, r.text
        assert isinstance(exp, Result)
        body = r.json()
        assert (body["task_id"], body["version"]) == (exp.task_id, exp.version)
        assert [p["label"] for p in body["predictions"]] == [p.label for p in exp.predictions]
        assert [p["score"] for p in body["predictions"]] == pytest.approx(
            [p.score for p in exp.predictions], abs=1e-5
        )


def test_bad_requests_get_the_torchserve_statuses(served: Served) -> None:
    img = image_bytes(3)
    with httpx.Client(timeout=60) as client:
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.post(served.url, content=img, headers={**auth, "X-Task-Id": "t1"})
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        cases = [
            ({"X-Task-Id": "no-such-task"}, img, 404, "task_not_found"),
            ({"X-Task-Id": "bad id!"}, img, 400, "invalid_task_id"),
            ({}, img, 400, "bad_request"),  # no task id
            ({"X-Task-Id": "t1"}, b"not an image", 400, "invalid_image"),
            ({"X-Task-Id": "t1", "X-Top-K": "0"}, img, 400, "bad_request"),
            ({"X-Task-Id": "t1"}, b"\0" * (MAX_REQUEST + 1), 413, "request_too_large"),
            ({"X-Task-Id": "t1", "Content-Type": "application/json"}, b"[1, 2]", 400, "bad_request"),
        ]
        for extra, body, status, code in cases:
            r = client.post(served.url, content=body, headers={**served.headers(), **extra})
            assert (r.status_code, r.json()["error"]) == (status, code), r.text
        broken = {"Content-Type": "multipart/form-data; boundary=xyz"}
        r = client.post(served.url, content=b"--xyz\r\nnot a part", headers={**served.headers(), **broken})
        assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text
        assert client.get(served.url.rsplit("/predictions", 1)[0] + "/ping").json() == {"status": "Healthy"}


def test_light_load_pins_every_task_to_its_owner(served: Served) -> None:
    live = list(replica_stats())
    assert len(live) == 2
    # The router in the proxy learns the replicas and their queue lengths asynchronously (Ray's long poll
    # and probes): a replica it does not know yet, or whose probe is late on a loaded machine, sends its tasks
    # to their backups for a while (seen once in ~10 suite runs). Once it knows both, every task is pinned.
    assert wait_for(lambda: pinned_to_owners(served, live), 30)


def test_batches_mix_tasks(served: Served) -> None:
    reqs = [("raw", TASKS[i % 16], image_bytes(i)) for i in range(96)]
    rs = burst(served, reqs)
    assert all(r.status_code == 200 for r in rs)
    mixed = [int(r.headers[BATCH_TASKS_HEADER]) for r in rs]
    assert max(mixed) >= 4, Counter(mixed)  # a batch held several tasks' items
    assert sum(mixed) / len(mixed) > 2, Counter(mixed)


def test_heavy_load_spills_a_task_past_its_owner(served: Served) -> None:
    task = TASKS[0]
    owner, backup = owner_and_backup(task, replica_stats())
    rs = burst(served, [("raw", task, image_bytes(i)) for i in range(128)])
    assert all(r.status_code == 200 for r in rs)
    by_replica = Counter(r.headers[REPLICA_HEADER] for r in rs)
    assert set(by_replica) == {owner, backup}, by_replica  # over its queue limit: the backup helps
    # and at light load it is back on its owner alone, once the router's queue lengths are fresh again
    assert wait_for(lambda: owners_seen(served, [task], rounds=3)[task] == {owner}, 15)


def test_an_update_in_redis_reaches_every_replica(served: Served) -> None:
    task = TASKS[0]  # resident on both replicas since the spill above
    stats = replica_stats()
    assert all(s["resident"].get(task) == 1 for s in stats.values()), stats
    ps = make_set(task, served.backbone, classes=5, seed=99)
    version = served.store.register(ps)
    # pub/sub only (the version check is off in this module)
    assert wait_for(lambda: all(s["resident"].get(task) == version for s in replica_stats().values()), 5.0)
    rs = burst(served, [("raw", task, image_bytes(i)) for i in range(64)])
    assert {r.json()["version"] for r in rs} == {version}
    assert len({r.headers[REPLICA_HEADER] for r in rs}) == 2


def test_load_adds_a_third_replica_which_takes_about_a_third_of_the_tasks(served: Served) -> None:
    before_ids = set(replica_stats())
    before = assignment(TASKS, before_ids)
    autoscaled = served.settings.model_copy(
        update={
            "ray_min_replicas": 2,
            "ray_max_replicas": 3,
            "ray_target_ongoing_requests": 2,
            "ray_autoscale_look_back_s": 2,
            "ray_upscale_delay_s": 0,
        }
    )
    serve.run(build_app(autoscaled), name=APP, route_prefix="/")
    assert set(replica_stats()) == before_ids  # autoscaling switched on in place: nothing restarted
    # load: far more requests in flight than 2 per replica, until the autoscaler adds the third
    assert wait_for(lambda: burst(served, [("raw", t, image_bytes(1)) for t in TASKS * 2]) is not None
                    and len(replica_stats()) == 3, 90)  # fmt: skip
    after_ids = set(replica_stats())
    assert before_ids < after_ids  # the two replicas kept running: scaling restarts nothing
    (new,) = after_ids - before_ids
    after = assignment(TASKS, after_ids)

    # light load again; the router knows the newcomer and fresh queue lengths: every task on its owner
    assert wait_for(lambda: pinned_to_owners(served, after_ids), 30)
    moved = [t for t in TASKS if before[t] != after[t]]
    assert all(after[t] == new for t in moved)
    assert 0.15 <= len(moved) / len(TASKS) <= 0.55, len(moved)


def test_a_node_lost_under_load_costs_no_request_and_its_tasks_move(served: Served) -> None:
    stats = replica_stats()
    head = served.cluster.head_node.node_id
    victim_id, victim = next((rid, s) for rid, s in stats.items() if s["node"] != head)
    node = next(n for n in served.cluster.list_all_nodes() if n.node_id == victim["node"])
    concurrency, answers, errors = 8, [], []
    stop = threading.Event()

    async def client_loop(worker: int) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            i = 0
            while not stop.is_set():
                task = TASKS[(worker * 7 + i) % len(TASKS)]
                try:
                    r = await _send(client, served, "raw", task, image_bytes(i))
                    answers.append(r)
                except httpx.HTTPError as exc:
                    errors.append(exc)
                i += 1

    async def load() -> None:
        await asyncio.gather(*(client_loop(w) for w in range(concurrency)))

    thread = threading.Thread(target=asyncio.run, args=(load(),))
    thread.start()
    try:
        assert wait_for(lambda: len(answers) >= 40, 60)
        served.cluster.remove_node(node, allow_graceful=False)
        done = len(answers)
        assert wait_for(lambda: len(answers) >= done + 80, 120)
    finally:
        stop.set()
        thread.join(180)
    failed = [r for r in answers if r.status_code != 200]
    assert len(failed) + len(errors) <= concurrency, [r.text for r in failed][:3]  # at most those in flight
    survivors = set(replica_stats())
    assert victim_id not in survivors and len(survivors) == 2
    # the lost replica's tasks on their backups, the others where they were, once the router has let it go
    assert wait_for(lambda: pinned_to_owners(served, survivors, rounds=1), 30)
