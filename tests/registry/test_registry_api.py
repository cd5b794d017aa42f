"""The registry HTTP API in process (FastAPI TestClient) over a real Redis store."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.promptset import PromptSet
from e2vpt.registry.api import create_app, read_token
from e2vpt.registry.store import PromptStore, StoreEvent
from tests.helpers import RedisServer, wait_for
from tests.registry_helpers import bad_uploads, marked_set, marker_of, snapshot

pytestmark = pytest.mark.integration  # real Redis

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTET = {**AUTH, "Content-Type": "application/octet-stream"}


@pytest.fixture
def app(store: PromptStore) -> FastAPI:
    return create_app(store, token=TOKEN)


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)


def put(client: TestClient, task_id: str, data: bytes, headers: dict[str, str] = OCTET) -> dict:
    r = client.put(f"/tasks/{task_id}", content=data, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def test_round_trip(client: TestClient, store: PromptStore, backbone: Backbone) -> None:
    v1 = marked_set(backbone.info, "cats", 1.0).to_bytes()
    body = put(client, "cats", v1)
    assert body["task_id"] == "cats" and body["version"] == 1 and body["summary"]["num_classes"] == 3
    # multipart upload is the same thing
    v2 = marked_set(backbone.info, "cats", 2.0).to_bytes()
    r = client.put(
        "/tasks/cats", files={"file": ("cats.safetensors", v2, "application/octet-stream")}, headers=AUTH
    )
    assert r.status_code == 201 and r.json()["version"] == 2
    assert marker_of(store.get("cats")[0]) == 2.0
    show = client.get("/tasks/cats").json()
    assert show["version"] == 2 and show["metrics"] == {"marker": 2.0} and show["size"] == len(v2)
    assert client.get("/tasks/cats", params={"version": 1}).json()["metrics"] == {"marker": 1.0}
    r = client.get("/tasks/cats/file", params={"version": 1})
    assert r.status_code == 200 and r.content == v1 and r.headers["X-Task-Version"] == "1"
    assert client.get("/tasks/cats/file").content == v2
    assert [v["version"] for v in client.get("/tasks/cats/versions").json()["versions"]] == [1, 2]
    r = client.post("/tasks/cats/rollback", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"task_id": "cats", "version": 3, "rolled_back_from": 1}
    assert client.get("/tasks/cats/file").content == v1
    for t in ("dogs", "emus", "fish"):
        put(client, t, marked_set(backbone.info, t, 1.0).to_bytes())
    page = client.get("/tasks", params={"limit": 3}).json()
    assert [t["task_id"] for t in page["tasks"]] == ["cats", "dogs", "emus"] and page["next_cursor"]
    page2 = client.get("/tasks", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [t["task_id"] for t in page2["tasks"]] == ["fish"] and page2["next_cursor"] is None
    r = client.delete("/tasks/cats", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    for path in ("/tasks/cats", "/tasks/cats/file", "/tasks/cats/versions"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    assert client.delete("/tasks/cats", headers=AUTH).status_code == 404
    r = client.post("/tasks/cats/rollback", json={"version": 1}, headers=AUTH)
    assert r.status_code == 404
    r = client.get("/tasks/dogs", params={"version": 7})
    assert r.status_code == 404 and r.json()["error"] == "version_not_found"
    r = client.post("/tasks/dogs/rollback", json={"version": 7}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == "version_not_found"


def test_bad_requests(client: TestClient, backbone: Backbone) -> None:
    data = marked_set(backbone.info, "cats", 1.0).to_bytes()
    r = client.put("/tasks/bad:id", content=data, headers=OCTET)
    assert r.status_code == 400 and r.json()["error"] == "invalid_task_id"
    assert client.get("/tasks/-leading-dash").status_code == 400
    r = client.put("/tasks/dogs", content=data, headers=OCTET)
    assert r.status_code == 422 and r.json()["error"] == "task_id_mismatch"
    r = client.put("/tasks/cats", content=data, headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "content type" in r.json()["detail"]
    r = client.put("/tasks/cats", files={"other": ("x", data)}, headers=AUTH)
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.put("/tasks/cats", content=b"", headers=OCTET)
    assert r.status_code == 422
    for params in ({"limit": 0}, {"limit": 5000}, {"limit": "x"}, {"cursor": "%%%"}):
        r = client.get("/tasks", params=params)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", params
    for body in ({}, {"version": 0}, {"version": "one"}, [1]):
        r = client.post("/tasks/cats/rollback", json=body, headers=AUTH)
        assert r.status_code == 400, body
    r = client.get("/tasks/cats", params={"version": -1})
    assert r.status_code == 400


def test_put_is_idempotent(client: TestClient, store: PromptStore, backbone: Backbone) -> None:
    """The current version's file again (a retried upload) creates nothing: 200, same version, no event."""
    v1 = marked_set(backbone.info, "cats", 1.0).to_bytes()
    v2 = marked_set(backbone.info, "cats", 2.0).to_bytes()
    assert put(client, "cats", v1)["created"] is True
    events: list[StoreEvent] = []
    sub = store.subscribe(events.append)
    try:
        before = snapshot(store)
        for headers in (OCTET, {**OCTET, "If-Match": '"1"'}):
            r = client.put("/tasks/cats", content=v1, headers=headers)
            assert r.status_code == 200 and r.headers["ETag"] == '"1"', r.text
            assert r.json()["version"] == 1 and r.json()["created"] is False
        r = client.put("/tasks/cats", files={"file": ("cats.safetensors", v1)}, headers=AUTH)
        assert r.status_code == 200 and r.json()["created"] is False
        assert snapshot(store) == before  # not even registered_at moved
        r = client.put("/tasks/cats", content=v1, headers={**OCTET, "If-None-Match": "*"})
        assert r.status_code == 412  # the condition is checked first: "create only" still refuses
        assert put(client, "cats", v2)["version"] == 2  # new content: a new version, as always
        assert put(client, "cats", v1)["version"] == 3  # an older content is new again
        assert wait_for(lambda: len(events) >= 2)
        time.sleep(0.2)
        assert [(e.version, e.action) for e in events] == [(2, "register"), (3, "register")]
    finally:
        sub.stop()
    text = client.get("/metrics").text
    assert 'e2vpt_registry_changes_total{action="unchanged"} 3.0' in text
    assert 'e2vpt_registry_changes_total{action="register"} 3.0' in text


