"""`PromptStore`: the Redis system of record for prompt sets (versioned, atomic, namespaced by backbone).

Key layout (``P = "{namespace}:{backbone fingerprint}"``; task ids never contain ':'):

    P:current               hash   task_id -> current version
    P:counter               hash   task_id -> last version ever allocated (survives delete: versions of a
                                   task id only ever grow, so a replica can never mistake old content for new)
    P:summary               hash   task_id -> JSON summary of the current version (listing never reads blobs)
    P:index                 zset   task ids, all score 0 (lexicographic, cursor-paginated listing)
    P:task:{id}:blob        hash   version -> prompt-set bytes (metadata and tensors in one value)
    P:task:{id}:info        hash   version -> JSON summary of that version (without the version number)
    P:task:{id}:versions    zset   version numbers (score = version), trimmed to `keep_versions`
    P:events                pub/sub channel of `StoreEvent` JSON

Atomicity: every change is one Lua script that allocates the version, writes blob and info, moves the
current pointer, updates summary and index, trims old versions and publishes the event. A reader of the
current version uses one script too (pointer and blob read together); a version's metadata and tensors
live in the same value, so no reader can see metadata of one version with tensors of another.
A rollback does not rewrite history: it makes the content of an older version current as a NEW version.
A write may carry a `Precondition` (If-Match / If-None-Match on the current version), checked inside the
same script; a registration of the current version's file again (same sha256) writes nothing.
Scripts address per-task keys and the namespace's shared keys together: single-node Redis (or one shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

import redis
import redis.exceptions as rexc

from e2vpt.config import PromptLimits, Settings, get_settings
from e2vpt.core import safejson
from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.promptset import PromptSet, check_task_id
from e2vpt.errors import (
    BadRequest,
    InvalidTaskId,
    PreconditionFailed,
    PromptSetTooLarge,
    StoreUnavailable,
    TaskIdMismatch,
    TaskNotFound,
    VersionNotFound,
)
from e2vpt.registry.conditions import LUA_HOLDS, NO_CONDITION, Precondition

log = logging.getLogger(__name__)

ACTIONS = ("register", "rollback", "delete")
MAX_LIST_LIMIT = 1000

# Returns {version, 1}, or {current version, 0} when a register brings the current content again (same
# sha256: nothing is written, no event). A condition that does not hold: the error "PRECONDITION <current
# version, 0 if none> <task id>", nothing written.
# KEYS: 1 current, 2 counter, 3 summary, 4 index, 5 blob, 6 info, 7 versions
# ARGV: 1 task_id, 2 blob (or "" for rollback), 3 info json, 4 keep, 5 channel, 6 action, 7 source version,
#       8 If-Match, 9 If-None-Match (`Precondition.lua_args`)
_CHANGE_LUA = (
    LUA_HOLDS
    + """
local task = ARGV[1]
local blob = ARGV[2]
local cur = tonumber(redis.call('HGET', KEYS[1], task) or '0')
if not holds(ARGV[8], ARGV[9], cur) then return redis.error_reply('PRECONDITION ' .. cur .. ' ' .. task) end
if ARGV[6] == 'register' and cur > 0 then  -- the current content again: nothing to do (PUT is idempotent)
  local current = redis.call('HGET', KEYS[3], task)
  if current and cjson.decode(current)['sha256'] == cjson.decode(ARGV[3])['sha256'] then return {cur, 0} end
end
if ARGV[6] == 'rollback' then
  blob = redis.call('HGET', KEYS[5], ARGV[7])
  if not blob then return redis.error_reply('NOVERSION version ' .. ARGV[7] .. ' of ' .. task) end
end
local v = redis.call('HINCRBY', KEYS[2], task, 1)
if v <= cur then
  v = cur + 1
  redis.call('HSET', KEYS[2], task, v)
end
redis.call('HSET', KEYS[5], v, blob)
redis.call('HSET', KEYS[6], v, ARGV[3])
redis.call('ZADD', KEYS[7], v, v)
redis.call('HSET', KEYS[1], task, v)
redis.call('HSET', KEYS[3], task, '{"version":' .. v .. ',' .. string.sub(ARGV[3], 2))
redis.call('ZADD', KEYS[4], 0, task)
local keep = tonumber(ARGV[4])
while redis.call('ZCARD', KEYS[7]) > keep do
  local old = redis.call('ZPOPMIN', KEYS[7])
  redis.call('HDEL', KEYS[5], old[1])
  redis.call('HDEL', KEYS[6], old[1])
