"""PromptStore on real Redis: round trips, atomicity under concurrency, validation at the door, events,
persistence across restarts and outages."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch

from e2vpt.config import get_settings
from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import (
    BadRequest,
    IncompatiblePromptSet,
    InvalidTaskId,
    PreconditionFailed,
    PromptSetTooLarge,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
)
from e2vpt.registry.conditions import ANY, Precondition
from e2vpt.registry.store import PromptStore, StoreEvent
from tests.helpers import RedisServer, tiny_backbone, wait_for
from tests.registry_helpers import bad_uploads, marked_set, marker_of, snapshot

pytestmark = pytest.mark.integration  # real Redis


def contents(s: PromptStore) -> dict[bytes, object]:
    """Logical contents of every key (DUMP bytes are not stable across an AOF reload)."""
    out: dict[bytes, object] = {}
    for k in s.all_keys():
        kind = s.client.type(k)
        out[k] = s.client.hgetall(k) if kind == b"hash" else s.client.zrange(k, 0, -1, withscores=True)
    return out


# ---------------------------------------------------------------------- round trips
def test_register_get_round_trip(store: PromptStore, backbone: Backbone) -> None:
    ps = PromptSet.create("cats", backbone.info, ["a", "b", "c"])
    assert store.current_version("cats") is None
    assert store.register(ps) == 1
    got, v = store.get("cats")
    assert v == 1 and got.labels == ["a", "b", "c"]
    for key, t in ps.tensors().items():
        assert torch.equal(got.tensors()[key], t)
    data, v = store.get_bytes("cats")
    assert data == ps.to_bytes() and v == 1
    ps2, v2, created = store.register_bytes(marked_set(backbone.info, "cats", 2.0).to_bytes())
    assert v2 == 2 and created and marker_of(store.get("cats")[0]) == 2.0
    before = contents(store)
    assert store.register_bytes(ps2.to_bytes())[1:] == (2, False)  # the current file again: nothing written
    assert store.register(ps2) == 2 and contents(store) == before
    assert marker_of(store.get("cats", 2)[0]) == 2.0
    assert torch.equal(store.get("cats", 1)[0].visual, ps.visual)
    assert store.current_versions(["cats", "dogs"]) == {"cats": 2, "dogs": None}
    summ = store.summary("cats")
    assert summ["version"] == 2 and summ["num_classes"] == 3 and summ["metrics"] == {"marker": 2.0}
    assert summ["size"] == len(store.get_bytes("cats")[0]) and len(summ["sha256"]) == 64
    assert store.summary("cats", 1)["version"] == 1


def test_versions_rollback_trim_delete(store: PromptStore, backbone: Backbone) -> None:
    for m in range(1, 4):
        store.register(marked_set(backbone.info, "t", float(m)))
    assert [v["version"] for v in store.versions("t")] == [1, 2, 3]
    assert [v["current"] for v in store.versions("t")] == [False, False, True]
    # rollback makes version 1's content current as a NEW version 4
    assert store.rollback("t", 1) == 4
    ps, v = store.get("t")
    assert v == 4 and marker_of(ps) == 1.0
    assert store.summary("t")["rolled_back_from"] == 1 and store.summary("t")["action"] == "rollback"
    with pytest.raises(VersionNotFound):
        store.rollback("t", 99)
    with pytest.raises(TaskNotFound):
        store.rollback("nope", 1)
    # keep_versions=5: older versions are trimmed, the current one never
    for m in range(5, 9):
        store.register(marked_set(backbone.info, "t", float(m)))
    assert [v["version"] for v in store.versions("t")] == [4, 5, 6, 7, 8]
    with pytest.raises(VersionNotFound):
        store.get("t", 3)
    assert store.client.hlen(store._task_keys("t")[0]) == 5  # blobs really removed
    store.delete("t")
    assert store.current_version("t") is None
    with pytest.raises(TaskNotFound):
        store.get("t")
    with pytest.raises(TaskNotFound):
        store.delete("t")
    with pytest.raises(TaskNotFound):
        store.versions("t")
    # version numbers are never reused after a delete
    assert store.register(marked_set(backbone.info, "t", 9.0)) == 9


def test_list_is_paginated_and_reads_no_blobs(store: PromptStore, backbone: Backbone) -> None:
    ids = [f"task-{i:02d}" for i in range(23)]
    for t in ids:
        store.register(marked_set(backbone.info, t, 1.0))
    store.register(marked_set(backbone.info, "task-05", 2.0))
    seen: list[dict] = []
    cursor: str | int | None = 0
    pages = 0
    while cursor is not None:
        page, cursor = store.list_tasks(cursor=cursor, limit=7)
        seen.extend(page)
        pages += 1
    assert pages == 4 and [s["task_id"] for s in seen] == ids
    assert {s["task_id"]: s["version"] for s in seen}["task-05"] == 2
    assert all("visual" not in s and "labels" not in s for s in seen)
    # listing works with every blob gone: it never reads them
    for t in ids:
        store.client.delete(store._task_keys(t)[0])
    assert len(store.list_tasks(limit=100)[0]) == 23
    assert store.count() == 23
    with pytest.raises(BadRequest):
        store.list_tasks(cursor="!!not-a-cursor", limit=5)
    with pytest.raises(BadRequest):
        store.list_tasks(limit=0)


def test_namespaced_by_backbone(
    redis_url: str, namespace: str, store: PromptStore, backbone: Backbone
) -> None:
    other = tiny_backbone(depth=3)
    other_store = PromptStore(redis_url, other.info, namespace=namespace)
    try:
        store.register(PromptSet.create("shared", backbone.info, ["a"]))
        assert other_store.current_version("shared") is None
        assert other_store.list_tasks()[0] == []
        with pytest.raises(IncompatiblePromptSet):
            other_store.register(PromptSet.create("shared", backbone.info, ["a"]))
    finally:
        other_store.drop_all()


# ---------------------------------------------------------------------- validation at the door
def test_every_malformed_upload_is_refused_and_writes_nothing(
    store: PromptStore, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register(marked_set(backbone.info, "victim", 1.0))
    store.register(marked_set(backbone.info, "bystander", 1.0))
    before = snapshot(store)
    assert len(before) >= 7
    events: list[StoreEvent] = []
    sub = store.subscribe(events.append)
    try:
        for name, (data, exc_type) in bad_uploads(backbone.info).items():
            with pytest.raises(exc_type):
                store.register_bytes(data)
            assert snapshot(store) == before, f"{name}: Redis changed"
        # the object path validates too
        with pytest.raises(IncompatiblePromptSet):
            store.register(PromptSet.create("victim", tiny_backbone(depth=3).info, ["a"]))
        # oversized: over the configured byte limit, refused before parsing
        data = marked_set(backbone.info, "victim", 2.0).to_bytes()
        monkeypatch.setattr(get_settings(), "max_prompt_set_bytes", len(data) - 1)
        with pytest.raises(PromptSetTooLarge):
            store.register_bytes(data)
        with pytest.raises(PromptSetTooLarge):
            store.register(marked_set(backbone.info, "victim", 2.0))
        assert snapshot(store) == before
        monkeypatch.undo()
        time.sleep(0.3)
        assert events == []
    finally:
        sub.stop()
    with pytest.raises(InvalidTaskId):
        store.get("bad id")
    with pytest.raises(InvalidTaskId):
        store.delete("a:b")
    assert marker_of(store.get("victim")[0]) == 1.0


# ---------------------------------------------------------------------- atomicity
def _register_many(url: str, namespace: str, info: dict, worker: int, n: int, keep: int) -> None:
    torch.set_num_threads(1)
    s = PromptStore(url, BackboneInfo.from_dict(info), namespace=namespace, keep_versions=keep)
    for i in range(n):
        s.register(marked_set(s.info, "race", float(worker * 1000 + i)))


def test_concurrent_registration_from_processes_gives_consecutive_versions(
    store: PromptStore, redis_url: str, namespace: str, backbone: Backbone
) -> None:
    workers, per = 4, 12
    ctx = mp.get_context("fork")
    args = (redis_url, namespace, backbone.info.to_dict())
    procs = [ctx.Process(target=_register_many, args=(*args, w, per, 100)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store.keep_versions = 100
    versions = [v["version"] for v in store.versions("race")]
    assert versions == list(range(1, workers * per + 1))
    markers = sorted(marker_of(store.get("race", v)[0]) for v in versions)
    assert markers == sorted(float(w * 1000 + i) for w in range(workers) for i in range(per))
    # each version's summary agrees with its blob
    for v in versions:
        assert store.summary("race", v)["metrics"]["marker"] == store.get("race", v)[0].metrics["marker"]


def _write_sequence(url: str, namespace: str, info: dict, n: int) -> None:
    torch.set_num_threads(1)
    s = PromptStore(url, BackboneInfo.from_dict(info), namespace=namespace, keep_versions=3)
    for k in range(1, n + 1):
        assert s.register(marked_set(s.info, "hot", float(k), num_classes=2)) == k


def test_reader_never_sees_a_mixed_version_during_1000_updates(
    store: PromptStore, redis_url: str, namespace: str, backbone: Backbone
) -> None:
    ctx = mp.get_context("fork")
    writer = ctx.Process(target=_write_sequence, args=(redis_url, namespace, backbone.info.to_dict(), 1000))
    writer.start()
    reads, last = 0, -1
    try:
        while writer.is_alive() or reads == 0:
            try:
                ps, v = store.get("hot")
                summ = store.summary("hot")
            except TaskNotFound:
                continue
            m = marker_of(ps)  # tensors and blob metadata agree
            assert v == m, f"version {v} carries marker {m}"
            assert summ["version"] >= v  # the summary is never older than what we already read
            assert m >= last  # the current version never goes backwards
            last, reads = m, reads + 1
    finally:
        writer.join(60)
    assert writer.exitcode == 0
    assert reads > 10 and store.current_version("hot") == 1000


# ---------------------------------------------------------------------- conditional writes
def test_a_write_whose_condition_fails_changes_nothing(store: PromptStore, backbone: Backbone) -> None:
    def refused(call: Callable[[], object], current: int | None) -> None:
        before = contents(store)
        with pytest.raises(PreconditionFailed) as err:
            call()
        assert err.value.current == current and err.value.http_status == 412
        assert contents(store) == before  # nothing written, not even a version number

    data = [marked_set(backbone.info, "cats", float(k)).to_bytes() for k in range(4)]
    refused(lambda: store.register_bytes(data[0], when=Precondition(if_match=ANY)), None)  # must exist
    refused(lambda: store.register_bytes(data[0], when=Precondition.version(1)), None)
    assert store.register_bytes(data[1], when=Precondition.absent())[1] == 1  # create only
    refused(lambda: store.register_bytes(data[2], when=Precondition.absent()), 1)
    refused(lambda: store.register_bytes(data[2], when=Precondition.version(2)), 1)
    refused(lambda: store.register_bytes(data[2], when=Precondition(if_match=frozenset())), 1)
    refused(lambda: store.register_bytes(data[2], when=Precondition(if_none_match=frozenset({1}))), 1)
    assert store.register_bytes(data[2], when=Precondition(if_match=frozenset({3, 1})))[1] == 2
    assert store.register_bytes(data[3], when=Precondition(if_none_match=frozenset({1})))[1] == 3
    refused(lambda: store.rollback("cats", 1, when=Precondition.version(2)), 3)
    assert store.rollback("cats", 1, when=Precondition.version(3)) == 4
    refused(lambda: store.delete("cats", when=Precondition.version(3)), 4)
    refused(lambda: store.delete("cats", when=Precondition.absent()), 4)
    assert [v["version"] for v in store.versions("cats")] == [1, 2, 3, 4]  # no number was spent
    store.delete("cats", when=Precondition.version(4))
    with pytest.raises(TaskNotFound):
        store.delete("cats", when=Precondition.version(4))
    assert store.register_bytes(data[0], when=Precondition.absent())[1] == 5  # numbers still never reused


def test_conditional_updates_from_racing_writers_lose_none(store: PromptStore, backbone: Backbone) -> None:
    """Read-modify-write with If-Match from 4 threads: every increment lands exactly once."""
    writers, per = 4, 10
    store.keep_versions = 100
    store.register(marked_set(backbone.info, "count", 0.0))
    refusals = [0] * writers

    def increment(w: int) -> None:
        done = 0
        while done < per:
            ps, v = store.get("count")
            try:
                store.register(
                    marked_set(backbone.info, "count", marker_of(ps) + 1), when=Precondition.version(v)
                )
            except PreconditionFailed:
                refusals[w] += 1
                continue
            done += 1

    threads = [threading.Thread(target=increment, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert marker_of(store.get("count")[0]) == writers * per  # no update lost
    assert store.current_version("count") == writers * per + 1
    assert [marker_of(store.get("count", v)[0]) for v in range(1, writers * per + 2)] == list(
        range(writers * per + 1)
    )
    assert sum(refusals) > 0  # the writers did race (else this test would show nothing)


# ---------------------------------------------------------------------- events
def test_events_arrive_for_every_change(store: PromptStore, backbone: Backbone) -> None:
    events: list[StoreEvent] = []
    sub = store.subscribe(events.append)
    try:
        store.register(marked_set(backbone.info, "a", 1.0))
        store.register(marked_set(backbone.info, "b", 1.0))
        store.register(marked_set(backbone.info, "a", 2.0))
        store.rollback("a", 1)
        store.delete("b")
        expected = [
            StoreEvent("a", 1, "register"),
            StoreEvent("b", 1, "register"),
            StoreEvent("a", 2, "register"),
            StoreEvent("a", 3, "rollback"),
            StoreEvent("b", 1, "delete"),
        ]
        assert wait_for(lambda: len(events) >= len(expected))
        time.sleep(0.2)
        assert events == expected
    finally:
        sub.stop()
    assert not sub.alive
    assert StoreEvent.from_json(expected[0].to_json()) == expected[0]
    with pytest.raises(BadRequest):
        StoreEvent.from_json(b'{"task_id": "a"}')
    with pytest.raises(BadRequest):
        StoreEvent.from_json('{"task_id": "a", "version": 1, "action": "explode"}')


# ---------------------------------------------------------------------- persistence and outages
def test_restart_with_aof_keeps_every_version(redis_server: RedisServer, backbone: Backbone) -> None:
    s = PromptStore(redis_server.url, backbone.info, namespace="persist", keep_versions=10)
    for t in ("x", "y"):
        for m in range(1, 5):
            s.register(marked_set(backbone.info, t, float(m)))
    s.rollback("x", 2)
    s.delete("y")
    s.register(marked_set(backbone.info, "y", 9.0))
    before = contents(s)

    def blobs() -> dict[tuple[str, int], bytes]:
        return {(t, v["version"]): s.get_bytes(t, v["version"])[0] for t in ("x", "y") for v in s.versions(t)}

    blobs_before = blobs()
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        s.ping()
    redis_server.start()
    assert wait_for(lambda: _pings(s))
    assert contents(s) == before
    assert blobs() == blobs_before and len(blobs_before) == 6
    assert [v["version"] for v in s.versions("x")] == [1, 2, 3, 4, 5]
    assert marker_of(s.get("x")[0]) == 2.0 and s.get("y")[1] == 5
    assert s.register(marked_set(backbone.info, "x", 7.0)) == 6  # scripts reload after the restart


def _pings(s: PromptStore) -> bool:
    try:
        s.ping()
        return True
    except StoreUnavailable:
        return False


def test_outage_raises_store_unavailable_and_recovers(redis_server: RedisServer, backbone: Backbone) -> None:
    s = PromptStore(redis_server.url, backbone.info, namespace="outage", socket_timeout=1.0)
    s.register(marked_set(backbone.info, "t", 1.0))
    events: list[StoreEvent] = []
    reconnects = threading.Event()
    sub = s.subscribe(events.append, on_reconnect=reconnects.set)
    try:
        redis_server.stop()
        calls: list[Callable[[], object]] = [
            s.ping,
            lambda: s.get("t"),
            lambda: s.get_bytes("t", 1),
            lambda: s.current_version("t"),
            lambda: s.current_versions(["t"]),
            lambda: s.list_tasks(),
            lambda: s.versions("t"),
            lambda: s.register(marked_set(backbone.info, "t", 2.0)),
            lambda: s.rollback("t", 1),
            lambda: s.delete("t"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                call()
        assert sub.alive
        redis_server.start()
        assert wait_for(lambda: _pings(s))
        assert marker_of(s.get("t")[0]) == 1.0
        assert reconnects.wait(15), "the subscription did not reconnect"
        assert s.register(marked_set(backbone.info, "t", 3.0)) == 2
        assert wait_for(lambda: StoreEvent("t", 2, "register") in events)
    finally:
        sub.stop()


def test_fail_fast_a_hung_redis_costs_one_timeout_per_backoff(
    redis_server: RedisServer, backbone: Backbone
) -> None:
    """`fail_fast_ms` (the registry's store): SIGSTOP the redis-server, so calls hang until their socket
    timeout. The first call waits for it; every call after it fails at once without sending Redis anything
    (recorded on the real client) until the backoff has passed; then one call at a time tries Redis again
    while the concurrent ones still fail at once; after SIGCONT, the first try succeeds and the store works."""
    s = PromptStore(redis_server.url, backbone.info, namespace="ff", socket_timeout=0.5, fail_fast_ms=400)
    s.register(marked_set(backbone.info, "t", 1.0))
    sent: list[object] = []
    execute = s.client.execute_command

    def recording(*args: object, **kwargs: object) -> object:
        sent.append(args[0])
        return execute(*args, **kwargs)

    s.client.execute_command = recording  # type: ignore[method-assign]
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="Timeout"):
            s.current_version("t")  # waits for the socket timeout
        assert len(sent) == 1 and s.fail_fast.is_open
        calls: list[Callable[[], object]] = [
            s.ping,
            lambda: s.get("t"),
            lambda: s.list_tasks(),
            lambda: s.register(marked_set(backbone.info, "t", 2.0)),
            lambda: s.delete("t"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="a recent call failed") as caught:
                call()
            assert caught.value.retry_after is not None and 0 <= caught.value.retry_after <= 0.4
        assert len(sent) == 1  # none of them reached Redis
        time.sleep(0.45)
        errors: list[BaseException] = []

        def ping() -> None:
            try:
                s.ping()
            except StoreUnavailable as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ping) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 4 and len(sent) == 2  # one try reached Redis (and timed out), three did not
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    time.sleep(0.45)
    s.ping()  # the try after the backoff: Redis answers
    assert not s.fail_fast.is_open
    assert marker_of(s.get("t")[0]) == 1.0 and s.current_version("t") == 1


def test_raw_redis_errors_never_leak(backbone: Backbone) -> None:
    s = PromptStore("redis://127.0.0.1:1/0", backbone.info, namespace="nowhere", socket_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        s.register(marked_set(backbone.info, "t", 1.0))
    with pytest.raises(StoreUnavailable):
        s.subscribe(lambda e: None)
    assert issubclass(StoreUnavailable, Exception) and not issubclass(StoreUnavailable, redis.RedisError)
