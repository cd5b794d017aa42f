"""Export the frozen backbone with E2VPT prompts as graph inputs to ONNX: one graph serves every task.

Graph (names are the contract with `e2vpt.onnx.backend`):
    images        float32 [B, C, H, W]          H, W fixed at the backbone's img_size
    visual        float32 [B, L, P, D]          per-image deep visual prompts, zero padded
    kv            float32 [B, L, 2, H, T, Dh]   per-image key/value prompts, zero padded
    visual_valid  bool    [B, P]                True = a real prompt, False = padding
    kv_valid      bool    [B, T]                True = a real KV slot, False = padding
    -> pooled     float32 [B, D]                the backbone's pooled feature (pre-logits)

B, P and T are dynamic. The per-task heads stay outside the graph (`TaskBatch.logits`): heads differ in
C per task and are tiny (one matmul), while keeping them out means the graph never changes when a task is
added and needs no third padded dimension.

Choices:
- Exporter: `torch.onnx.export(dynamo=True)` (torch.export) by default. Under graph capture
  `PromptedViT.forward_features` takes one path for every input (the key-padding mask is always built,
  prompts are replaced out of place); P and T are symbolic, so the same graph runs P = 0 and T = 0 as
  zero-size dimensions (concatenating an empty tensor and slicing from npre + 0 are no-ops; checked at
  export and in tests). The legacy TorchScript tracer (`exporter="legacy"`) gives an equivalent graph
  (tracing would silently bake the eager, data-dependent "is anything padded?" check in; the model
  avoids it while tracing) and exports ~20x faster; it is deprecated upstream, so it is the fallback.
- Attention: `F.scaled_dot_product_attention` with the additive (0 / -inf) key-padding mask exports
  as MatMul/Softmax (+ mask) and onnxruntime fuses what it can. Masked keys get
  exactly zero weight, so padding never changes a real image's result.
- Opset 18 by default: LayerNormalization is a single op from opset 17, and 18 is the dynamo
  exporter's native opset (no version conversion). Supported: 17..20 with the legacy exporter,
  18..22 with dynamo. Opset 23 is refused: there SDPA becomes the ONNX `Attention` op, and
  onnxruntime 1.31's CPU kernel rejects a broadcast [B, 1, 1, S] key-padding mask ("inconsistent
  q_sequence_length between attn_mask and Q").
- dtype: the graph is float32 (CPU kernels are float32; parity <= 1e-3 with PyTorch). `fp16=True`
  exports a float16 copy of the backbone between casts, so graph inputs/outputs stay float32 and
  callers do not change; meant for the CUDA/TensorRT providers (half the memory, tensor cores).
  (onnxruntime's float16 converter was tried first: its output fails `onnx.checker` - cast nodes out
  of topological order.) A float16 backbone
  exports only with fp16=True; bfloat16 backbones are refused: export from the float32 weights.
- Metadata: the backbone fingerprint, its description and the export options are stored in the
  model's metadata_props; `OnnxBackend` refuses a file made from other weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from e2vpt.config import DEFAULT_LIMITS, PromptLimits, get_settings
from e2vpt.core.backbone import Backbone, BackboneInfo, check_supported, load_backbone
from e2vpt.core.model import PromptedViT
from e2vpt.errors import ExportError

log = logging.getLogger(__name__)

INPUT_NAMES = ("images", "visual", "kv", "visual_valid", "kv_valid")
OUTPUT_NAME = "pooled"
META_PREFIX = "e2vpt."
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")
OPSETS = {"legacy": range(17, 21), "dynamo": range(18, 23)}
POOLS = ("token", "avg", "max", "avgmax", "map")
MAX_GRAPH_BYTES = 2**31 - 64 * 2**20  # protobuf's 2 GB limit, with room for the graph itself
# Parity bar for the export-time check (float32; fp16 graphs are checked more loosely).
VERIFY_ATOL = {False: 1e-3, True: 5e-2}


class FeatureGraph(nn.Module):
    """What is exported: `PromptedViT.forward_features` (its graph-capture path: mask always built).

    With `compute_dtype` float16 the (copied) backbone runs in half precision between casts, so graph
    inputs and output stay float32."""

    def __init__(self, model: PromptedViT, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    def forward(
        self, images: Tensor, visual: Tensor, kv: Tensor, visual_valid: Tensor, kv_valid: Tensor
    ) -> Tensor:
        dt = self.compute_dtype
        feats = self.model.forward_features(images.to(dt), visual.to(dt), kv.to(dt), visual_valid, kv_valid)
        return feats.float()


def check_exportable(
    backbone: Backbone,
    *,
    max_prompts: int,
    max_kv: int,
    opset: int,
    exporter: str = "dynamo",
    fp16: bool = False,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> None:
    """Refuse what the graph cannot express, before spending time on an export."""
    vit = backbone.model
    check_supported(vit)  # UnsupportedBackbone for non-ViT models / foreign blocks
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if fp16 and exporter != "dynamo":
        raise ExportError(
            "fp16 export needs the dynamo exporter (the legacy tracer emits mixed-type LayerNorm)"
        )
    if opset not in OPSETS[exporter]:
        lo, hi = OPSETS[exporter][0], OPSETS[exporter][-1]
        raise ExportError(f"opset {opset} is not supported with the {exporter} exporter (use {lo}..{hi})")
    if getattr(vit, "dynamic_img_size", False) or getattr(vit.patch_embed, "dynamic_img_pad", False):
        raise ExportError(
            "backbones built with dynamic_img_size/dynamic_img_pad cannot be exported: the graph fixes the "
            f"image size at {backbone.info.img_size}; build the backbone without them"
        )
    if vit.global_pool not in POOLS:
        raise ExportError(
            f"global_pool={vit.global_pool!r} yields no pooled [B, D] feature; export needs one of {POOLS}"
        )
    if backbone.dtype != torch.float32 and not (backbone.dtype == torch.float16 and fp16):
        raise ExportError(
            f"a {backbone.dtype} backbone exports only with fp16=True (float16 weights) or from float32 weights"
        )
    weight_bytes = sum(t.numel() * (2 if fp16 else 4) for t in vit.state_dict().values())
    if weight_bytes >= MAX_GRAPH_BYTES:
        raise ExportError(
            f"{backbone.info.name} has {weight_bytes / 1e9:.2f} GB of weights: single-file ONNX graphs are "
            "limited to 2 GB (protobuf); export with fp16=True or use a smaller backbone"
        )
    for name, value, cap in (
        ("max_prompts", max_prompts, limits.max_prompt_tokens),
        ("max_kv", max_kv, limits.max_kv_tokens),
    ):
        if not isinstance(value, int) or value < 0 or value > cap:
            raise ExportError(f"{name} must be an integer in 0..{cap}, got {value!r}")


def example_inputs(
    info: BackboneInfo,
    batch: int,
    num_prompts: int,
    num_kv: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random graph inputs; the first image of the batch has all slots valid, the others a random subset."""
    g = generator or torch.Generator().manual_seed(0)
    L, D, H, Dh = info.depth, info.embed_dim, info.num_heads, info.head_dim
    images = torch.randn(batch, info.in_chans, *info.img_size, generator=g)
    visual = torch.rand(batch, L, num_prompts, D, generator=g) * 0.2 - 0.1
    kv = torch.rand(batch, L, 2, H, num_kv, Dh, generator=g) * 0.6 - 0.3
    visual_valid = torch.rand(batch, num_prompts, generator=g) > 0.4
    kv_valid = torch.rand(batch, num_kv, generator=g) > 0.4
    visual_valid[0], kv_valid[0] = True, True
    visual = visual * visual_valid[:, None, :, None]
    kv = kv * kv_valid[:, None, None, None, :, None]
    return tuple(t.to(device) for t in (images, visual, kv, visual_valid, kv_valid))  # type: ignore[return-value]


