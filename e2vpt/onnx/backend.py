"""`OnnxBackend`: the `FeatureBackend` that runs a graph exported by `e2vpt.onnx.export` with onnxruntime.

Providers: TensorRT, then CUDA when onnxruntime-gpu provides them, CPU otherwise (or an explicit list).
The graph must come from the same backbone weights: its metadata fingerprint is checked against the
backbone's (`IncompatibleOnnxModel` otherwise). Prompt counts above what the graph was exported and
checked for are refused with `IncompatiblePromptSet` (the set cannot be served by this deployment).

Zero-size P/T: the graph itself runs P = 0 and T = 0 as zero-size dimensions (CPU, checked in tests).
GPU providers get at least one masked, all-zero slot instead (`min_slots=1`): a zero-size device buffer
has no address to bind and TensorRT optimisation profiles need dimensions >= 1. A masked slot gets
exactly zero attention weight and is dropped before pooling, so results do not change (tested).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.errors import BackendUnavailable, IncompatibleOnnxModel, IncompatiblePromptSet
from e2vpt.onnx.export import FORMAT_VERSION, INPUT_NAMES, OUTPUT_NAME, export_onnx, onnx_metadata

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_PROVIDERS = (*GPU_PROVIDERS, "CPUExecutionProvider")


def default_providers() -> list[str]:
    """TensorRT and CUDA where this onnxruntime build has them, CPU always."""
    available = set(ort.get_available_providers())
    return [p for p in DEFAULT_PROVIDERS if p in available]


def _pad_slots(values: Tensor, valid: Tensor, dim: int, size: int) -> tuple[Tensor, Tensor]:
    """Pad the slot axis `dim` of `values` (and axis 1 of `valid`) with zero, masked slots up to `size`."""
    n = values.shape[dim]
    if n >= size:
        return values, valid
    shape = list(values.shape)
    shape[dim] = size - n
    values = torch.cat([values, values.new_zeros(shape)], dim=dim)
    valid = torch.cat([valid, valid.new_zeros(valid.shape[0], size - n)], dim=1)
    return values, valid


class OnnxBackend:
    """onnxruntime inference of pooled features; `features` returns float32 on the images' device."""

    name = "onnxruntime"

    def __init__(
        self,
        backbone_or_info: Backbone | BackboneInfo,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        threads: int = 0,
        min_slots: int | None = None,
        max_batch: int = 64,
    ) -> None:
        info = backbone_or_info.info if isinstance(backbone_or_info, Backbone) else backbone_or_info
        self.info = info
        self.path = Path(path)
        if not self.path.is_file():
            raise IncompatibleOnnxModel(f"ONNX file {self.path} does not exist")
        try:
            meta = onnx_metadata(self.path)
        except Exception as exc:  # onnx raises DecodeError & co. for files that are not ONNX
            raise IncompatibleOnnxModel(f"{self.path} is not a readable ONNX model: {exc}") from exc
        if meta.get("format_version") != str(FORMAT_VERSION) or "fingerprint" not in meta:
            raise IncompatibleOnnxModel(
                f"{self.path} was not exported by e2vpt export-onnx (no e2vpt metadata)"
            )
        if meta["fingerprint"] != info.fingerprint:
            raise IncompatibleOnnxModel(
                f"{self.path} was exported from backbone {meta['fingerprint']}, not {info.fingerprint}; "
                "re-export it from these weights"
            )
        self.metadata = meta
        self.exported_info = BackboneInfo.from_dict(json.loads(meta["backbone"]))
        self.max_prompts = int(meta["max_prompts"])
        self.max_kv = int(meta["max_kv"])
        self.fp16 = meta.get("fp16") == "1"

        wanted = list(providers) if providers else default_providers()
        available = set(ort.get_available_providers())
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendUnavailable(
                f"onnxruntime execution providers {missing} are not available here (available: {sorted(available)})"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.min_slots = (
            (1 if any(p in GPU_PROVIDERS for p in wanted) else 0) if min_slots is None else min_slots
        )
        provider_args: list[str | tuple[str, dict[str, str]]] = [
            (p, self._tensorrt_options(max_batch)) if p == "TensorrtExecutionProvider" else p for p in wanted
        ]
        self.session = ort.InferenceSession(str(self.path), options, providers=provider_args)
        self.providers: list[str] = self.session.get_providers()
        self.on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise IncompatibleOnnxModel(f"{self.path} has inputs {names}, expected {list(INPUT_NAMES)}")
        width = self.session.get_outputs()[0].shape[-1]
        self.feature_dim = width if isinstance(width, int) else self.exported_info.embed_dim

    def _tensorrt_options(self, max_batch: int) -> dict[str, str]:
        i = self.info
        h, w = i.img_size
        lo = max(1, self.min_slots)

        def shapes(b: int, p: int, t: int) -> str:
            return ",".join(
                [
                    f"images:{b}x{i.in_chans}x{h}x{w}",
                    f"visual:{b}x{i.depth}x{p}x{i.embed_dim}",
                    f"kv:{b}x{i.depth}x2x{i.num_heads}x{t}x{i.head_dim}",
                    f"visual_valid:{b}x{p}",
                    f"kv_valid:{b}x{t}",
                ]
            )

        maxp, maxt = max(lo, self.max_prompts), max(lo, self.max_kv)
        return {
            "trt_fp16_enable": "True" if self.fp16 else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(self.path.parent / "trt_cache"),
            "trt_profile_min_shapes": shapes(1, lo, lo),
            "trt_profile_opt_shapes": shapes(min(8, max_batch), maxp, maxt),
            "trt_profile_max_shapes": shapes(max_batch, maxp, maxt),
        }

    def features(
        self, images: Tensor, visual: Tensor, kv: Tensor, visual_valid: Tensor | None, kv_valid: Tensor | None
    ) -> Tensor:
        P, T = visual.shape[2], kv.shape[4]
        if P > self.max_prompts or T > self.max_kv:
            raise IncompatiblePromptSet(
                f"{P} visual / {T} KV prompt tokens exceed what the ONNX graph was exported for "
                f"({self.max_prompts} / {self.max_kv}); re-export with larger --max-prompts/--max-kv"
            )
        device = images.device
        B = images.shape[0]  # the graph takes masks always (None: nothing padded)
        visual_valid = (
            visual_valid.bool() if visual_valid is not None else visual.new_ones(B, P, dtype=torch.bool)
        )
        kv_valid = kv_valid.bool() if kv_valid is not None else kv.new_ones(B, T, dtype=torch.bool)
        if self.min_slots:
            visual, visual_valid = _pad_slots(visual, visual_valid, 2, self.min_slots)
            kv, kv_valid = _pad_slots(kv, kv_valid, 4, self.min_slots)
        inputs = [t.float() for t in (images, visual, kv)] + [visual_valid, kv_valid]
        if self.on_gpu and device.type == "cuda":
            return self._run_bound(inputs, device)
        feeds = {
            name: t.detach().cpu().contiguous().numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)
        }
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(np.ascontiguousarray(out)).to(device)

    def _run_bound(self, inputs: list[Tensor], device: torch.device) -> Tensor:
        """Zero-copy on CUDA: bind the torch buffers and a preallocated output."""
        binding = self.session.io_binding()
        held = [t.contiguous() for t in inputs]  # keep the buffers alive until the run returns
        dev_id = device.index or 0
        for name, t in zip(INPUT_NAMES, held, strict=True):
            dtype = np.bool_ if t.dtype == torch.bool else np.float32
            binding.bind_input(name, "cuda", dev_id, dtype, list(t.shape), t.data_ptr())
        out = torch.empty(held[0].shape[0], self.feature_dim, dtype=torch.float32, device=device)
        binding.bind_output(OUTPUT_NAME, "cuda", dev_id, np.float32, list(out.shape), out.data_ptr())
        torch.cuda.synchronize(device)
        self.session.run_with_iobinding(binding)
        return out


