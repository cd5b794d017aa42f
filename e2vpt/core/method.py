"""The typed method config of a prompt set: `PromptSet.config`, stored as the JSON object `config` of
the file's metadata. Its fields are exactly those JSON keys, and their defaults are defined here once:
the trainer (`training.trainer.TrainConfig`), the training CLI and `PromptSet.create` take theirs from
this class.

Keys this version does not know (from older or newer files) are kept in `extra` and written back, so
every file still loads and round-trips. For reading by key (`config["num_prompts"]`, `{**config}`) it is
also a read-only mapping of its JSON object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

SEGMENT_LAYOUTS = ("contiguous", "strided")
DEFAULT_RECIPE = "vtab"  # the preprocessing recipe of a set that names none (e2vpt.core.images.RECIPES)


@dataclass(frozen=True)
class MethodConfig(Mapping[str, Any]):
    """How a task's prompts are shaped, and (after pruning) how they were pruned."""

    num_prompts: int = 10  # visual prompt tokens per block (P)
    num_kv: int = 5  # key-value prompt tokens per block (T)
    share_kv: bool = True  # one set of KV prompts for keys and values (tied)
    num_segments: int = 16  # segments per visual token (R) for segment pruning
    segment_layout: str = "contiguous"  # how a token's dims form segments (SEGMENT_LAYOUTS)
    recipe: str | None = None  # preprocessing the set was trained with; None: DEFAULT_RECIPE
    # written by pruning (training.pruning) and compaction (PromptSet.compact); absent before
    token_ratio: float | None = None
    segment_ratio: float | None = None
    importance: str | None = None
    rewind: str | None = None
    token_mask: list[int] | None = None
    kept_token_indices: list[int] | None = None
    num_prompts_before_compaction: int | None = None
    train: dict[str, Any] | None = None  # the training run's settings (training.trainer.TrainConfig)
    # keys this version does not know, kept as they came
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def keys_known(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MethodConfig:
        """From the metadata's JSON object; unknown keys go to `extra`."""
        if isinstance(data, MethodConfig):
            return data
        data = dict(data or {})
        known = cls.keys_known()
        return cls(
            **{k: data[k] for k in known if k in data},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every set field (pruning fields only once written) plus the unknown keys."""
        out = dict(self.extra)
        for name in self.keys_known():
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def updated(self, **changes: Any) -> MethodConfig:
        """A copy with `changes` (known fields set, unknown keys added to `extra`)."""
        return MethodConfig.from_dict({**self.to_dict(), **changes})

    @property
    def preprocessing(self) -> str:
        """The recipe serving applies: `recipe`, else DEFAULT_RECIPE."""
        return self.recipe or DEFAULT_RECIPE

    # ------------------------------------------------------------------ read-only mapping of the JSON
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


DEFAULTS = MethodConfig()
