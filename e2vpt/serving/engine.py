"""`MultiTaskEngine`: many E2VPT tasks on one frozen backbone, one mixed batch per call.

predict(items) decodes every image, resolves every item's task through the `PromptCache`, assembles the
batch's prompts from the device-resident `PromptTable` (index gathers), runs ONE backbone forward with
per-image prompts (any `FeatureBackend`), applies each image's own head and returns top-k labels and
scores. Items that fail (bad image, unknown task, store down, ...) get their typed error in their slot;
the rest succeed. Every image's header is read first; a batch runs as micro-batches of at most
`engine_micro_batch` images (when set) and `engine_micro_batch_pixels` decoded pixels (so a batch of huge
images holds bounded memory), the next one's images decoding in a background thread while the current one
runs.

Isolation: an unexpected exception while reading one item is that item's 500. When the mixed forward
fails, every task is retried alone, so a task whose prompts break the forward fails only its own items
(500, counted per task in `e2vpt_item_failures`). 503 means only "prompt store unavailable".

Stages: each step of a call runs inside a `torch.profiler.record_function` range named in `STAGES`, so
any profile of a serving process (`benchmarks/bench_gpu.py --only stages` prints one) shows where
a batch's time goes; outside a profiler a range costs about 5 us (ten per call).

No TorchServe import: the TorchServe handler, benchmarks and tests all drive this class directly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.profiler import record_function as stage

from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import Backbone, backbone_from_settings
from e2vpt.core.images import ImageLimits
from e2vpt.core.promptset import check_task_id
from e2vpt.errors import BadRequest, E2VPTError, excerpt, http_status
from e2vpt.registry.store import PromptStore
from e2vpt.serving.backends import FeatureBackend, make_backend
from e2vpt.serving.cache import CachedPrompts, PromptCache
from e2vpt.serving.metrics import ServingMetrics
from e2vpt.serving.pipeline import Decoded, ImagePipeline, Scanned

log = logging.getLogger(__name__)

# the profiler ranges of one predict() call, in order (a request's path through the engine)
STAGES = (
    "e2vpt.scan",  # every image's header read and checked (format, bytes, pixels, bombs)
    "e2vpt.decode",  # image bytes -> uint8 pixels (nvjpeg / thread pool)
    "e2vpt.cache",  # each task's cached prompts (cold loads from the store)
    "e2vpt.transform",  # each task's recipe: resize, crop, normalise
    "e2vpt.assemble",  # the batch's prompts and heads gathered from the PromptTable
    "e2vpt.forward",  # the backbone with per-image prompts
    "e2vpt.head",  # per-task heads, softmax, top-k, back to the host (waits for the device)
    "e2vpt.results",  # result objects and metrics
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Backend name -> "module:factory"; factories take (backbone, settings). Imported lazily, so a backend
# written elsewhere (e2vpt/onnx_backend.py) plugs in by name without this module importing it.


@dataclass(frozen=True)
class RequestItem:
    """One image to classify with one task's prompts."""

    task_id: str
    image: bytes
    top_k: int | None = None


@dataclass(frozen=True)
class BatchItem:
    """An item ready for the forward: its place in the request, its task, its pixels and its top-k."""

    index: int
    task_id: str
    pixels: torch.Tensor
    top_k: int


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass
class Result:
    task_id: str
    version: int
    predictions: list[Prediction] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "version": self.version,
            "predictions": [{"label": p.label, "score": p.score} for p in self.predictions],
        }


def micro_batches(pixels: Sequence[int], size: int, max_pixels: int) -> list[range]:
    """Consecutive runs of items, each at most `size` items (0: any number) and `max_pixels` pixels (0: any;
    an item larger than that runs alone), cut greedily in order."""
    runs: list[range] = []
    start, total = 0, 0
    for i, p in enumerate(pixels):
        if i > start and ((size and i - start == size) or (max_pixels and total + p > max_pixels)):
            runs.append(range(start, i))
            start, total = i, 0
        total += p
    if start < len(pixels):
        runs.append(range(start, len(pixels)))
    return runs