def onnx_cache_path(backbone: Backbone, settings: Settings) -> Path:
    """Where `create_backend` keeps the graph it exports: one file per fingerprint and export options."""
    s = settings
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone.info.fingerprint)
    max_p, max_t = s.onnx_limits
    name = f"{key}-p{max_p}-t{max_t}-o{s.onnx_opset}-{s.onnx_exporter}"
    return Path(s.onnx_cache_dir).expanduser() / f"{name}{'-fp16' if s.onnx_fp16 else ''}.onnx"


def create_backend(backbone: Backbone, settings: Settings) -> OnnxBackend:
    """The onnxruntime backend from settings: serve `onnx_path` when set (checked against the backbone's
    fingerprint), else export once to `onnx_cache_path` (atomic rename, so concurrent workers never read
    a partial file) and reuse it. A float16 backbone (serving_dtype) gets an fp16 graph."""
    if settings.onnx_path:
        path = Path(settings.onnx_path).expanduser()
    else:
        fp16 = settings.onnx_fp16 or backbone.dtype == torch.float16
        path = onnx_cache_path(backbone, settings.model_copy(update={"onnx_fp16": fp16}))
        if not path.is_file():
            export_onnx(
                backbone,
                path,
                max_prompts=settings.onnx_limits[0],
                max_kv=settings.onnx_limits[1],
                opset=settings.onnx_opset,
                fp16=fp16,
                exporter=settings.onnx_exporter,
                limits=settings.prompt_limits,
            )
    return OnnxBackend(backbone, path, settings.onnx_providers or None, threads=settings.onnx_threads)
