"""Issue 13 at the registry: every hostile upload and request body gets its typed 4xx (never a 500), and
Redis holds exactly what it held before each refused upload (store and HTTP API, real Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from e2vpt.config import get_settings
from e2vpt.core.backbone import Backbone
from e2vpt.errors import BadRequest, E2VPTError
from e2vpt.registry.api import create_app
from e2vpt.registry.store import PromptStore, StoreEvent
from tests.helpers import wait_for
from tests.poison import broken_in_memory, deep_json, good_set, hostile_prompt_sets
from tests.registry.test_store import snapshot

pytestmark = pytest.mark.integration  # real Redis

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store(redis_url: str, namespace: str, backbone: Backbone) -> Iterator[PromptStore]:
    s = PromptStore(redis_url, backbone.info, namespace=namespace, keep_versions=5)
    s.register(good_set(backbone.info, "victim"))
    s.register(good_set(backbone.info, "bystander"))
    yield s
    s.drop_all()
    s.close()


def test_store_refuses_every_hostile_set_and_writes_nothing(store: PromptStore, backbone: Backbone) -> None:
    before = snapshot(store)
    for name, (data, exc_type) in hostile_prompt_sets(backbone.info).items():
        with pytest.raises(exc_type):
            store.register_bytes(data, task_id="victim")
        assert snapshot(store) == before, f"{name}: Redis changed"
    for name, (ps, exc_type) in broken_in_memory(backbone.info).items():
        with pytest.raises(exc_type):
            store.register(ps)
        assert snapshot(store) == before, f"{name}: Redis changed"


def test_api_answers_every_hostile_upload_with_its_4xx(store: PromptStore, backbone: Backbone) -> None:
    client = TestClient(create_app(store, token=TOKEN), raise_server_exceptions=False)
    before = snapshot(store)
    for name, (data, exc_type) in hostile_prompt_sets(backbone.info).items():
        r = client.put(
            "/tasks/victim", content=data, headers={**AUTH, "Content-Type": "application/octet-stream"}
        )
        assert r.status_code == exc_type.http_status and r.json()["error"] == exc_type.code, (name, r.text)
        assert snapshot(store) == before, f"{name}: Redis changed"
    # JSON request bodies: bounded size and depth, finite numbers, typed errors
    json_headers = {**AUTH, "Content-Type": "application/json"}
    cases = {
        deep_json(): (413, "request_too_large"),  # 200 KB of brackets: over the JSON body limit
        deep_json(2000): (400, "bad_request"),  # small but deep
        b'{"version": NaN}': (400, "bad_request"),
        b'{"version": 1e999}': (400, "bad_request"),
        b'{"version": [[[[[[[[[[1]]]]]]]]]]}': (400, "bad_request"),
    }
    for body, (status, code) in cases.items():
        r = client.post("/tasks/victim/rollback", content=body, headers=json_headers)
        assert (r.status_code, r.json()["error"]) == (status, code), (body[:40], r.text)
    assert snapshot(store) == before
    r = client.post("/tasks/victim/rollback", json={"version": 1}, headers=AUTH)  # the body still arrives
    assert r.status_code == 200 and r.json()["version"] == 2


def test_listing_copies_bounded_metadata_only(store: PromptStore, backbone: Backbone) -> None:
    limit = get_settings().max_metadata_bytes
    ps = good_set(backbone.info, "big")
    ps.labels = [f"label-{i:05d}-" + "x" * 200 for i in range(3)]
    ps.config = ps.config.updated(note="y" * (limit - len(str(ps.metadata())) - 200))
    store.register(ps)
    ps.config = ps.config.updated(note=ps.config["note"] + "y" * 1000)
    with pytest.raises(E2VPTError):
        store.register(ps)
    client = TestClient(create_app(store, token=TOKEN))
    r = client.get("/tasks", params={"limit": 1000})
    assert r.status_code == 200
    (big,) = [t for t in r.json()["tasks"] if t["task_id"] == "big"]
    assert "labels" not in big
    assert len(r.content) < 3 * (limit + 2048)  # three tasks, each at most the metadata limit plus numbers


def test_options_and_405_list_every_method(store: PromptStore) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    r = client.options("/tasks/victim")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE", "OPTIONS"}
    r = client.patch("/tasks/victim")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE", "OPTIONS"}
    r = client.options("/tasks")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"GET", "OPTIONS"}


def test_hostile_store_events_are_dropped_and_the_subscription_lives(
    store: PromptStore, backbone: Backbone
) -> None:
    """Anyone who can PUBLISH on the events channel: deep or non-finite JSON is refused, typed, and the
    subscriber thread keeps delivering real events."""
    for raw in (deep_json(), b'{"task_id": "a", "version": Infinity, "action": "register"}'):
        with pytest.raises(BadRequest):
            StoreEvent.from_json(raw)
    events: list[StoreEvent] = []
    sub = store.subscribe(events.append)
    try:
        store.client.publish(store.events_channel, deep_json())
        version = store.register(good_set(backbone.info, "victim", num_prompts=3))
        assert version == 2 and wait_for(lambda: StoreEvent("victim", version, "register") in events)
        assert sub.alive
    finally:
        sub.stop()