def serving_dtype(settings: Settings) -> torch.dtype:
    """The model dtype: `serving_dtype`, "auto" meaning float16 on a CUDA device and float32 elsewhere."""
    name = settings.serving_dtype_name
    if name not in DTYPES:
        raise BadRequest(
            f"unknown serving dtype {settings.serving_dtype!r}; expected one of {['auto', *sorted(DTYPES)]}"
        )
    return DTYPES[name]


class MultiTaskEngine:
    def __init__(
        self,
        backbone: Backbone,
        store: PromptStore,
        settings: Settings | None = None,
        *,
        backend: FeatureBackend | None = None,
        metrics: ServingMetrics | None = None,
        start: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        self.backbone = backbone
        self.info = backbone.info
        self.store = store
        self.device, self.dtype = backbone.device, backbone.dtype
        self.backend = backend or make_backend(self.settings.backend, backbone, self.settings)
        self.metrics = metrics or ServingMetrics(self.settings.metrics_top_tasks)
        self._limits = (self.settings, ImageLimits.from_settings(self.settings))
        self.images = ImagePipeline(
            self.info,
            self._limits[1],
            self.device,
            threads=self.settings.image_decode_threads,
            gpu_decode=self.settings.image_gpu_decode,
            gpu_min_pixels=self.settings.image_gpu_decode_min_pixels,
        )
        self.cache = PromptCache(
            store,
            device=self.device,
            dtype=self.dtype,
            max_bytes=self.settings.cache_max_bytes,
            pinned=self.settings.cache_pinned_tasks,
            version_check_ms=self.settings.cache_version_check_ms,
            store_backoff_ms=self.settings.cache_store_backoff_ms,
            metrics=self.metrics,
        )
        self.preload_errors: dict[str, E2VPTError] = {}
        self.metrics_endpoint: Any = None  # set by whoever serves the metrics over HTTP
        if start:
            self.preload_errors = self.cache.start(self.settings.cache_preload_tasks)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, start: bool = True) -> MultiTaskEngine:
        """Backbone (name / checkpoint, device, dtype), store, backend and cache, all from Settings."""
        settings = settings or get_settings()
        backbone = backbone_from_settings(settings, dtype=serving_dtype(settings))
        store = PromptStore.from_settings(
            backbone.info, settings, socket_timeout=settings.cache_store_timeout_ms / 1000
        )
        return cls(backbone, store, settings, start=start)

    def close(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        self.cache.close()
        self.store.close()
        self.images.close()

    # ------------------------------------------------------------------ inference
    def predict(
        self, items: Sequence[RequestItem | E2VPTError], top_k: int | None = None
    ) -> list[Result | E2VPTError]:
        """One result or typed error per item, in order. Items may already be errors (bad requests
        found while parsing): they are passed through and counted."""
        t0 = time.perf_counter()
        default_k = top_k if top_k is not None else self.settings.top_k
        out: list[Result | E2VPTError | None] = [None] * len(items)
        valid: list[tuple[int, str, int]] = []
        for i, item in enumerate(items):
            if isinstance(item, E2VPTError):
                out[i] = item
                continue
            try:
                task_id = check_task_id(item.task_id)
                k = item.top_k if item.top_k is not None else default_k
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise BadRequest(f"top_k must be a positive integer, got {excerpt(k)}")
                if k > self.settings.max_top_k:
                    raise BadRequest(
                        f"top_k is {excerpt(k)}; the limit is {self.settings.max_top_k} (E2VPT_MAX_TOP_K)"
                    )
                valid.append((i, task_id, k))
            except E2VPTError as exc:
                out[i] = exc
            except Exception as exc:  # a bug reading one item fails that item, never the batch
                log.exception("item %d could not be read", i)
                out[i] = E2VPTError(f"unreadable item: {type(exc).__name__}")
        if self._limits[0] is not self.settings:  # settings may be swapped on a live engine
            self._limits = (self.settings, ImageLimits.from_settings(self.settings))
        limits = self._limits[1]
        with stage("e2vpt.scan"):  # headers first: a bad or oversized image fails its own item here
            headers = self.images.scan([items[i].image for i, _, _ in valid], limits)  # type: ignore[union-attr]
        scanned: list[Scanned] = []
        ok: list[tuple[int, str, int]] = []
        for entry, header in zip(valid, headers, strict=True):
            if isinstance(header, E2VPTError):
                out[entry[0]] = header
            else:
                ok.append(entry)
                scanned.append(header)
        runs = micro_batches(
            [s.pixels for s in scanned],
            self.settings.engine_micro_batch,
            self.settings.engine_micro_batch_pixels,
        )
        resolved: dict[str, CachedPrompts | E2VPTError] = {}
        tasks: set[str] = set()
        ahead: Future[list[Decoded]] | None = None
        for n, run in enumerate(runs):
            # decoded in one batch (GPU JPEGs, a thread pool for the rest); a bad image fails its own item
            with stage("e2vpt.decode"):
                if ahead is None:
                    decoded = self.images.decode(scanned[run.start : run.stop], limits)
                else:
                    decoded = ahead.result()
            if n + 1 < len(runs):  # the next micro-batch decodes while this one runs
                following = runs[n + 1]
                ahead = self.images.decode_ahead(scanned[following.start : following.stop], limits)
            self._run(ok[run.start : run.stop], decoded, out, resolved, tasks)
        with stage("e2vpt.results"):
            return self._observe(items, out, resolved, len(tasks), time.perf_counter() - t0)

    def _run(
        self,
        chunk: list[tuple[int, str, int]],
        decoded: list[Decoded],
        out: list[Result | E2VPTError | None],
        resolved: dict[str, CachedPrompts | E2VPTError],
        tasks: set[str],
    ) -> None:
        """One (micro-)batch from decoded pixels to answers in `out`: its tasks' prompts, each task's
        recipe, one forward. `resolved` and `tasks` collect what the call's metrics need."""
        ready: list[BatchItem] = []  # decoded uint8 pixels
        for (i, task_id, k), img in zip(chunk, decoded, strict=True):
            if isinstance(img, E2VPTError):
                out[i] = img
            else:
                ready.append(BatchItem(i, task_id, img, k))
        with stage("e2vpt.cache"):
            found = self.cache.get_many(item.task_id for item in ready)
        resolved.update(found)
        pending: list[BatchItem] = []
        for item in ready:
            res = found[item.task_id]
            if isinstance(res, E2VPTError):
                out[item.index] = res
            else:
                pending.append(item)
        # each task's own preprocessing recipe: the pixels it was trained on
        recipes = [found[item.task_id].recipe for item in pending]  # type: ignore[union-attr]
        with stage("e2vpt.transform"):
            inputs = self.images.transform([item.pixels for item in pending], recipes)
        good: list[BatchItem] = []  # normalised model inputs
        for item, x in zip(pending, inputs, strict=True):
            if isinstance(x, E2VPTError):
                out[item.index] = x
            else:
                good.append(replace(item, pixels=x))
        tasks.update(item.task_id for item in good)
        if good:
            self._forward_isolated(good, found, out)  # type: ignore[arg-type]

    def _observe(
        self,
        items: Sequence[RequestItem | E2VPTError],
        out: list[Result | E2VPTError | None],
        resolved: dict[str, CachedPrompts | E2VPTError],
        tasks: int,
        elapsed: float,
    ) -> list[Result | E2VPTError]:
        """Each item's status and the batch's latency into the metrics; the final results."""
        self.metrics.observe_batch(len(items), tasks)
        final: list[Result | E2VPTError] = []
        for item, res in zip(items, out, strict=True):
            assert res is not None
            # a task label only for registered tasks (known here): junk ids must not create label values
            task_id = item.task_id if isinstance(item, RequestItem) else None
            known = isinstance(res, Result) or (
                task_id is not None
                and not isinstance(resolved.get(task_id), E2VPTError)
                and task_id in self.cache
            )
            task_id = task_id if known else None
            self.metrics.observe_item(task_id, 200 if isinstance(res, Result) else http_status(res), elapsed)
            final.append(res)
        return final

    def _forward_isolated(
        self,
        good: list[BatchItem],
        resolved: dict[str, CachedPrompts],
        out: list[Result | E2VPTError | None],
    ) -> None:
        """One forward of all `good` items; if it fails, one forward per task, so that a task whose
        prompts break the forward fails only its own items (500, counted per task)."""
        tasks = list(dict.fromkeys(item.task_id for item in good))
        try:
            results = self._forward(good, [resolved[item.task_id] for item in good])
        except Exception:
            if len(tasks) == 1:
                self._fail_task(tasks[0], good, out)
                return
            log.exception(
                "forward of %d items of %d tasks failed; retrying task by task", len(good), len(tasks)
            )
            for task_id in tasks:
                own = [item for item in good if item.task_id == task_id]
                try:
                    own_results = self._forward(own, [resolved[task_id]] * len(own))
                except Exception:
                    self._fail_task(task_id, own, out)
                    continue
                for item, r in zip(own, own_results, strict=True):
                    out[item.index] = r
            return
        for item, r in zip(good, results, strict=True):
            out[item.index] = r

    def _fail_task(self, task_id: str, items: list[BatchItem], out: list[Result | E2VPTError | None]) -> None:
        log.exception("forward of task %r failed (%d items)", task_id, len(items))
        self.metrics.observe_failure(task_id, "forward", len(items))
        for item in items:
            out[item.index] = E2VPTError(f"inference failed for task {task_id!r}")

    @torch.inference_mode()
    def _forward(self, good: list[BatchItem], entries: list[CachedPrompts]) -> list[Result | E2VPTError]:
        """One forward of `good`; entries[b] is item b's task. Prompts and heads come from the table. An item
        whose scores are not finite (its task's prompts overflow the serving dtype on this image) gets its
        own 500: a response never carries NaN, which is not JSON."""
        t0 = time.perf_counter()
        with stage("e2vpt.assemble"):
            batch = self.cache.table.gather([e.slot for e in entries])
            images = torch.stack([item.pixels for item in good]).to(device=self.device, dtype=self.dtype)
        with stage("e2vpt.forward"):
            feats = self.backend.features(images, *batch.prompts)
        with stage("e2vpt.head"):
            logits = batch.logits(feats.to(self.device), fill=float("-inf")).float()  # [B, largest C]
            probs = torch.softmax(logits, dim=1)  # padding is -inf: each row is its own task's softmax
            k_max = min(max(item.top_k for item in good), batch.width)
            idx = logits.topk(k_max, dim=1).indices  # on logits: padding (-inf) ranks below every class
            scores = probs.gather(1, idx).tolist()
            idx_list = idx.tolist()
        self.metrics.forward_seconds.observe(time.perf_counter() - t0)
        with stage("e2vpt.results"):
            results: list[Result | E2VPTError] = []
            for b, (item, entry) in enumerate(zip(good, entries, strict=True)):
                n = min(item.top_k, len(entry.labels))
                if not all(map(math.isfinite, scores[b][:n])):  # softmax makes a whole row NaN
                    results.append(self._non_finite(item.task_id))
                    continue
                preds = [
                    Prediction(entry.labels[j], s)
                    for s, j in zip(scores[b][:n], idx_list[b][:n], strict=True)
                ]
                results.append(Result(item.task_id, entry.version, preds))
        return results

    def _non_finite(self, task_id: str) -> E2VPTError:
        dtype = str(self.dtype).removeprefix("torch.")
        log.warning("task %r gave non-finite scores in %s", task_id, dtype)
        self.metrics.observe_failure(task_id, "forward")
        return E2VPTError(f"task {task_id!r} gave non-finite scores for this image (overflow in {dtype})")
