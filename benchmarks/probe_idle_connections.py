"""Do the HTTP front ends close connections that never finish a request (slowloris)? One run, both servers.

    .venv/bin/python benchmarks/probe_idle_connections.py [--seconds 60] [--out benchmarks/results/idle_connections.json]

Starts a private redis-server, TorchServe (the product's handler, tiny backbone, one worker) and the registry
API (`e2vpt registry serve`, uvicorn), opens three connections to each and leaves them: one that sends
nothing, one that stops inside its request headers, one that sends headers and 3 of 1,000 announced body
bytes (authorised, for the registry). Then it reports, at intervals up to `--seconds`, whether the server
still holds each one open. A connection held open forever costs the server a socket and a descriptor: many
of them shut everyone else out, which a proxy's header and body timeouts prevent.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.dev.localredis import LocalRedis, free_port  # noqa: E402
from e2vpt.dev.registry import registry_server  # noqa: E402
from e2vpt.dev.tiny import tiny_checkpoint  # noqa: E402
from e2vpt.torchserve.archive import TorchServe, build_mar  # noqa: E402

TOKEN = "probe"


def state(s: socket.socket) -> str:
    """ "open" (nothing to read yet), "closed" (the server closed it), or "answered" (it sent a response)."""
    s.settimeout(0.05)
    try:
        return "closed" if s.recv(65536) == b"" else "answered"
    except TimeoutError:
        return "open"
    except OSError:
        return "closed"


def stalled(port: int, path: str, auth: str) -> dict[str, socket.socket]:
    def conn(data: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(data)
        return s

    head = f"PUT {path} HTTP/1.1\r\nHost: probe\r\n{auth}Content-Type: application/octet-stream\r\n"
    return {
        "sends nothing": conn(b""),
        "stops in its headers": conn(f"GET {path} HTTP/1.1\r\nHost: probe\r\n".encode()),
        "stops in its body": conn((head + "Content-Length: 1000\r\n\r\nabc").encode()),
    }


def watch(conns: dict[str, dict[str, socket.socket]], seconds: float) -> list[dict[str, object]]:
    """The state of every connection at 1, 10, 30, 60, 120 and 300 s (up to `seconds`), printed as it goes."""
    t0, rows = time.monotonic(), []
    for at in [t for t in (1, 10, 30, 60, 120, 300) if t <= seconds] or [seconds]:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        row = {
            "seconds": at,
            **{f"{srv}: {kind}": state(s) for srv, c in conns.items() for kind, s in c.items()},
        }
        rows.append(row)
        print(
            f"after {at:>4} s: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "seconds"), flush=True
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "idle_connections.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = LocalRedis(port=free_port(), workdir=root / "redis", appendonly=False).start()
        ckpt, _ = tiny_checkpoint(root / "tiny.safetensors")
        ts = TorchServe(build_mar(root / "mar", checkpoint=ckpt), root / "ts", workers=1,
                        env={"E2VPT_REDIS_URL": redis.url}).start()  # fmt: skip
        env = {"E2VPT_REGISTRY_TOKEN": TOKEN}
        try:
            with registry_server(ckpt, redis.url, root / "registry.log", **env) as url:
                ts_port = int(ts.predictions_url.rsplit(":", 1)[1].split("/")[0])
                port = int(url.rsplit(":", 1)[1])
                ts_auth = "".join(f"{k}: {v}\r\n" for k, v in ts.auth().items())
                conns = {
                    "torchserve (inference port)": stalled(ts_port, "/predictions/e2vpt", ts_auth),
                    "registry (uvicorn)": stalled(port, "/tasks/probe", f"Authorization: Bearer {TOKEN}\r\n"),
                }
                try:
                    rows = watch(conns, args.seconds)
                finally:
                    for s in (s for c in conns.values() for s in c.values()):
                        s.close()  # uvicorn waits for open connections before it exits
        finally:
            ts.stop()
            redis.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
