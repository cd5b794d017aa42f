"""`MultiTaskEngine`: many E2VPT tasks on one frozen backbone, one mixed batch per call.

predict(items) decodes every image, resolves every item's task through the `PromptCache`, builds one
`TaskBatch` of the distinct tasks, runs ONE backbone forward with per-image prompts (any
`FeatureBackend`), applies each image's own head and returns top-k labels and scores. Items that fail
(bad image, unknown task, store down, ...) get their typed error in their slot; the rest succeed.

Isolation: an unexpected exception while reading one item is that item's 500. When the mixed forward
fails, every task is retried alone, so a task whose prompts break the forward fails only its own items
(500, counted per task in `e2vpt_item_failures`). 503 means only "prompt store unavailable".

No TorchServe import: the TorchServe handler, benchmarks and tests all drive this class directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import Backbone, backbone_from_settings
from e2vpt.core.images import decode_image, eval_transform
from e2vpt.core.model import TaskBatch
from e2vpt.core.promptset import check_task_id
from e2vpt.errors import BadRequest, E2VPTError, http_status
from e2vpt.registry.store import PromptStore
from e2vpt.serving.backends import FeatureBackend, make_backend
from e2vpt.serving.cache import CachedPrompts, PromptCache
from e2vpt.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

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


def serving_dtype(settings: Settings) -> torch.dtype:
    if settings.serving_dtype not in DTYPES:
        raise BadRequest(
            f"unknown serving dtype {settings.serving_dtype!r}; expected one of {sorted(DTYPES)}"
        )
    return DTYPES[settings.serving_dtype]


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
        self._transforms: dict[str, Callable[[Image.Image], torch.Tensor]] = {}
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

    # ------------------------------------------------------------------ inference
    def predict(
        self, items: Sequence[RequestItem | E2VPTError], top_k: int | None = None
    ) -> list[Result | E2VPTError]:
        """One result or typed error per item, in order. Items may already be errors (bad requests
        found while parsing): they are passed through and counted."""
        t0 = time.perf_counter()
        default_k = top_k if top_k is not None else self.settings.top_k
        out: list[Result | E2VPTError | None] = [None] * len(items)
        ready: list[tuple[int, str, Image.Image, int]] = []
        for i, item in enumerate(items):
            if isinstance(item, E2VPTError):
                out[i] = item
                continue
            try:
                task_id = check_task_id(item.task_id)
                k = item.top_k if item.top_k is not None else default_k
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise BadRequest(f"top_k must be a positive integer, got {k!r}")
                img = decode_image(
                    item.image,
                    max_pixels=self.settings.max_image_pixels,
                    max_bytes=self.settings.max_image_bytes,
                )
                ready.append((i, task_id, img, k))
            except E2VPTError as exc:
                out[i] = exc
            except Exception as exc:  # a decoder bug fails its own item, never the batch
                log.exception("item %d could not be read", i)
                out[i] = E2VPTError(f"unreadable item: {type(exc).__name__}")
        resolved = self.cache.get_many(t for _, t, _, _ in ready)
        good: list[tuple[int, str, torch.Tensor, int]] = []
        for i, task_id, img, k in ready:
            res = resolved[task_id]
            if isinstance(res, E2VPTError):
                out[i] = res
                continue
            try:  # each task's own preprocessing recipe: the pixels it was trained on
                good.append((i, task_id, self.transform(res.prompts.recipe)(img), k))
            except Exception as exc:
                log.exception("item %d could not be transformed", i)
                out[i] = (
                    exc
                    if isinstance(exc, E2VPTError)
                    else E2VPTError(f"unreadable item: {type(exc).__name__}")
                )
        tasks: list[str] = list(dict.fromkeys(t for _, t, _, _ in good))
        if good:
            self._forward_isolated(good, tasks, resolved, out)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
        self.metrics.observe_batch(len(items), len(tasks))
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
        good: list[tuple[int, str, torch.Tensor, int]],
        tasks: list[str],
        resolved: dict[str, CachedPrompts],
        out: list[Result | E2VPTError | None],
    ) -> None:
        """One forward of all `good` items; if it fails, one forward per task, so that a task whose
        prompts break the forward fails only its own items (500, counted per task)."""
        try:
            results = self._forward(good, tasks, [resolved[t] for t in tasks])
        except Exception:
            if len(tasks) == 1:
                self._fail_task(tasks[0], good, out)
                return
            log.exception(
                "forward of %d items of %d tasks failed; retrying task by task", len(good), len(tasks)
            )
            for task_id in tasks:
                own = [g for g in good if g[1] == task_id]
                try:
                    results = self._forward(own, [task_id], [resolved[task_id]])
                except Exception:
                    self._fail_task(task_id, own, out)
                    continue
                for (i, _, _, _), r in zip(own, results, strict=True):
                    out[i] = r
            return
        for (i, _, _, _), r in zip(good, results, strict=True):
            out[i] = r

    def _fail_task(
        self,
        task_id: str,
        items: list[tuple[int, str, torch.Tensor, int]],
        out: list[Result | E2VPTError | None],
    ) -> None:
        log.exception("forward of task %r failed (%d items)", task_id, len(items))
        self.metrics.observe_failure(task_id, "forward", len(items))
        for i, _, _, _ in items:
            out[i] = E2VPTError(f"inference failed for task {task_id!r}")

    def transform(self, recipe: str) -> Callable[[Image.Image], torch.Tensor]:
        """The eval transform of a preprocessing recipe (built once per recipe)."""
        if recipe not in self._transforms:
            self._transforms[recipe] = eval_transform(self.info, recipe)
        return self._transforms[recipe]

    @torch.inference_mode()
    def _forward(
        self, good: list[tuple[int, str, torch.Tensor, int]], tasks: list[str], entries: list[CachedPrompts]
    ) -> list[Result]:
        t0 = time.perf_counter()
        position = {t: u for u, t in enumerate(tasks)}
        batch = TaskBatch.from_prompt_sets([e.prompts for e in entries], device=self.device, dtype=self.dtype)
        task_index = torch.tensor([position[t] for _, t, _, _ in good], device=self.device)
        images = torch.stack([x for _, _, x, _ in good]).to(device=self.device, dtype=self.dtype)
        feats = self.backend.features(images, *batch.gather(task_index))
        logits = batch.logits(feats.to(self.device), task_index).float()
        self.metrics.forward_seconds.observe(time.perf_counter() - t0)
        results = []
        for b, (_, task_id, _, k) in enumerate(good):
            entry = entries[position[task_id]]
            c = len(entry.labels)
            probs = torch.softmax(logits[b, :c], dim=0)
            scores, idx = probs.topk(min(k, c))
            preds = [
                Prediction(entry.labels[j], float(s))
                for s, j in zip(scores.tolist(), idx.tolist(), strict=True)
            ]
            results.append(Result(task_id, entry.version, preds))
        return results
