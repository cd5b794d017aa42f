"""`PromptSet`: one task's learned E2VPT parameters and metadata, and its one file format.

The format is a safetensors file (tensors + a JSON string under the metadata key ``e2vpt``); the same
bytes go to disk, over HTTP and into Redis. Nothing is ever unpickled.

Tensors (float32, float16 or bfloat16; all float tensors share one dtype):
    visual        [L, P, D]        deep visual prompts, one set per block
    kv            [L, K, H, T, Dh] key-value prompts; K = 1 when K and V are tied (stored once), 2 otherwise
    head_weight   [C, D]           the task's linear head
    head_bias     [C]
    segment_mask  [P, R] uint8     optional: kept (1) / pruned (0) segments of every visual token
    token_mask    [P] uint8        optional: kept / pruned tokens (absent from a compacted set)

Masks hold 0 and 1 only (uint8 in a file; bool is accepted in memory and stored as uint8). The metadata
(everything but the labels) is at most `max_metadata_bytes` of JSON, finite numbers only, nested at most
`MAX_METADATA_DEPTH` levels; labels are at most `max_label_chars` characters each. Float values are finite
and at most `max_abs_value` in magnitude (float16's range by default: a GPU serves in float16).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from e2vpt.config import DEFAULT_LIMITS, PromptLimits
from e2vpt.core import safejson
from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.images import RECIPES
from e2vpt.core.method import DEFAULTS, SEGMENT_LAYOUTS, MethodConfig
from e2vpt.core.promptfile import MAX_METADATA_DEPTH, META_KEY, read_file
from e2vpt.core.promptfile import read_metadata as _read_metadata
from e2vpt.errors import (
    CorruptPromptSet,
    IncompatiblePromptSet,
    InvalidPromptSet,
    InvalidTaskId,
    PromptSetTooLarge,
    UnsupportedFormatVersion,
    excerpt,
)

FORMAT_VERSION = 1
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_KEYS = {"visual", "kv", "head_weight", "head_bias"}
_MASK_KEYS = {"segment_mask", "token_mask"}
MASK_DTYPES = (torch.uint8, torch.bool)


def check_task_id(task_id: object) -> str:
    """Task ids: 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise InvalidTaskId(
            f"invalid task id {excerpt(task_id)}: use 1-128 characters [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return task_id


def expand_segment_mask(mask: torch.Tensor, dim: int, layout: str = "contiguous") -> torch.Tensor:
    """[P, R] segment mask -> [P, D] per-dimension mask.

    contiguous (paper): dimension d belongs to segment d // (D / R); strided (official code): d % R.
    """
    p, r = mask.shape
    if dim % r:
        raise InvalidPromptSet(f"embedding width {dim} is not divisible by {r} segments")
    if layout == "contiguous":
        return mask.repeat_interleave(dim // r, dim=1)
    if layout == "strided":
        return mask.repeat(1, dim // r)
    raise InvalidPromptSet(f"unknown segment layout {layout!r}; expected one of {SEGMENT_LAYOUTS}")


@dataclass
class PromptSet:
    """One task's parameters. Create with `PromptSet.create`, read with `load`/`from_bytes`."""

    task_id: str
    visual: torch.Tensor
    kv: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    labels: list[str]
    backbone: str
    fingerprint: str
    segment_mask: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    method: str = "e2vpt"
    config: MethodConfig = field(default_factory=MethodConfig)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):  # a JSON object (a file, `replace(ps, config={...})`)
            self.config = MethodConfig.from_dict(self.config)

    # ------------------------------------------------------------------ shapes
    @property
    def num_prompts(self) -> int:
        return int(self.visual.shape[1])

    @property
    def num_kv(self) -> int:
        return int(self.kv.shape[3])

    @property
    def num_classes(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def share_kv(self) -> bool:
        return int(self.kv.shape[1]) == 1

    @property
    def recipe(self) -> str:
        """The preprocessing recipe the set was trained with (`e2vpt.core.images.RECIPES`); serving applies it."""
        return self.config.preprocessing

    @property
    def segment_layout(self) -> str:
        return self.config.segment_layout

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_parameters(self) -> int:
        """Parameters really kept: pruned segments (stored as zeros) are not counted."""
        visual = self.visual.numel()
        if self.segment_mask is not None:
            kept_tokens = self.token_mask.bool() if self.token_mask is not None else slice(None)
            seg = self.segment_mask[kept_tokens].float()
            visual = (
                int(seg.sum().item() * (self.visual.shape[2] // max(seg.shape[1], 1))) * self.visual.shape[0]
            )
        elif self.token_mask is not None:
            visual = int(self.token_mask.sum().item()) * self.visual.shape[0] * self.visual.shape[2]
        return visual + self.kv.numel() + self.head_weight.numel() + self.head_bias.numel()

    @property
    def is_masked(self) -> bool:
        """True when a token or segment mask is attached (the model sees `masked_visual()`)."""
        return self.token_mask is not None or self.segment_mask is not None

    def kv_pair(self) -> torch.Tensor:
        """KV prompts as [L, 2, H, T, Dh] (a tied set is expanded, not copied)."""
        return self.kv.expand(-1, 2, -1, -1, -1) if self.share_kv else self.kv

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        task_id: str,
        info: BackboneInfo,
        labels: list[str],
        *,
        num_prompts: int = DEFAULTS.num_prompts,
        num_kv: int = DEFAULTS.num_kv,
        share_kv: bool = DEFAULTS.share_kv,
        num_segments: int = DEFAULTS.num_segments,
        segment_layout: str = DEFAULTS.segment_layout,
        method: str = "e2vpt",
        generator: torch.Generator | None = None,
        config: MethodConfig | dict[str, Any] | None = None,
    ) -> PromptSet:
        """A fresh set with the paper's initialisation. `config` adds keys (e.g. the recipe); the shape
        arguments win over its shape fields.

        visual: U(+-sqrt(6 / (3*ph*pw + D))); kv: kaiming-uniform over fan_in T*Dh, U(+-sqrt(6 / (T*Dh)));
        head: weight trunc-normal(std 0.02) as timm's heads, bias 0 (not the official -log(99)).
        """
        check_task_id(task_id)
        L, D, H, Dh = info.depth, info.embed_dim, info.num_heads, info.head_dim
        C = len(labels)

        def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound

        visual = uniform((L, num_prompts, D), info.visual_init_bound)
        kv_bound = math.sqrt(6.0 / (num_kv * Dh)) if num_kv else 0.0
        kv = uniform((L, 1 if share_kv else 2, H, num_kv, Dh), kv_bound)
        head_weight = torch.empty(C, D)
        torch.nn.init.trunc_normal_(head_weight, std=0.02, a=-0.04, b=0.04, generator=generator)
        cfg = MethodConfig.from_dict(config).updated(
            num_prompts=num_prompts,
            num_kv=num_kv,
            share_kv=share_kv,
            num_segments=num_segments,
            segment_layout=segment_layout,
        )
        return cls(
            task_id=task_id,
            visual=visual,
            kv=kv,
            head_weight=head_weight,
            head_bias=torch.zeros(C),
            labels=list(labels),
            backbone=info.name,
            fingerprint=info.fingerprint,
            method=method,
            config=cfg,
        )

    # ------------------------------------------------------------------ pruning
    def compact(self) -> PromptSet:
        """Remove pruned tokens (P really shrinks) and store pruned segments as zeros.

        The result gives exactly the logits of this set run with its masks. Device-safe: the prompts
        may be on a GPU while the masks stay on the CPU; the kept masks keep their own device.
        """
        visual, segment_mask = self.visual, self.segment_mask
        cfg = self.config.to_dict()
        if self.token_mask is not None:
            kept = torch.nonzero(self.token_mask.bool().cpu()).flatten()  # indices, found on the host
            visual = visual.index_select(1, kept.to(visual.device))
            if segment_mask is not None:
                segment_mask = segment_mask.index_select(0, kept.to(segment_mask.device))
            cfg["kept_token_indices"] = kept.tolist()
            cfg["num_prompts_before_compaction"] = self.num_prompts
        if segment_mask is not None:
            dim_mask = expand_segment_mask(segment_mask.bool(), visual.shape[2], self.segment_layout)
            # masks may live on another device than the prompts (`to` moves only the float tensors)
            visual = visual * dim_mask.to(device=visual.device, dtype=visual.dtype)
        cfg["num_prompts"] = int(visual.shape[1])
        return replace(
            self, visual=visual.contiguous(), segment_mask=segment_mask, token_mask=None, config=cfg
        )

    def masked_visual(self) -> torch.Tensor:
        """Visual prompts as the model sees them: pruned tokens removed, pruned segments zeroed."""
        return self.compact().visual

    # ------------------------------------------------------------------ conversion
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptSet:
        """A copy with float tensors on `device` in `dtype` (masks stay uint8)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return replace(
            self,
            visual=move(self.visual),
            kv=move(self.kv),
            head_weight=move(self.head_weight),
            head_bias=move(self.head_bias),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "visual": self.visual,
            "kv": self.kv,
            "head_weight": self.head_weight,
            "head_bias": self.head_bias,
        }
        if self.segment_mask is not None:
            out["segment_mask"] = self.segment_mask.to(torch.uint8)
        if self.token_mask is not None:
            out["token_mask"] = self.token_mask.to(torch.uint8)
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "task_id": self.task_id,
            "labels": self.labels,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "config": self.config.to_dict(),
            "metrics": self.metrics,
            "created_at": self.created_at,
        }

    def summary(self) -> dict[str, Any]:
        """Metadata plus derived numbers, without tensors (what listings show)."""
        return {
            **self.metadata(),
            "num_prompts": self.num_prompts,
            "num_kv": self.num_kv,
            "num_classes": self.num_classes,
            "share_kv": self.share_kv,
            "num_parameters": self.num_parameters,
            "nbytes": self.nbytes,
            "dtype": str(self.visual.dtype).removeprefix("torch."),
        }

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        return st_save(tensors, metadata={META_KEY: json.dumps(self.metadata(), sort_keys=True)})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, limits: PromptLimits = DEFAULT_LIMITS, max_bytes: int | None = None
    ) -> PromptSet:
        limit = max_bytes if max_bytes is not None else limits.max_bytes
        return cls.from_bytes(read_file(path, limit), limits=limits, max_bytes=limit)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, limits: PromptLimits = DEFAULT_LIMITS, max_bytes: int | None = None
    ) -> PromptSet:
        """Parse and structurally check a prompt-set file; `validate(info)` checks it against a backbone.
        `max_bytes` overrides `limits.max_bytes`."""
        limit = max_bytes if max_bytes is not None else limits.max_bytes
        if len(data) > limit:
            raise PromptSetTooLarge(f"prompt set is {len(data)} bytes; the limit is {limit}")
        meta = _read_metadata(data)
        try:
            tensors = st_load(bytes(data))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptPromptSet(f"unreadable safetensors payload: {exc}") from exc
        missing = _TENSOR_KEYS - tensors.keys()
        unknown = tensors.keys() - _TENSOR_KEYS - _MASK_KEYS
        if missing or unknown:
            raise InvalidPromptSet(f"tensors missing {sorted(missing)}, unknown {sorted(unknown)}")
        try:
            ps = cls(
                task_id=meta["task_id"],
                visual=tensors["visual"],
                kv=tensors["kv"],
                head_weight=tensors["head_weight"],
                head_bias=tensors["head_bias"],
                labels=meta["labels"],
                backbone=meta["backbone"],
                fingerprint=meta["fingerprint"],
                segment_mask=tensors.get("segment_mask"),
                token_mask=tensors.get("token_mask"),
                method=meta.get("method", "e2vpt"),
                config=meta.get("config", {}),
                metrics=meta.get("metrics", {}),
                created_at=meta.get("created_at", ""),
                format_version=meta["format_version"],
            )
        except KeyError as exc:
            raise InvalidPromptSet(f"metadata lacks field {exc.args[0]!r}") from exc
        ps.check_structure(limits)
        return ps

    # ------------------------------------------------------------------ validation
    def check_structure(self, limits: PromptLimits = DEFAULT_LIMITS) -> None:
        """Everything that can be checked without a backbone. Raises a typed `InvalidPromptSet`."""
        if self.format_version != FORMAT_VERSION:
            raise UnsupportedFormatVersion(
                f"format version {self.format_version!r} is not supported "
                f"(this server reads {FORMAT_VERSION})"
            )
        check_task_id(self.task_id)
        for key in ("backbone", "fingerprint", "method", "created_at"):
            if not isinstance(getattr(self, key), str):
                raise InvalidPromptSet(f"metadata field {key!r} must be a string")
        if not isinstance(self.config, MethodConfig) or not isinstance(self.metrics, dict):
            raise InvalidPromptSet("metadata fields 'config' and 'metrics' must be objects")
        if self.recipe not in RECIPES:
            raise InvalidPromptSet(f"unknown preprocessing recipe {self.recipe!r}; expected one of {RECIPES}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise InvalidPromptSet("labels must be a list of strings")
        longest = max((len(x) for x in self.labels), default=0)
        if longest > limits.max_label_chars:
            raise InvalidPromptSet(f"a label has {longest} characters; the limit is {limits.max_label_chars}")
        self._check_metadata_size(limits.max_metadata_bytes)
        floats = {
            "visual": self.visual,
            "kv": self.kv,
            "head_weight": self.head_weight,
            "head_bias": self.head_bias,
        }
        dtypes = {t.dtype for t in floats.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
            raise InvalidPromptSet(
                f"tensors must share one dtype of float32/float16/bfloat16, got {sorted(map(str, dtypes))}"
            )
        expected_ndim = {"visual": 3, "kv": 5, "head_weight": 2, "head_bias": 1}
        for key, t in floats.items():
            if t.ndim != expected_ndim[key]:
                raise InvalidPromptSet(
                    f"{key} must have {expected_ndim[key]} dimensions, got shape {tuple(t.shape)}"
                )
        L, P, D = self.visual.shape
        kL, K, _, T, _ = self.kv.shape
        C = self.head_weight.shape[0]
        if kL != L:
            raise InvalidPromptSet(f"kv has {kL} blocks but visual has {L}")
        if K not in (1, 2):
            raise InvalidPromptSet(f"kv axis 1 must be 1 (tied K/V) or 2 (separate), got {K}")
        if self.head_weight.shape[1] != D:
            raise InvalidPromptSet(f"head_weight is {tuple(self.head_weight.shape)}; expected [C, {D}]")
        if tuple(self.head_bias.shape) != (C,):
            raise InvalidPromptSet(f"head_bias is {tuple(self.head_bias.shape)}; expected [{C}]")
        if C < 1 or len(self.labels) != C:
            raise InvalidPromptSet(f"{len(self.labels)} labels for a head with {C} classes")
        caps = (limits.max_prompt_tokens, limits.max_kv_tokens, limits.max_classes)
        if any(n > cap for n, cap in zip((P, T, C), caps, strict=True)):
            raise PromptSetTooLarge(f"P={P}, T={T}, C={C} exceed the limits {caps[0]}/{caps[1]}/{caps[2]}")
        for key, mask in (("token_mask", self.token_mask), ("segment_mask", self.segment_mask)):
            if mask is not None:
                _check_mask(key, mask)
        if self.token_mask is not None and tuple(self.token_mask.shape) != (P,):
            raise InvalidPromptSet(f"token_mask is {tuple(self.token_mask.shape)}; expected [{P}]")
        if self.segment_mask is not None:
            if (
                self.segment_mask.ndim != 2
                or self.segment_mask.shape[0] != P
                or self.segment_mask.shape[1] < 1
                or D % self.segment_mask.shape[1]
            ):
                raise InvalidPromptSet(
                    f"segment_mask is {tuple(self.segment_mask.shape)}; "
                    f"expected [{P}, R] with R >= 1 and {D} divisible by R"
                )
            if self.segment_layout not in SEGMENT_LAYOUTS:
                raise InvalidPromptSet(f"unknown segment layout {self.segment_layout!r}")
        for key, t in floats.items():
            # amin/amax propagate NaN and read the tensor without a temporary: 18 ms for a 100,000 x 768 head,
            # against 93 for abs().amax() and 218 for isfinite().all()
            largest = max(-float(t.amin()), float(t.amax())) if t.numel() else 0.0
            if not math.isfinite(largest):
                raise InvalidPromptSet(f"{key} contains NaN or infinite values")
            if largest > limits.max_abs_value:
                raise InvalidPromptSet(
                    f"{key} holds a value of magnitude {largest:.4g}; the limit is {limits.max_abs_value:g} "
                    "(float16's range, what a GPU serves in; E2VPT_MAX_PROMPT_VALUE)"
                )

    def _check_metadata_size(self, limit: int) -> None:
        """The metadata without labels: JSON of finite numbers, at most `limit` bytes, shallow."""
        meta = self.metadata()
        meta.pop("labels")
        try:
            text = json.dumps(meta, allow_nan=False, sort_keys=True)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidPromptSet(f"metadata is not JSON of finite numbers: {exc}") from exc
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise InvalidPromptSet(
                f"metadata (without labels) is {size} bytes of JSON; the limit is {limit} "
                "(E2VPT_MAX_METADATA_BYTES)"
            )
        # metadata of a file was parsed with this bound already; this catches sets built in memory
        safejson.loads(text, max_depth=MAX_METADATA_DEPTH, what="metadata", error=InvalidPromptSet)

    def validate(self, info: BackboneInfo | None = None, limits: PromptLimits = DEFAULT_LIMITS) -> PromptSet:
        """Structure, and (given a backbone) that it was made for exactly this backbone. Returns self."""
        self.check_structure(limits)
        if info is None:
            return self
        if self.fingerprint != info.fingerprint:
            raise IncompatiblePromptSet(
                f"prompt set {self.task_id!r} was made for backbone {self.fingerprint}, "
                f"not {info.fingerprint}"
            )
        L, _, D = self.visual.shape
        _, _, H, _, Dh = self.kv.shape
        # every axis, whatever P and T are: an empty KV tensor of the wrong head shape still breaks a
        # batch it is padded into
        if (info.depth, info.embed_dim, info.num_heads, info.head_dim) != (L, D, H, Dh):
            raise IncompatiblePromptSet(
                f"shapes L={L}, D={D}, H={H}, Dh={Dh} do not fit backbone {info.name} "
                f"(L={info.depth}, D={info.embed_dim}, H={info.num_heads}, Dh={info.head_dim})"
            )
        return self


def _check_mask(key: str, mask: torch.Tensor) -> None:
    """A mask is uint8 (or bool) holding only 0 and 1: what training multiplies by and serving keeps."""
    if mask.dtype not in MASK_DTYPES:
        raise InvalidPromptSet(
            f"{key} must be uint8 holding 0/1, got dtype {str(mask.dtype).removeprefix('torch.')}"
        )
    if mask.dtype != torch.bool and mask.numel() and int(mask.max()) > 1:
        raise InvalidPromptSet(f"{key} must hold only 0 and 1, found {int(mask.max())}")
