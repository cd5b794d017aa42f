"""What a prompt set may be at most (`PromptLimits`), with the defaults defined once.

The core never reads the environment: whoever owns the settings (the registry, the serving runtime,
the CLI) passes `Settings.prompt_limits`; `Settings`' own defaults are `DEFAULT_LIMITS`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptLimits:
    max_bytes: int = 64 * 1024 * 1024  # a prompt-set file, bytes
    max_prompt_tokens: int = 256  # visual prompt tokens per block (P)
    max_kv_tokens: int = 256  # key-value prompt tokens per block (T)
    max_classes: int = 100_000  # classes of the head (C)


DEFAULT_LIMITS = PromptLimits()