# The graph inputs' dynamic axes, by name: one table for both exporters.
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "images": {0: "batch"},
    "visual": {0: "batch", 2: "num_prompts"},
    "kv": {0: "batch", 4: "num_kv"},
    "visual_valid": {0: "batch", 1: "num_prompts"},
    "kv_valid": {0: "batch", 1: "num_kv"},
}


def _export_graph(
    graph: FeatureGraph, args: tuple[Tensor, ...], path: Path, opset: int, exporter: str
) -> None:
    common = {
        "input_names": list(INPUT_NAMES),
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter; failures still raise
        if exporter == "legacy":
            axes = {**DYNAMIC_AXES, OUTPUT_NAME: {0: "batch"}}
            torch.onnx.export(graph, args, str(path), dynamic_axes=axes, dynamo=False, **common)
            return
        dims = {
            "batch": torch.export.Dim("batch", min=1),
            "num_prompts": torch.export.Dim("num_prompts", min=0),
            "num_kv": torch.export.Dim("num_kv", min=0),
        }
        shapes = {name: {i: dims[d] for i, d in axes.items()} for name, axes in DYNAMIC_AXES.items()}
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamic_shapes=shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
            **common,
        )


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The e2vpt.* metadata of an exported graph (reads the graph structure only, not external weights)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(META_PREFIX): p.value
        for p in model.metadata_props
        if p.key.startswith(META_PREFIX)
    }


