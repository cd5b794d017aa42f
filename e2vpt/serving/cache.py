"""`PromptCache`: which prompt sets one serving process holds, and in which version.

- Holds validated prompt sets, compacted and copied once into the device-resident `PromptTable` (the
  backbone's device and dtype), under a byte budget; least recently used sets are evicted first, pinned
  sets never. An update writes the new version to fresh rows, then swaps the mapping; the old rows are
  reused once no batch holds them (see `e2vpt.serving.table`).
- A miss loads the current version from the `PromptStore` (which validates it against the backbone);
  concurrent misses of one task share one fetch.
- Store events (pub/sub) replace or drop cached sets as soon as they are published; a rate-limited version
  check (`current_versions`, one round trip) catches messages missed while the subscription was down.
- Redis unreachable or hung: cached tasks keep serving and never wait on Redis: once started, the cache
  talks to the store on the request path only for cold loads; version checks run on a background thread
  (`_watch_store`). The first failed store call marks the store down: cold loads then fail at once with
  `StoreUnavailable` (503) until the background probe gets an answer again. Nothing needs a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from e2vpt.core.promptset import PromptSet, check_task_id
from e2vpt.errors import E2VPTError, StoreUnavailable, TaskNotFound
from e2vpt.serving.table import PromptTable, TableSlot

if TYPE_CHECKING:
    from e2vpt.registry.store import PromptStore, StoreEvent
    from e2vpt.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedPrompts:
    """One task's prompt set as the engine uses it: its rows in the table (held while this is referenced),
    labels and preprocessing recipe."""

    task_id: str
    version: int
    slot: TableSlot
    labels: list[str]
    recipe: str

    @property
    def nbytes(self) -> int:
        return self.slot.nbytes


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    cold_loads: int = 0
    cold_load_seconds: float = 0.0
    store_errors: int = 0
    updates: int = 0
    version_checks: int = 0
    last_cold_load_seconds: list[float] = field(default_factory=list)


def compacted(ps: PromptSet) -> PromptSet:
    """Pruned tokens removed, pruned segments zeroed, masks dropped: what the table stores."""
    return replace(ps.compact(), segment_mask=None, token_mask=None) if ps.is_masked else ps


class PromptCache:
    def __init__(
        self,
        store: PromptStore,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_bytes: int = 512 * 1024 * 1024,
        pinned: Iterable[str] = (),
        version_check_ms: int = 500,
        store_backoff_ms: int = 1000,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.store = store
        self.device, self.dtype = torch.device(device), dtype
        self.max_bytes = max_bytes
        self.table = PromptTable(store.info, device=self.device, dtype=dtype, max_bytes=max_bytes)
        self.version_check_s = version_check_ms / 1000.0
        self.store_backoff_s = store_backoff_ms / 1000.0
        self._store_down_until = 0.0
        self.metrics = metrics
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CachedPrompts] = OrderedDict()
        self._bytes = 0
        self._pinned: set[str] = {check_task_id(t) for t in pinned}
        self._inflight: dict[str, Future[CachedPrompts]] = {}
        self._generation: dict[str, int] = {}  # bumped by every event: a load that raced an event is not kept
        self._lock = threading.RLock()
        self._last_check = 0.0
        self._subscription: Any = None
        self._closed = threading.Event()
        # Set by a failed store call once the watcher runs; cleared only by the watcher's successful probe.
        self._store_down = threading.Event()
        self._watcher: threading.Thread | None = None
        self._wake_watcher = threading.Event()  # the store went down or the cache closes: new interval

    # ------------------------------------------------------------------ lifecycle
    def start(self, preload: Iterable[str] = ()) -> dict[str, E2VPTError]:
        """Subscribe to store events (retrying in the background while Redis is down) and preload tasks.

        Returns the preload errors by task (a missing preload task is reported, not fatal)."""
        if not self._try_subscribe():
            threading.Thread(target=self._subscribe_retry, name="e2vpt-cache-subscribe", daemon=True).start()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_store, name="e2vpt-cache-store", daemon=True)
            self._watcher.start()
        return self.preload([*self._pinned, *preload])

    def _watch_store(self) -> None:
        """Off the request path: the rate-limited version check (missed events) while the store answers;
        while it is down, a probe every `store_backoff_s` until it answers again."""
        while not self._closed.is_set():
            if self._wake_watcher.wait(self._watch_interval()):
                self._wake_watcher.clear()
                continue  # the state changed: wait again, for the interval of the new state
            if self._closed.is_set():
                return
            try:
                if self._store_down.is_set():
                    self.store.ping()
                    self._store_down_until = 0.0
                    self._store_down.clear()
                    log.info("prompt store answers again")
                if self.version_check_s >= 0:
                    self._last_check = time.monotonic()
                    self.check_versions()
            except StoreUnavailable:
                continue
            except Exception:  # never let the watcher die
                log.exception("prompt store watcher error")

    def _watch_interval(self) -> float:
        if self._store_down.is_set() or self.version_check_s < 0:
            return max(self.store_backoff_s, 0.05)
        return max(self.version_check_s, 0.05)

    def _try_subscribe(self) -> bool:
        try:
            self._subscription = self.store.subscribe(self.on_event, on_reconnect=self.check_versions)
            return True
        except StoreUnavailable as exc:
            self._store_error(exc)
            return False

    def _subscribe_retry(self) -> None:
        while not self._closed.wait(1.0):
            if self._try_subscribe():
                self.check_versions()  # catch up on what happened while unsubscribed
                return

    def close(self) -> None:
        self._closed.set()
        self._wake_watcher.set()
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None

    def preload(self, task_ids: Iterable[str]) -> dict[str, E2VPTError]:
        errors: dict[str, E2VPTError] = {}
        for task_id, res in self.get_many(dict.fromkeys(task_ids), check=False).items():
            if isinstance(res, E2VPTError):
                log.warning("preload of task %r failed: %s", task_id, res)
                errors[task_id] = res
        return errors

    # ------------------------------------------------------------------ lookups
    @property
    def resident_tasks(self) -> int:
        return len(self._entries)

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def resident(self) -> dict[str, int]:
        """task id -> cached version, least recently used first."""
        with self._lock:
            return {t: e.version for t, e in self._entries.items()}

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries

    def get(self, task_id: str) -> CachedPrompts:
        res = self.get_many([task_id])[task_id]
        if isinstance(res, E2VPTError):
            raise res
        return res

    def get_many(
        self, task_ids: Iterable[str], *, check: bool = True
    ) -> dict[str, CachedPrompts | E2VPTError]:
        """Each distinct task's cached prompts, or its typed error (invalid id, not found, store down, ...)."""
        ids = list(dict.fromkeys(task_ids))
        out: dict[str, CachedPrompts | E2VPTError] = {}
        valid: list[str] = []
        for task_id in ids:
            try:
                valid.append(check_task_id(task_id))
            except E2VPTError as exc:
                out[task_id] = exc
        if check and self._watcher is None:  # not started: no watcher thread, check on the caller's
            self._maybe_check_versions(valid)
        for task_id in valid:
            with self._lock:
                entry = self._entries.get(task_id)
                if entry is not None:
                    self._entries.move_to_end(task_id)
            if entry is not None:
                self.stats.hits += 1
                if self.metrics:
                    self.metrics.cache_hits.inc()
                out[task_id] = entry
                continue
            try:
                out[task_id] = self._load(task_id)
            except E2VPTError as exc:
                out[task_id] = exc
        return out

    # ------------------------------------------------------------------ loading
    def _load(self, task_id: str) -> CachedPrompts:
        """Cold load, deduplicated: concurrent callers for one task wait on the first caller's fetch."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is not None:
                return entry
            fut = self._inflight.get(task_id)
            owner = fut is None
            if owner:
                fut = Future()
                self._inflight[task_id] = fut
            generation = self._generation.get(task_id, 0)
        assert fut is not None
        if not owner:
            return fut.result()
        self.stats.misses += 1
        if self.metrics:
            self.metrics.cache_misses.inc()
        try:
            entry = self._fetch(task_id)
            with self._lock:
                if self._generation.get(task_id, 0) == generation:
                    self._insert(entry)
            fut.set_result(entry)
            return entry
        except E2VPTError as exc:
            fut.set_exception(exc)
            raise
        except Exception as exc:  # keep waiters from hanging on unexpected failures
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(task_id, None)

    def _fetch(self, task_id: str, *, cold: bool = True) -> CachedPrompts:
        if cold and (self._store_down.is_set() or time.monotonic() < self._store_down_until):
            raise StoreUnavailable(
                "prompt store (Redis) unavailable (a recent request failed; retrying shortly)"
            )
        t0 = time.perf_counter()
        try:
            ps, version = self.store.get(task_id)  # validated against the backbone by the store
        except StoreUnavailable as exc:
            self._store_error(exc)
            raise
        ps = compacted(ps)
        with self._lock:  # evict first, so that the table reuses rows rather than growing past the budget
            old = self._entries.get(task_id)
            self._evict(extra=self.table.nbytes_for(ps) - (old.nbytes if old else 0), keep=task_id)
        slot = self.table.insert(ps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        entry = CachedPrompts(task_id, version, slot, ps.labels, ps.recipe)
        seconds = time.perf_counter() - t0
        if cold:
            self.stats.cold_loads += 1
            self.stats.cold_load_seconds += seconds
            self.stats.last_cold_load_seconds = [*self.stats.last_cold_load_seconds[-99:], seconds]
            if self.metrics:
                self.metrics.cold_load.observe(seconds)
        return entry

    def _insert(self, entry: CachedPrompts) -> None:
        old = self._entries.pop(entry.task_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[entry.task_id] = entry
        self._bytes += entry.nbytes
        self._evict(keep=entry.task_id)

    def _drop(self, task_id: str) -> bool:
        old = self._entries.pop(task_id, None)
        if old is not None:
            self._bytes -= old.nbytes
            self._update_gauges()
        return old is not None

    def _evict(self, keep: str | None = None, extra: int = 0) -> None:
        """Least recently used unpinned tasks out until the resident bytes (plus `extra` about to come)
        fit the budget."""
        while self._bytes + extra > self.max_bytes:
            victim = next((t for t in self._entries if t not in self._pinned and t != keep), None)
            if victim is None:
                break
            self._drop(victim)
            self.stats.evictions += 1
            if self.metrics:
                self.metrics.cache_evictions.inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.resident_tasks.set(len(self._entries))
            self.metrics.resident_bytes.set(self._bytes)

    def _store_error(self, exc: Exception) -> None:
        if self._store_down.is_set():
            return  # known to be down: the watcher probes; not counted again
        if self._watcher is not None:
            self._store_down.set()
            self._wake_watcher.set()  # probe every store_backoff_s from now on, not at the next version check
        self._store_down_until = time.monotonic() + self.store_backoff_s
        self.stats.store_errors += 1
        if self.metrics:
            self.metrics.store_errors.inc()
        log.warning("prompt store unavailable: %s", exc)

    def _updated(self, reason: str) -> None:
        self.stats.updates += 1
        if self.metrics:
            self.metrics.store_updates.labels(reason=reason).inc()

    # ------------------------------------------------------------------ freshness
    def on_event(self, event: StoreEvent) -> None:
        """A store event: replace (register/rollback) or drop (delete) the cached set. Never raises."""
        try:
            self._apply(event.task_id, event.action)
        except Exception:  # the subscription thread must survive anything
            log.exception("applying store event %r failed", event)

    def _apply(self, task_id: str, action: str) -> None:
        with self._lock:
            self._generation[task_id] = self._generation.get(task_id, 0) + 1
            cached = self._entries.get(task_id)
            if action == "delete":
                if self._drop(task_id):
                    self._updated("delete")
                return
            if cached is None and task_id not in self._pinned:
                return
            generation = self._generation[task_id]
        try:
            entry = self._fetch(task_id, cold=False)
        except TaskNotFound:
            with self._lock:
                if self._drop(task_id):
                    self._updated("delete")
            return
        except StoreUnavailable:
            return  # keep serving what we have; the version check will catch up
        with self._lock:
            if self._generation.get(task_id) == generation and (
                cached is None or entry.version != cached.version
            ):
                self._insert(entry)
                self._updated(action)

    def _maybe_check_versions(self, task_ids: list[str]) -> None:
        if self.version_check_s < 0:
            return
        now = time.monotonic()
        if now - self._last_check < self.version_check_s or now < self._store_down_until:
            return
        self._last_check = now
        self.check_versions(task_ids)

    def check_versions(self, task_ids: Iterable[str] | None = None) -> None:
        """Compare cached versions with the store's (one round trip) and refresh what differs."""
        with self._lock:
            wanted = None if task_ids is None else set(task_ids)
            cached = {t: e.version for t, e in self._entries.items() if wanted is None or t in wanted}
        if not cached:
            return
        self.stats.version_checks += 1
        try:
            current = self.store.current_versions(list(cached))
        except StoreUnavailable as exc:
            self._store_error(exc)
            return
        for task_id, version in current.items():
            if version is None:
                self._apply(task_id, "delete")
            elif version != cached[task_id]:
                self._apply(task_id, "register")