def test_conditional_requests(client: TestClient, store: PromptStore, backbone: Backbone) -> None:
    """ETag is the version; If-Match / If-None-Match make writes conditional (412, nothing written) and
    reads revalidate (304)."""
    v = [marked_set(backbone.info, "cats", float(k)).to_bytes() for k in range(3)]

    def refused(r: httpx.Response, current: int | None) -> None:
        assert r.status_code == 412, r.text
        body = r.json()
        assert body["error"] == "precondition_failed" and body["current_version"] == current
        assert r.headers.get("ETag") == (None if current is None else f'"{current}"')

    refused(client.put("/tasks/cats", content=v[0], headers={**OCTET, "If-Match": "*"}), None)
    r = client.put("/tasks/cats", content=v[0], headers={**OCTET, "If-None-Match": "*"})
    assert r.status_code == 201 and r.headers["ETag"] == '"1"' and r.json()["version"] == 1
    before = snapshot(store)
    refused(client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-None-Match": "*"}), 1)
    refused(client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-Match": '"2"'}), 1)
    refused(client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-Match": 'W/"1"'}), 1)  # strong only
    refused(client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-Match": '"abc"'}), 1)
    refused(client.post("/tasks/cats/rollback", json={"version": 1}, headers={**AUTH, "If-Match": '"7"'}), 1)
    refused(client.delete("/tasks/cats", headers={**AUTH, "If-Match": '"7"'}), 1)
    for text in ("4", '"4', "W/4", '"1" "2"', '*, "1"', ", ".join(['"1"'] * 300), '"é"', '"\x01"'):
        bad = text.encode("latin-1")  # as sent on the wire
        r = client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-Match": bad})
        assert r.status_code == 400 and "If-Match" in r.json()["detail"], text
        assert client.get("/tasks/cats", headers={"If-None-Match": bad}).status_code == 400, text
    assert snapshot(store) == before
    # a header repeated on several lines is one list: here it names the current version, so no write
    twice = [*OCTET.items(), ("If-None-Match", '"7"'), ("If-None-Match", '"1"')]
    refused(client.put("/tasks/cats", content=v[1], headers=twice), 1)
    r = client.put("/tasks/cats", content=v[1], headers={**OCTET, "If-Match": '"9", "1"'})
    assert r.status_code == 201 and r.headers["ETag"] == '"2"'
    r = client.post("/tasks/cats/rollback", json={"version": 1}, headers={**AUTH, "If-Match": '"2"'})
    assert r.status_code == 200 and r.headers["ETag"] == '"3"' and r.json()["version"] == 3
    # reads: ETag always; If-None-Match naming the version answers 304 without a body
    for path, params in (("/tasks/cats", {}), ("/tasks/cats/file", {}), ("/tasks/cats/file", {"version": 2})):
        r = client.get(path, params=params)
        tag = r.headers["ETag"]
        assert r.status_code == 200 and tag == ('"2"' if params else '"3"')
        for same in (tag, f"W/{tag}", f'"8", {tag}', "*"):
            r = client.get(path, params=params, headers={"If-None-Match": same})
            assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == tag, (path, same)
        r = client.get(path, params=params, headers={"If-None-Match": '"1"'})
        assert r.status_code == 200 and r.content and r.headers["ETag"] == tag
    refused(client.delete("/tasks/cats", headers={**AUTH, "If-None-Match": "*"}), 3)
    r = client.delete("/tasks/cats", headers={**AUTH, "If-Match": '"3"'})
    assert r.status_code == 204
    assert client.get("/tasks/cats", headers={"If-None-Match": "*"}).status_code == 404
    text = client.get("/metrics").text
    assert 'e2vpt_registry_rejections_total{reason="precondition_failed"} 6.0' in text
    op = client.get("/openapi.json").json()["paths"]["/tasks/{task_id}"]
    assert {p["name"] for p in op["put"]["parameters"]} == {"task_id", "If-Match", "If-None-Match"}
    assert {p["name"] for p in op["get"]["parameters"]} == {"task_id", "version", "If-None-Match"}
    assert "412" in op["put"]["responses"] and "304" in op["get"]["responses"]


def test_every_malformed_upload_is_refused_with_its_status(
    client: TestClient, store: PromptStore, backbone: Backbone
) -> None:
    put(client, "victim", marked_set(backbone.info, "victim", 1.0).to_bytes())
    before = snapshot(store)
    expected_status = {"bad task id": 400}
    for name, (data, exc_type) in bad_uploads(backbone.info).items():
        r = client.put("/tasks/victim", content=data, headers=OCTET)
        want = expected_status.get(name, 422)
        assert r.status_code == want, (name, r.status_code, r.text)
        assert r.json()["error"] == exc_type.code and r.json()["detail"], name
        assert snapshot(store) == before, f"{name}: Redis changed"
    metrics = client.get("/metrics").text
    assert 'e2vpt_registry_rejections_total{reason="corrupt_prompt_set"} 6.0' in metrics
    assert 'e2vpt_registry_rejections_total{reason="incompatible_prompt_set"} 2.0' in metrics


def test_oversized_upload_is_413(
    store: PromptStore, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = marked_set(backbone.info, "big", 1.0).to_bytes()
    monkeypatch.setattr(get_settings(), "max_prompt_set_bytes", len(data) - 1)
    client = TestClient(create_app(store, token=TOKEN))
    before = snapshot(store)
    r = client.put("/tasks/big", content=data, headers=OCTET)
    assert r.status_code == 413 and r.json()["error"] == "prompt_set_too_large"
    r = client.put("/tasks/big", files={"file": ("big.safetensors", data)}, headers=AUTH)
    assert r.status_code == 413
    # a streamed body with no Content-Length is cut off by the running count
    r = client.put("/tasks/big", content=iter([data[:1000], data[1000:]]), headers=OCTET)
    assert r.status_code == 413
    assert snapshot(store) == before


def test_auth_is_enforced(store: PromptStore, backbone: Backbone, tmp_path: Path) -> None:
    data = marked_set(backbone.info, "cats", 1.0).to_bytes()
    client = TestClient(create_app(store, token=TOKEN))
    writes = [
        ("PUT", "/tasks/cats", {"content": data}),
        ("POST", "/tasks/cats/rollback", {"json": {"version": 1}}),
        ("DELETE", "/tasks/cats", {}),
    ]
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for method, path, kwargs in writes:
        for headers in bad_headers:
            r = client.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert store.current_version("cats") is None
    put(client, "cats", data)
    assert client.get("/tasks/cats").status_code == 200  # reads are open by default
    # reads can be closed too; the token can come from a secret file
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    settings = Settings(registry_token="ignored", registry_token_file=str(secret), registry_auth_reads=True)
    assert read_token(settings) == "from-a-file"
    closed = TestClient(create_app(store, settings=settings))
    for path in ("/tasks", "/tasks/cats", "/tasks/cats/file", "/tasks/cats/versions"):
        assert closed.get(path).status_code == 401
        assert closed.get(path, headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    assert closed.get("/healthz").status_code == 200 and closed.get("/metrics").status_code == 200
    # no token configured at all: every write is refused
    locked = TestClient(create_app(store, settings=Settings(registry_token=None, registry_token_file=None)))
    assert locked.delete("/tasks/cats", headers={"Authorization": "Bearer "}).status_code == 401
    assert locked.delete("/tasks/cats", headers=AUTH).status_code == 401
    assert store.current_version("cats") == 1


def test_metrics_and_openapi(client: TestClient, backbone: Backbone) -> None:
    data = marked_set(backbone.info, "cats", 1.0).to_bytes()
    put(client, "cats", data)
    client.post("/tasks/cats/rollback", json={"version": 1}, headers=AUTH)
    client.put("/tasks/cats", content=b"junk", headers=OCTET)
    text = client.get("/metrics").text
    assert 'e2vpt_registry_changes_total{action="register"} 1.0' in text
    assert 'e2vpt_registry_changes_total{action="rollback"} 1.0' in text
    assert 'e2vpt_registry_rejections_total{reason="corrupt_prompt_set"} 1.0' in text
    assert "e2vpt_registry_prompt_set_bytes_count 1.0" in text
    assert f"e2vpt_registry_prompt_set_bytes_sum {float(len(data))}" in text
    labels = 'method="PUT",route="/tasks/{task_id}",status="201"'
    assert f"e2vpt_registry_request_duration_seconds_count{{{labels}}} 1.0" in text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/tasks",
        "/tasks/{task_id}",
        "/tasks/{task_id}/file",
        "/healthz",
        "/metrics",
    }
    put_op = schema["paths"]["/tasks/{task_id}"]["put"]
    assert set(put_op["requestBody"]["content"]) == {"application/octet-stream", "multipart/form-data"}
    assert client.get("/docs").status_code == 200


def _wait_healthy(client: TestClient, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/healthz").status_code == 200:
            return True
        time.sleep(0.1)
    return False


def test_redis_down_gives_503_and_recovers(redis_server: RedisServer, backbone: Backbone) -> None:
    store = PromptStore(redis_server.url, backbone.info, namespace="api-outage", socket_timeout=1.0)
    client = TestClient(create_app(store, token=TOKEN))
    data = marked_set(backbone.info, "cats", 1.0).to_bytes()
    put(client, "cats", data)
    assert client.get("/healthz").json()["fingerprint"] == backbone.info.fingerprint
    redis_server.stop()
    requests = [
        ("GET", "/healthz", {}),
        ("GET", "/tasks", {}),
        ("GET", "/tasks/cats", {}),
        ("GET", "/tasks/cats/file", {}),
        ("GET", "/tasks/cats/versions", {}),
        ("PUT", "/tasks/cats", {"content": data, "headers": OCTET}),
        ("POST", "/tasks/cats/rollback", {"json": {"version": 1}, "headers": AUTH}),
        ("DELETE", "/tasks/cats", {"headers": AUTH}),
    ]
    for method, path, kwargs in requests:
        r = client.request(method, path, **kwargs)
        assert r.status_code == 503, (method, path, r.text)
        assert r.json()["error"] == "store_unavailable"
    redis_server.start()
    assert _wait_healthy(client)
    assert client.get("/tasks/cats/file").content == data
    assert put(client, "cats", marked_set(backbone.info, "cats", 2.0).to_bytes())["version"] == 2


def test_app_from_settings_loads_the_backbone(redis_url: str, namespace: str, tmp_path: Path) -> None:
    from e2vpt.core.backbone import save_checkpoint
    from tests.helpers import TINY, tiny_backbone

    bb = tiny_backbone()
    ckpt = save_checkpoint(bb.model, bb.info.name, TINY, tmp_path / "tiny.safetensors")
    settings = Settings(
        redis_url=redis_url, store_namespace=namespace, backbone_checkpoint=str(ckpt), registry_token=TOKEN
    )
    app = create_app(settings)
    client = TestClient(app)
    assert client.get("/healthz").json()["fingerprint"] == bb.info.fingerprint
    put(client, "cats", PromptSet.create("cats", bb.info, ["a"]).to_bytes())
    app.state.store.drop_all()