end
redis.call('PUBLISH', ARGV[5], cjson.encode({task_id = task, version = v, action = ARGV[6]}))
return {v, 1}
"""
)

# KEYS: 1 current, 2 summary, 3 index, 4 blob, 5 info, 6 versions
# ARGV: 1 task_id, 2 channel, 3 If-Match, 4 If-None-Match
_DELETE_LUA = (
    LUA_HOLDS
    + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
if not holds(ARGV[3], ARGV[4], tonumber(v)) then
  return redis.error_reply('PRECONDITION ' .. v .. ' ' .. ARGV[1])
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
redis.call('PUBLISH', ARGV[2], cjson.encode({task_id = ARGV[1], version = tonumber(v), action = 'delete'}))
return tonumber(v)
"""
)

# KEYS: 1 current, 2 blob ; ARGV: 1 task_id  -> {version, blob} of the current version, read together
_GET_CURRENT_LUA = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
return {v, redis.call('HGET', KEYS[2], v)}
"""

# KEYS: 1 index, 2 summary ; ARGV: 1 min (lex), 2 count -> {ids..., summaries...} read together
_LIST_LUA = """
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return {} end
local sums = redis.call('HMGET', KEYS[2], unpack(ids))
local out = {}
for i = 1, #ids do out[#out + 1] = ids[i]; out[#out + 1] = sums[i] or '' end
return out
"""


class Registered(NamedTuple):
    """What a registration did: the validated set, its version, and whether that version is new (False:
    the file was the current version's, nothing was written)."""

    prompt_set: PromptSet
    version: int
    created: bool


@dataclass(frozen=True)
class StoreEvent:
    """One change of the store, published as JSON on `PromptStore.events_channel`."""

    task_id: str
    version: int
    action: str  # "register" | "rollback" | "delete"

    def to_json(self) -> str:
        return json.dumps({"task_id": self.task_id, "version": self.version, "action": self.action})

    @classmethod
    def from_json(cls, data: bytes | str) -> StoreEvent:
        obj = safejson.loads(data, max_depth=2, what="store event")  # anyone may PUBLISH: bounded
        try:
            event = cls(task_id=str(obj["task_id"]), version=int(obj["version"]), action=str(obj["action"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequest(f"not a store event: {data!r}") from exc
        if event.action not in ACTIONS:
            raise BadRequest(f"unknown store event action {event.action!r}")
        return event


@contextmanager
def _wrap_redis() -> Iterator[None]:
    """Connection and timeout errors of Redis always surface as `StoreUnavailable`."""
    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        raise StoreUnavailable(f"prompt store (Redis) unavailable: {exc}") from exc
    except rexc.ResponseError as exc:
        if "NOVERSION" in str(exc):
            raise VersionNotFound(str(exc).split("NOVERSION", 1)[1].strip()) from exc
        if "PRECONDITION" in str(exc):
            raise _precondition_failed(str(exc).split("PRECONDITION", 1)[1]) from exc
        if str(exc).startswith(("LOADING", "MASTERDOWN", "READONLY")):
            raise StoreUnavailable(f"prompt store (Redis) unavailable: {exc}") from exc
        raise


def _precondition_failed(reply: str) -> PreconditionFailed:
    """The error of a script's "PRECONDITION <current> <task id>" reply."""
    current, task_id = reply.split(maxsplit=1)
    where = f"is at version {current}" if int(current) else "is not registered"
    return PreconditionFailed(
        f"task {task_id!r} {where}: the request's condition (If-Match / If-None-Match) does not hold; "
        "nothing was changed",
        current=int(current) or None,
    )


class FailFast:
    """After a Redis call fails (StoreUnavailable), calls fail at once for `backoff_s`; then one call at a
    time tries Redis again (the others still fail at once) until one gets an answer. A Redis that hangs
    rather than refuses then costs one socket timeout per `backoff_s`, not one per call, and callers (the
    registry's request threads, its liveness probe) are never queued behind calls that are all waiting for
    the timeout. `backoff_s` <= 0: off. Thread-safe.

    The serving cache keeps its own policy (`PromptCache`): there no request ever tries Redis while it is
    down, a background probe does, because a batch must not wait for a timeout."""

    def __init__(self, backoff_s: float) -> None:
        self.backoff_s = backoff_s
        self._open_until: float | None = None  # None: closed (Redis answered last)
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def check(self) -> None:
        """Raise StoreUnavailable while open, except for the one call that may try Redis again."""
        if self.backoff_s <= 0 or self._open_until is None:
            return
        with self._lock:
            if self._open_until is None:
                return
            left = self._open_until - time.monotonic()
            if self._probing or left > 0:
                raise StoreUnavailable(
                    "prompt store (Redis) unavailable (a recent call failed; "
                    f"retried every {self.backoff_s * 1000:.0f} ms)",
                    retry_after=max(left, 0.0),
                )
            self._probing = True

    def done(self, answered: bool) -> None:
        """The outcome of a call that `check` let through: Redis answered it (whatever the answer) or not."""
        if self.backoff_s <= 0:
            return
        with self._lock:
            if answered:
                if self._open_until is not None:
                    log.info("prompt store answers again")
                self._open_until = None
            else:
                if self._open_until is None:
                    log.warning("prompt store unavailable: failing fast for %.0f ms", self.backoff_s * 1000)
                self._open_until = time.monotonic() + self.backoff_s
            self._probing = False


# Listing cursors: "0" (or "") is the start; "~<task id>" continues after that task id ('~' never occurs
# in a task id). Any cursor of this form is a valid position, even for a task id that no longer exists.
CURSOR_PATTERN = r"^(0?|~[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"


def _encode_cursor(task_id: str) -> str:
    return f"~{task_id}"


def _decode_cursor(cursor: str | int | None) -> str | None:
    """None = from the start; otherwise the task id after which the page starts."""
    if cursor in (0, "0", "", None):
        return None
    text = str(cursor)
    if not text.startswith("~"):
        raise BadRequest(f"invalid cursor {cursor!r}: use '0' or a next_cursor from a listing")
    try:
        return check_task_id(text[1:])
    except InvalidTaskId as exc:
        raise BadRequest(f"invalid cursor {cursor!r}: use '0' or a next_cursor from a listing") from exc


class Subscription:
    """A background thread delivering `StoreEvent`s to a handler; `stop()` ends it.

    It survives Redis outages: it reconnects and resubscribes by itself, and calls `on_reconnect` (if
    given) after every reconnection, so a replica can re-check versions for the messages it missed.
    """

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        handler: Callable[[StoreEvent], None],
        on_reconnect: Callable[[], None] | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self._client, self.channel, self._handler = client, channel, handler
        self._on_reconnect, self._poll = on_reconnect, poll_interval
        self._stop = threading.Event()
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        with _wrap_redis():
            self._pubsub.subscribe(channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait for the confirmation: no event is missed after return
                msg = self._pubsub.get_message(timeout=0.5)
                if msg and msg["type"] == "subscribe":
                    break
            else:
                raise StoreUnavailable("no subscription confirmation from Redis")
        self._thread = threading.Thread(target=self._run, name=f"store-events:{channel}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        broken = False
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=self._poll)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                if not broken:
                    log.warning("store event subscription lost (%s); reconnecting", exc)
                broken = True
                self._stop.wait(0.5)
                continue
            except Exception:  # a closed pubsub during stop(), or a bug: never kill the thread silently
                if self._stop.is_set():
                    return
                log.exception("store event subscription error")
                self._stop.wait(0.5)
                continue
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                if broken:
                    broken = False
                    log.info("store event subscription restored")
                    if self._on_reconnect is not None:
                        try:
                            self._on_reconnect()
                        except Exception:
                            log.exception("store on_reconnect handler failed")
                continue
            if msg["type"] != "message":
                continue
            try:
                event = StoreEvent.from_json(msg["data"])
            except BadRequest:
                log.warning("ignoring malformed store event %r", msg["data"])
                continue
            try:
                self._handler(event)
            except Exception:
                log.exception("store event handler failed for %s", event)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with suppress(Exception):  # closing a broken connection must not raise
            self._pubsub.close()


class PromptStore:
    """Versioned prompt sets of one backbone in Redis. Every method raises typed errors only."""

    @classmethod
    def from_settings(
        cls,
        info: BackboneInfo,
        settings: Settings | None = None,
        *,
        socket_timeout: float | None = None,
        fail_fast_ms: int = 0,
    ) -> PromptStore:
        """The store the settings name (Redis URL, namespace, kept versions, timeouts) for `info`.

        `socket_timeout` overrides `store_socket_timeout` (serving uses its shorter `cache_store_timeout_ms`);
        `fail_fast_ms`: see `FailFast` (the registry passes `registry_store_backoff_ms`).
        """
        s = settings or get_settings()
        return cls(
            s.redis_url,
            info,
            namespace=s.store_namespace,
            keep_versions=s.keep_versions,
            socket_timeout=socket_timeout if socket_timeout is not None else s.store_socket_timeout,
            limits=s.prompt_limits if settings is not None else None,
            fail_fast_ms=fail_fast_ms,
        )

    def __init__(
        self,
        redis_url: str,
        info: BackboneInfo,
        *,
        namespace: str | None = None,
        keep_versions: int | None = None,
        socket_timeout: float | None = None,
        limits: PromptLimits | None = None,
        fail_fast_ms: int = 0,
    ) -> None:
        """`fail_fast_ms` > 0: after a failed Redis call, calls fail at once for that long (`FailFast`)."""
        settings = get_settings()
        self.info = info
        self.fail_fast = FailFast(fail_fast_ms / 1000.0)
        self._limits = limits
        self.namespace = namespace if namespace is not None else settings.store_namespace
        self.keep_versions = int(keep_versions if keep_versions is not None else settings.keep_versions)
        if self.keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        timeout = socket_timeout if socket_timeout is not None else settings.store_socket_timeout
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(
            redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=settings.store_health_check_seconds,  # a dead pub/sub peer is noticed
            decode_responses=False,
        )
        self.prefix = f"{self.namespace}:{info.fingerprint}"
        self.events_channel = f"{self.prefix}:events"
        self._k_current = f"{self.prefix}:current"
        self._k_counter = f"{self.prefix}:counter"
        self._k_summary = f"{self.prefix}:summary"
        self._k_index = f"{self.prefix}:index"
        self._change = self.client.register_script(_CHANGE_LUA)
        self._delete = self.client.register_script(_DELETE_LUA)
        self._get_current = self.client.register_script(_GET_CURRENT_LUA)
        self._list = self.client.register_script(_LIST_LUA)

    @contextmanager
    def _redis(self) -> Iterator[None]:
        """`_wrap_redis` behind this store's `FailFast`: every call of the store to Redis goes through here."""
        self.fail_fast.check()
        answered = True
        try:
            with _wrap_redis():
                yield
        except StoreUnavailable:
            answered = False
            raise
        finally:
            self.fail_fast.done(answered)

    def __repr__(self) -> str:
        return f"PromptStore({self.prefix!r}, keep_versions={self.keep_versions})"

    # ------------------------------------------------------------------ keys
    def _task_keys(self, task_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:task:{check_task_id(task_id)}"
        return f"{base}:blob", f"{base}:info", f"{base}:versions"

    def _change_keys(self, task_id: str) -> list[str]:
        return [self._k_current, self._k_counter, self._k_summary, self._k_index, *self._task_keys(task_id)]

    def all_keys(self) -> list[bytes]:
        """Every key of this namespace and backbone (tests and benchmarks use it for snapshots/cleanup)."""
        with self._redis():
            pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
            return sorted(self.client.scan_iter(match=pattern, count=1000))

    @property
    def limits(self) -> PromptLimits:
        """The prompt-set limits it checks with: those given, else the process settings' at each call."""
        return self._limits or get_settings().prompt_limits

    def drop_all(self) -> int:
        """Delete every key of this namespace and backbone (publishes nothing). Returns the number deleted."""
        keys = self.all_keys()
        with self._redis():
            return sum(self.client.delete(*keys[i : i + 500]) for i in range(0, len(keys), 500))

    # ------------------------------------------------------------------ writes
    def register(self, ps: PromptSet, *, when: Precondition = NO_CONDITION) -> int:
        """Validate against this backbone, then store as the task's new current version (atomic); the
        version. A file identical to the current version's is not stored again: its version is returned.

        `when`: write only if it holds for the task's current version (`PreconditionFailed` otherwise)."""
        limits = self.limits
        ps.validate(self.info, limits)
        data = ps.to_bytes()
        limit = limits.max_bytes
        if len(data) > limit:
            raise PromptSetTooLarge(f"prompt set is {len(data)} bytes; the limit is {limit}")
        return self._write(ps, data, when).version

    def register_bytes(
        self, data: bytes, *, task_id: str | None = None, when: Precondition = NO_CONDITION
    ) -> Registered:
        """Parse and validate a prompt-set file at the door, then store it as `register` does. Nothing is
        written on error, nor when it is the current version's file again (`created` False).

        With `task_id`, the file's own task id must equal it (`TaskIdMismatch` otherwise). `when`: as
        `register`.
        """
        if task_id is not None:
            check_task_id(task_id)
        limits = self.limits
        ps = PromptSet.from_bytes(data, limits=limits).validate(self.info, limits)
        if task_id is not None and ps.task_id != task_id:
            raise TaskIdMismatch(f"the file is task {ps.task_id!r}, uploaded as {task_id!r}")
        written = self._write(ps, ps.to_bytes(), when)
        return Registered(ps, written.version, written.created)

    def _write(self, ps: PromptSet, data: bytes, when: Precondition) -> Registered:
        summary = ps.summary()
        summary.pop("labels", None)  # listings stay small; labels are in the file
        summary.update(
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            registered_at=_now(),
            action="register",
        )
        with self._redis():
            keys = self._change_keys(ps.task_id)
            args = [ps.task_id, data, _dumps(summary), self.keep_versions, self.events_channel, "register", 0]
            version, created = self._change(keys=keys, args=args + when.lua_args())
        return Registered(ps, int(version), bool(created))

    def rollback(self, task_id: str, version: int, *, when: Precondition = NO_CONDITION) -> int:
        """Make the content of `version` current again, as a NEW version (history is never rewritten).

        Returns the new version number. Raises TaskNotFound / VersionNotFound / PreconditionFailed.
        """
        _, info_k, _ = self._task_keys(task_id)
        version = int(version)
        with self._redis():
            current, raw = self.client.hget(self._k_current, task_id), self.client.hget(info_k, version)
        if current is None:
            raise TaskNotFound(f"task {task_id!r} is not registered")
        if raw is None:
            raise VersionNotFound(f"task {task_id!r} has no version {version} (kept: {self._kept(task_id)})")
        info = json.loads(raw)
        info.update(registered_at=_now(), action="rollback", rolled_back_from=version)
        with self._redis():
            keys = self._change_keys(task_id)
            args = [task_id, b"", _dumps(info), self.keep_versions, self.events_channel, "rollback", version]
            return int(self._change(keys=keys, args=args + when.lua_args())[0])

    def delete(self, task_id: str, *, when: Precondition = NO_CONDITION) -> None:
        """Remove a task and all its versions. Raises TaskNotFound / PreconditionFailed. Version numbers
        are never reused."""
        blob_k, info_k, versions_k = self._task_keys(task_id)
        with self._redis():
            keys = [self._k_current, self._k_summary, self._k_index, blob_k, info_k, versions_k]
            result = self._delete(keys=keys, args=[task_id, self.events_channel, *when.lua_args()])
        if result is None:
            raise TaskNotFound(f"task {task_id!r} is not registered")

    # ------------------------------------------------------------------ reads
    def get_bytes(self, task_id: str, version: int | None = None) -> tuple[bytes, int]:
        """The stored file of the current (or a given) version, and its version number."""
        blob_k, _, _ = self._task_keys(task_id)
        with self._redis():
            if version is None:
                result = self._get_current(keys=[self._k_current, blob_k], args=[task_id])
                if result is None:
                    raise TaskNotFound(f"task {task_id!r} is not registered")
                return bytes(result[1]), int(result[0])
            data = self.client.hget(blob_k, int(version))
        if data is None:
            if self.current_version(task_id) is None:
                raise TaskNotFound(f"task {task_id!r} is not registered")
            raise VersionNotFound(f"task {task_id!r} has no version {version} (kept: {self._kept(task_id)})")
        return bytes(data), int(version)

    def get(self, task_id: str, version: int | None = None) -> tuple[PromptSet, int]:
        """The prompt set (validated against this backbone, as at registration) and its version."""
        data, v = self.get_bytes(task_id, version)
        limits = self.limits
        return PromptSet.from_bytes(data, limits=limits).validate(self.info, limits), v

    def current_version(self, task_id: str) -> int | None:
        """The current version of a task, or None: one HGET, no blob (the replicas' cheap check)."""
        check_task_id(task_id)
        with self._redis():
            v = self.client.hget(self._k_current, task_id)
        return None if v is None else int(v)

    def current_versions(self, task_ids: Sequence[str]) -> dict[str, int | None]:
        """Current versions of many tasks in one round trip (HMGET)."""
        ids = [check_task_id(t) for t in task_ids]
        if not ids:
            return {}
        with self._redis():
            values = self.client.hmget(self._k_current, ids)
        return {t: (None if v is None else int(v)) for t, v in zip(ids, values, strict=True)}

    def summary(self, task_id: str, version: int | None = None) -> dict[str, Any]:
        """Summary (metadata, sizes, sha256, version) of the current or a given version, without the blob."""
        _, info_k, _ = self._task_keys(task_id)
        with self._redis():
            if version is None:
                raw = self.client.hget(self._k_summary, task_id)
                if raw is None:
                    raise TaskNotFound(f"task {task_id!r} is not registered")
                return json.loads(raw)
            raw = self.client.hget(info_k, int(version))
        if raw is None:
            if self.current_version(task_id) is None:
                raise TaskNotFound(f"task {task_id!r} is not registered")
            raise VersionNotFound(f"task {task_id!r} has no version {version} (kept: {self._kept(task_id)})")
        return {"version": int(version), **json.loads(raw)}

    def list_tasks(
        self, *, cursor: str | int = 0, limit: int = 100
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of task summaries in task-id order, and the cursor of the next page (None at the end).

        Reads only the summary hash: never a blob. `limit` is capped at MAX_LIST_LIMIT.
        """
        if not 1 <= int(limit) <= MAX_LIST_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        after = _decode_cursor(cursor)
        start = "-" if after is None else f"({after}"
        with self._redis():
            flat = self._list(keys=[self._k_index, self._k_summary], args=[start, int(limit) + 1])
        items = []
        for tid, raw in zip(flat[::2], flat[1::2], strict=True):
            if raw:  # deleted between index and summary: impossible in one script, but be safe
                items.append({"task_id": tid.decode(), **json.loads(raw)})
        more = len(items) > limit
        items = items[:limit]
        return items, (_encode_cursor(items[-1]["task_id"]) if more and items else None)

    def count(self) -> int:
        with self._redis():
            return int(self.client.zcard(self._k_index))

    def versions(self, task_id: str) -> list[dict[str, Any]]:
        """Kept versions of a task, oldest first, each a summary with `version` and `current`."""
        _, info_k, _ = self._task_keys(task_id)
        with self._redis():
            pipe = self.client.pipeline(transaction=True)
            pipe.hget(self._k_current, task_id)
            pipe.hgetall(info_k)
            current, infos = pipe.execute()
        if current is None:
            raise TaskNotFound(f"task {task_id!r} is not registered")
        cur = int(current)
        out = [{"version": int(v), **json.loads(raw), "current": int(v) == cur} for v, raw in infos.items()]
        return sorted(out, key=lambda d: d["version"])

    def _kept(self, task_id: str) -> list[int]:
        _, _, versions_k = self._task_keys(task_id)
        with self._redis():
            return [int(v) for v in self.client.zrange(versions_k, 0, -1)]

    # ------------------------------------------------------------------ events and health
    def subscribe(
        self, handler: Callable[[StoreEvent], None], *, on_reconnect: Callable[[], None] | None = None
    ) -> Subscription:
        """Deliver every change as a `StoreEvent` to `handler` on a background thread; returns it (`.stop()`).

        When this returns, the subscription is confirmed: no later change is missed while connected.
        """
        return Subscription(self.client, self.events_channel, handler, on_reconnect)

    def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers."""
        with self._redis():
            self.client.ping()

    def close(self) -> None:
        self.client.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    if not text.startswith("{") or text == "{}":
        raise ValueError("a summary must be a non-empty JSON object")
    return text
