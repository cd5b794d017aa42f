"""Prometheus metrics of the serving engine and prompt cache (prometheus-client, seconds).

Why prometheus-client and not TorchServe's metrics API: TorchServe's custom histograms have fixed buckets
(5 ms .. 10 s); a tiny or GPU backbone answers in well under 5 ms, so the interesting part of the latency
distribution would fall into one bucket. With several TorchServe workers (separate processes) the metrics
run in prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set by `e2vpt.torchserve.archive`):
every worker writes its samples to files there and whichever worker holds the metrics port serves the
sum over all workers (the others retry the port, so the endpoint survives a worker restart).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

# Sub-millisecond to 10 s: an engine step on a small backbone is ~1 ms, a cold start can take seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
COLD_LOAD_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER_LABEL = "other"
UNKNOWN_LABEL = "unknown"  # items whose task id is invalid or not registered (no label per junk id)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class TaskLabeler:
    """Bounded `task` label: the `top_n` busiest tasks (by request count) keep their id, the rest are "other".

    A task is admitted when it has more requests than the least busy labelled task (which then falls back
    to "other"); series of tasks that lose their label stop growing but stay, so sums stay right.
    Counts are tracked for at most `max_tracked` tasks (the least busy half is dropped when full)."""

    def __init__(self, top_n: int, max_tracked: int | None = None) -> None:
        self.top_n = max(0, top_n)
        self.max_tracked = max_tracked or max(1000, 20 * self.top_n)
        self.counts: dict[str, int] = {}
        self.labelled: set[str] = set()
        self._lock = threading.Lock()

    def label(self, task_id: str) -> str:
        with self._lock:
            self.counts[task_id] = self.counts.get(task_id, 0) + 1
            if len(self.counts) > self.max_tracked:
                keep = sorted(self.counts, key=self.counts.__getitem__, reverse=True)[: self.max_tracked // 2]
                self.counts = {t: self.counts[t] for t in set(keep) | self.labelled | {task_id}}
            if task_id in self.labelled:
                return task_id
            if len(self.labelled) < self.top_n:
                self.labelled.add(task_id)
                return task_id
            if not self.labelled:
                return OTHER_LABEL
            weakest = min(self.labelled, key=lambda t: self.counts.get(t, 0))
            if self.counts[task_id] > self.counts.get(weakest, 0):
                self.labelled.discard(weakest)
                self.labelled.add(task_id)
                return task_id
            return OTHER_LABEL


class ServingMetrics:
    """All serving metrics. One instance per engine; `registry` is private unless multiprocess mode is on."""

    def __init__(self, top_tasks: int = 50, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode samples go to files and a MultiProcessCollector reads them back; otherwise a
        # private registry (tests and benchmarks create several engines in one process).
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        self.labeler = TaskLabeler(top_tasks)
        self.requests = Counter(
            "e2vpt_requests", "Inference items by task and HTTP status", ["task", "status"], registry=reg
        )
        self.latency = Histogram(
            "e2vpt_request_latency_seconds",
            "Engine time of an item's batch (decode, cache, forward, top-k), by task",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "e2vpt_batch_size", "Items per engine batch", buckets=SIZE_BUCKETS, registry=reg
        )
        self.tasks_per_batch = Histogram(
            "e2vpt_tasks_per_batch", "Distinct tasks per engine batch", buckets=SIZE_BUCKETS, registry=reg
        )
        self.forward_seconds = Histogram(
            "e2vpt_forward_seconds", "Backbone forward time per batch", buckets=LATENCY_BUCKETS, registry=reg
        )
        self.cache_hits = Counter("e2vpt_cache_hits", "Prompt cache hits", registry=reg)
        self.cache_misses = Counter("e2vpt_cache_misses", "Prompt cache misses (cold loads)", registry=reg)
        self.cache_evictions = Counter("e2vpt_cache_evictions", "Prompt sets evicted (LRU)", registry=reg)
        self.cold_load = Histogram(
            "e2vpt_cache_cold_load_seconds",
            "Fetch + validate + move to device of one prompt set",
            buckets=COLD_LOAD_BUCKETS,
            registry=reg,
        )
        gauge_kw = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.resident_tasks = Gauge(
            "e2vpt_cache_resident_tasks", "Prompt sets resident on the device (summed over workers)", registry=reg,
            **gauge_kw,
        )  # fmt: skip
        self.resident_bytes = Gauge(
            "e2vpt_cache_resident_bytes", "Bytes of resident prompt sets (summed over workers)", registry=reg,
            **gauge_kw,
        )  # fmt: skip
        self.failures = Counter(
            "e2vpt_item_failures",
            "Items that failed unexpectedly (500), by task and stage (forward: the task's prompts broke "
            "its forward and it was retried alone)",
            ["task", "stage"],
            registry=reg,
        )
        self.store_errors = Counter(
            "e2vpt_store_errors", "Prompt store (Redis) errors seen by serving", registry=reg
        )
        self.store_updates = Counter(
            "e2vpt_cache_updates", "Prompt sets replaced or dropped after a store event or version check",
            ["reason"], registry=reg,
        )  # fmt: skip

    def task_label(self, task_id: str | None) -> str:
        """None (the item's task is not a known, registered one) -> "unknown"; else the bounded label."""
        return UNKNOWN_LABEL if task_id is None else self.labeler.label(task_id)

    def observe_item(self, task_id: str | None, status: int, seconds: float) -> None:
        label = self.task_label(task_id)
        self.requests.labels(task=label, status=str(status)).inc()
        self.latency.labels(task=label).observe(seconds)

    def observe_failure(self, task_id: str | None, stage: str, items: int = 1) -> None:
        self.failures.labels(task=self.task_label(task_id), stage=stage).inc(items)

    def observe_batch(self, items: int, tasks: int) -> None:
        self.batch_size.observe(items)
        self.tasks_per_batch.observe(tasks)

    def exposition_registry(self) -> CollectorRegistry:
        """What an HTTP endpoint serves: the private registry, or the sum over all worker processes."""
        if not self.multiprocess:
            return self.registry
        reg = CollectorRegistry()
        reg.register(_LiveMultiProcessCollector(multiprocess_dir() or ""))
        return reg


class _LiveMultiProcessCollector:
    """MultiProcessCollector that first drops the live-gauge files of dead workers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Metric]:
        for f in Path(self.path).glob("gauge_live*_*.db"):
            try:
                pid = int(f.stem.rsplit("_", 1)[1])
                os.kill(pid, 0)
            except ProcessLookupError:
                mark_process_dead(pid, self.path)
            except (ValueError, PermissionError):
                pass
        return self.inner.collect()


class MetricsEndpoint:
    """Serves `metrics` on bind:port. When the port is taken (a sibling worker serves it) keep retrying in
    the background, so another worker takes over if the serving one exits."""

    def __init__(
        self, metrics: ServingMetrics, port: int, bind: str = "127.0.0.1", retry_s: float = 2.0
    ) -> None:
        self.metrics, self.port, self.bind, self.retry_s = metrics, port, bind, retry_s
        self.server: WSGIServer | None = None
        self._stop = threading.Event()
        if not self._try_start():
            threading.Thread(target=self._retry, name="e2vpt-metrics-endpoint", daemon=True).start()

    def _try_start(self) -> bool:
        try:
            self.server, _ = start_http_server(
                self.port, addr=self.bind, registry=self.metrics.exposition_registry()
            )
        except OSError:
            return False
        log.info(
            "serving Prometheus metrics on http://%s:%d/metrics (pid %d)", self.bind, self.port, os.getpid()
        )
        return True

    def _retry(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._try_start():
                return

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