def export_onnx(
    backbone: Backbone,
    path: str | Path,
    *,
    max_prompts: int,
    max_kv: int,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    exporter: str = "dynamo",
    verify: bool = True,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> Path:
    """Export `PromptedViT.forward_features` of `backbone` to `path` (see the module docstring).

    The file is written atomically (temp file + rename), checked with `onnx.checker` and, with `verify`,
    run with onnxruntime at P/T = 0/0, max/max and mixed padding against PyTorch (ExportError if the
    results differ by more than 1e-3 in float32).
    """
    check_exportable(
        backbone,
        max_prompts=max_prompts,
        max_kv=max_kv,
        opset=opset,
        exporter=exporter,
        fp16=fp16,
        limits=limits,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = backbone.info
    if fp16:  # a half-precision copy: the caller's backbone stays float32
        half = Backbone(model=copy.deepcopy(backbone.model).half(), info=info)
        graph = FeatureGraph(PromptedViT(half).eval(), torch.float16)
    else:
        graph = FeatureGraph(PromptedViT(backbone).eval())
    # Example sizes >= 2 and distinct, so the exporter never specialises a dynamic dimension to 0/1.
    args = example_inputs(info, 2, 3, 4, device=backbone.device)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _export_graph(graph, args, tmp, opset, exporter)
        except Exception as exc:  # the exporters raise many types; all mean "cannot express this"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(
                f"{exporter} export of {info.name} failed: {type(exc).__name__}: {first}"
            ) from exc
        model = onnx.load(str(tmp))
        meta = {
            "format_version": str(FORMAT_VERSION),
            "fingerprint": info.fingerprint,
            "backbone": json.dumps(info.to_dict()),
            "max_prompts": str(max_prompts),
            "max_kv": str(max_kv),
            "opset": str(opset),
            "fp16": "1" if fp16 else "0",
            "exporter": exporter,
            "torch": torch.__version__,
        }
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=META_PREFIX + key, value=value)
        model.doc_string = f"E2VPT prompted features of {info.fingerprint}"
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
        onnx.save(model, str(tmp))
        if verify:
            verify_export(backbone, tmp, max_prompts=max_prompts, max_kv=max_kv, atol=VERIFY_ATOL[fp16])
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "exported %s to %s (P<=%d, T<=%d, opset %d, fp16=%s)",
        info.fingerprint,
        path,
        max_prompts,
        max_kv,
        opset,
        fp16,
    )
    return path


def verify_export(
    backbone: Backbone,
    path: str | Path,
    *,
    max_prompts: int,
    max_kv: int,
    atol: float = 1e-3,
    sizes: list[tuple[int, int]] | None = None,
) -> float:
    """Run the graph with onnxruntime (CPU) against PyTorch at (P, T) `sizes` (default 0/0, max/max and
    mixed); return the largest abs difference, ExportError above `atol`."""
    from e2vpt.onnx.backend import OnnxBackend

    sizes = sizes or sorted(
        {
            (0, 0),
            (max_prompts, max_kv),
            (max_prompts, 0),
            (0, max_kv),
            (max_prompts // 2, max_kv // 2 + 1 if max_kv else 0),
        }
    )
    onnx_backend = OnnxBackend(backbone, path, providers=["CPUExecutionProvider"])
    model = PromptedViT(backbone).eval()
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    for p, t in sizes:
        args = example_inputs(backbone.info, 2, p, t, generator=g)
        with torch.inference_mode():
            floats = [a.to(backbone.device, backbone.dtype) for a in args[:3]]
            masks = [a.to(backbone.device) for a in args[3:]]
            ref = model.forward_features(*floats, *masks).float().cpu()
        try:
            got = onnx_backend.features(*args).cpu()
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise ExportError(f"onnxruntime cannot run the exported graph at P={p}, T={t}: {exc}") from exc
        diff = float((got - ref).abs().max())
        worst = max(worst, diff)
        if not diff <= atol:
            raise ExportError(f"exported graph differs from PyTorch by {diff:.3g} at P={p}, T={t} (> {atol})")
    return worst


def _cmd_export(args: argparse.Namespace) -> int:
    if not args.backbone and not args.checkpoint:
        raise SystemExit("give --backbone NAME or --checkpoint FILE")
    backbone = load_backbone(args.backbone, checkpoint=args.checkpoint, **json.loads(args.model_kwargs))
    out = export_onnx(
        backbone,
        args.out,
        max_prompts=args.max_prompts,
        max_kv=args.max_kv,
        opset=args.opset,
        fp16=args.fp16,
        exporter=args.exporter,
        verify=not args.no_verify,
        limits=get_settings().prompt_limits,
    )
    summary: dict[str, Any] = {"path": str(out), "bytes": out.stat().st_size, **onnx_metadata(out)}
    summary.pop("backbone", None)
    print(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="export the prompted backbone to ONNX (prompts are graph inputs)")
    p.add_argument("--backbone", help="timm model name (random init unless --checkpoint)")
    p.add_argument("--checkpoint", help="backbone weights (.safetensors saved by this project, .pth, .npz)")
    p.add_argument("--model-kwargs", default="{}", help="JSON timm kwargs, e.g. '{\"img_size\": 32}'")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--max-prompts", type=int, default=get_settings().onnx_limits[0])
    p.add_argument("--max-kv", type=int, default=get_settings().onnx_limits[1])
    p.add_argument("--opset", type=int, default=get_settings().onnx_opset)
    p.add_argument("--fp16", action="store_true", help="float16 weights/compute (for GPU providers)")
    p.add_argument("--exporter", choices=EXPORTERS, default=get_settings().onnx_exporter)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.set_defaults(func=_cmd_export)
