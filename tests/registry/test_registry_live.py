"""The registry served by `python -m e2vpt.cli registry serve` (real uvicorn, real Redis), and the
`e2vpt tasks` CLI end to end against it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from e2vpt.cli import main as cli_main
from e2vpt.core.backbone import save_checkpoint
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.registry import registry_server
from e2vpt.errors import RegistryRequestError, RegistryUnreachable, StoreUnavailable
from e2vpt.registry.cli import EXIT_NOINPUT, EXIT_NOPERM, EXIT_REFUSED, EXIT_UNAVAILABLE
from e2vpt.registry.client import RegistryClient
from e2vpt.registry.store import PromptStore
from tests.helpers import TINY, RedisServer, free_port, tiny_backbone, wait_for
from tests.registry_helpers import marked_set, marker_of

pytestmark = pytest.mark.integration  # real Redis

TOKEN = "live-test-token"
MAX_BYTES = 200_000


@dataclass
class LiveRegistry:
    url: str
    port: int
    store: PromptStore


@contextmanager
def registry_process(redis_url: str, tmp: Path, **env_extra: str) -> Iterator[LiveRegistry]:
    """`e2vpt registry serve` in a child process on the tiny backbone, a fresh namespace of `redis_url`."""
    bb = tiny_backbone()
    ckpt = save_checkpoint(bb.model, bb.info.name, TINY, tmp / "tiny.safetensors")
    (tmp / "token").write_text(TOKEN + "\n")
    namespace = f"test-live-{uuid.uuid4().hex[:8]}"
    env = {
        "E2VPT_STORE_NAMESPACE": namespace,
        "E2VPT_REGISTRY_TOKEN_FILE": str(tmp / "token"),
        "E2VPT_MAX_PROMPT_SET_BYTES": str(MAX_BYTES),
        **env_extra,
    }
    store = PromptStore(redis_url, bb.info, namespace=namespace)
    try:
        with registry_server(ckpt, redis_url, tmp / "server.log", **env) as url:
            yield LiveRegistry(url, int(url.rsplit(":", 1)[1]), store)
    finally:
        with suppress(StoreUnavailable):
            store.drop_all()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRegistry]:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    with registry_process(redis_url, tmp_path_factory.mktemp("registry")) as registry:
        yield registry


def raw_request(port: int, head: str, body_chunks: list[bytes]) -> bytes:
    """Send a request by hand (no client library buffering) and return what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head.encode())
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:  # the server may close early after answering: that is the point
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def test_declared_oversize_is_refused_before_the_body_is_sent(live: LiveRegistry) -> None:
    head = (
        f"PUT /tasks/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {10**9}\r\n\r\n"
    )
    answer = raw_request(live.port, head, [b"\x00" * 1024])  # 1 KiB of a declared 1 GB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_streamed_oversize_is_cut_off_at_the_limit(live: LiveRegistry) -> None:
    head = (
        f"PUT /tasks/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"\x00" * 65536
    # 4 chunks (256 KiB) exceed the 200 kB limit; the body is never terminated, so the only way the
    # server can answer is by refusing before it has read the whole (endless) body
    answer = raw_request(live.port, head, [b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * 4)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert live.store.current_version("big") is None


def cli(*args: str, live: LiveRegistry, token: str | None = TOKEN) -> int:
    argv = ["tasks", args[0], "--url", live.url, *(["--token", token] if token else []), *args[1:]]
    return cli_main(argv)


def test_cli_end_to_end(live: LiveRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = live.store.info
    files = []
    for t, m in (("cli-a", 1.0), ("cli-b", 1.0), ("cli-a", 2.0)):
        files.append(marked_set(info, t, m).save(tmp_path / "in" / f"{t}-{m}.safetensors"))
    assert cli("register", *map(str, files), live=live) == 0
    out = capsys.readouterr().out
    assert "cli-a\tversion 1" in out and "cli-b\tversion 1" in out and "cli-a\tversion 2" in out
    assert cli("list", live=live) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["TASK", "VERSION", "METHOD"]
    assert [line.split()[:2] for line in out[1:]] == [["cli-a", "2"], ["cli-b", "1"]]
    assert cli("list", "--json", live=live) == 0
    assert [t["task_id"] for t in json.loads(capsys.readouterr().out)] == ["cli-a", "cli-b"]
    # compact by default: one field a line, scalar metrics included; --json: the registry's full summary
    assert cli("show", "cli-a", "--version", "1", live=live) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert shown["task_id"] == "cli-a" and shown["version"] == "1" and shown["metrics.marker"] == "1"
    assert cli("show", "cli-a", "--version", "1", "--json", live=live) == 0
    assert '"marker": 1.0' in capsys.readouterr().out
    assert cli("versions", "cli-a", live=live) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].split()[:3] == ["VERSION", "CURRENT", "ACTION"]
    assert [line.split()[:3] for line in out[1:]] == [["1", "no", "register"], ["2", "yes", "register"]]
    assert cli("versions", "cli-a", "--json", live=live) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1, 2]
    assert cli("rollback", "cli-a", "1", live=live) == 0
    assert "cli-a\tversion 3" in capsys.readouterr().out
    assert marker_of(live.store.get("cli-a")[0]) == 1.0
    # export -> delete everything -> import restores the same content
    backup = tmp_path / "backup"
    assert cli("export", str(backup), live=live) == 0
    capsys.readouterr()
    assert sorted(p.name for p in backup.iterdir()) == ["cli-a.safetensors", "cli-b.safetensors"]
    assert (backup / "cli-b.safetensors").read_bytes() == live.store.get_bytes("cli-b")[0]
    assert cli("delete", "cli-a", live=live) == 0 and cli("delete", "cli-b", live=live) == 0
    assert live.store.current_version("cli-a") is None
    assert cli("import", str(backup), live=live) == 0
    capsys.readouterr()
    assert marker_of(live.store.get("cli-a")[0]) == 1.0 and live.store.current_version("cli-a") == 4
    assert PromptSet.load(backup / "cli-b.safetensors").task_id == "cli-b"


def test_cli_conditional_changes(
    live: LiveRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--if-version / --if-absent / --skip-existing: a condition that does not hold exits 1, changes nothing."""
    info = live.store.info
    v1, v2, v3 = (
        marked_set(info, "cond", m).save(tmp_path / f"cond-{m}.safetensors") for m in (1.0, 2.0, 3.0)
    )
    other = marked_set(info, "cond-other", 1.0).save(tmp_path / "cond-other.safetensors")
    assert cli("register", str(v1), "--if-absent", live=live) == 0
    assert cli("register", str(v2), "--if-absent", live=live) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "task 'cond' is at version 1" in err and "nothing was changed" in err
    assert cli("register", str(v2), "--if-version", "7", live=live) == EXIT_REFUSED
    assert cli("register", str(v2), "--if-version", "1", live=live) == 0
    assert cli("register", str(v2), str(v3), "--if-version", "2", live=live) == 2  # one version, one file
    assert cli("rollback", "cond", "1", "--if-version", "1", live=live) == EXIT_REFUSED
    assert cli("delete", "cond", "--if-version", "1", live=live) == EXIT_REFUSED
    assert live.store.current_version("cond") == 2 and marker_of(live.store.get("cond")[0]) == 2.0
    assert cli("rollback", "cond", "1", "--if-version", "2", live=live) == 0
    capsys.readouterr()
    # import --skip-existing registers what is missing and leaves the rest as it is
    folder = tmp_path / "restore"
    folder.mkdir()
    for path in (v3, other):
        (folder / path.name).write_bytes(path.read_bytes())
    assert cli("import", str(folder), "--skip-existing", live=live) == 0
    out, err = capsys.readouterr()
    assert "cond-other\tversion 1" in out and "cond-3.0.safetensors: skipped" in err
    assert live.store.current_version("cond") == 3 and marker_of(live.store.get("cond")[0]) == 1.0
    assert cli("delete", "cond", "--if-version", "3", live=live) == 0
    assert cli("delete", "cond-other", live=live) == 0


def test_cli_errors_and_exit_codes(
    live: LiveRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = marked_set(live.store.info, "cli-err", 1.0).save(tmp_path / "good.safetensors")
    assert cli("register", str(good), live=live, token="wrong") == EXIT_NOPERM
    assert "refused" in capsys.readouterr().err
    assert cli("show", "no-such-task", live=live) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "HTTP 404 task_not_found" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:100])
    assert cli("register", str(bad), live=live) == EXIT_REFUSED
    assert "bad.safetensors: refused" in capsys.readouterr().err
    assert cli("register", str(tmp_path / "missing.safetensors"), live=live) == EXIT_NOINPUT
    # what is not a prompt-set file is refused before it is read: a FIFO (the open would block), a device
    # (read forever), a file over the size limit (read whole, then refused by the registry)
    os.mkfifo(tmp_path / "fifo.safetensors")
    assert cli("register", str(tmp_path / "fifo.safetensors"), "/dev/zero", live=live) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "fifo.safetensors is not a regular file" in err and "/dev/zero is not a regular file" in err
    huge = tmp_path / "huge.safetensors"
    with huge.open("wb") as f:
        f.truncate(65 * 2**20)  # sparse: over the 64 MiB default without writing it
    assert cli("register", str(huge), live=live) == EXIT_REFUSED
    assert "huge.safetensors is 68157440 bytes; the limit is 67108864" in capsys.readouterr().err
    assert cli("import", str(tmp_path / "nope"), live=live) == EXIT_NOINPUT
    assert cli_main(["tasks", "list", "--url", f"http://127.0.0.1:{free_port()}"]) == EXIT_UNAVAILABLE
    assert "unreachable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["tasks", "bogus"])
    assert exc.value.code == 2


def test_a_hung_redis_never_queues_requests_or_the_liveness_probe(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGSTOP the registry's redis-server (connections hang; each Redis call would wait the 8 s socket
    timeout). The first request waits for it and gets 503; from then on, for the backoff, requests answer
    503 at once, so 60 concurrent reads (more than uvicorn's 40 worker threads) and the liveness probe
    under them all answer well inside 4 s, where each would otherwise hold a thread for 8 s. SIGCONT: the
    first request after the backoff finds Redis again."""
    with registry_process(
        redis_server.url, tmp_path, E2VPT_STORE_SOCKET_TIMEOUT="8", E2VPT_REGISTRY_STORE_BACKOFF_MS="5000"
    ) as live:
        live.store.register(marked_set(live.store.info, "hung", 1.0))
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            first = httpx.get(f"{live.url}/tasks/hung", timeout=30)  # waits for the socket timeout
            assert first.status_code == 503 and first.json()["error"] == "store_unavailable"
            with ThreadPoolExecutor(60) as pool:
                reads = [pool.submit(httpx.get, f"{live.url}/tasks/hung", timeout=4) for _ in range(60)]
                probe = httpx.get(f"{live.url}/healthz", timeout=4)
                answers = [f.result() for f in reads]
            assert probe.status_code == 503 and "retried every 5000 ms" in probe.json()["detail"]
            assert 1 <= int(probe.headers["Retry-After"]) <= 5
            assert {r.status_code for r in answers} == {503}
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert wait_for(lambda: httpx.get(f"{live.url}/healthz", timeout=30).status_code == 200, timeout=30)
        assert httpx.get(f"{live.url}/tasks/hung", timeout=30).json()["version"] == 1


def test_clients_retry_what_is_safe_to_retry(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down, fail-fast off: the registry answers 503 without Retry-After (a Redis call failed, its
    outcome unknown). A rollback (POST) is not repeated; a read is; a PUT is (a repeat of an applied PUT is a
    no-op) and lands once Redis is back. No registry at all: nothing was sent, so even a POST is retried."""
    caplog.set_level(logging.WARNING, logger="e2vpt.registry.client")
    env = {"E2VPT_REGISTRY_STORE_BACKOFF_MS": "0", "E2VPT_STORE_SOCKET_TIMEOUT": "2"}
    with registry_process(redis_server.url, tmp_path, **env) as live:
        info = live.store.info
        with RegistryClient(live.url, TOKEN, retries=4) as client:
            assert client.register(marked_set(info, "retry", 1.0).to_bytes(), "retry")["version"] == 1
            redis_server.stop()
            with pytest.raises(RegistryRequestError) as err:
                client.rollback("retry", 1)
            assert err.value.http_status == 503 and not caplog.records  # not repeated
            with pytest.raises(RegistryRequestError) as err, RegistryClient(live.url, retries=2) as reader:
                reader.show("retry")
            assert err.value.http_status == 503 and len(caplog.records) == 2  # a read: retried twice
            caplog.clear()
            back = threading.Timer(1.0, redis_server.start)
            back.start()
            try:
                out = client.register(marked_set(info, "retry", 2.0).to_bytes(), "retry")
            finally:
                back.join()
            assert out["version"] == 2 and out["created"] and caplog.records  # retried, then landed once
            assert [v["version"] for v in client.versions("retry")] == [1, 2]
    caplog.clear()
    nobody = RegistryClient(f"http://127.0.0.1:{free_port()}", TOKEN, retries=2)
    with nobody, pytest.raises(RegistryUnreachable):
        nobody.rollback("retry", 1)
    assert len(caplog.records) == 2 and "ConnectError" in caplog.records[0].getMessage()
