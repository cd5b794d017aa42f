"""The project's one typed configuration. Every field can be overridden by an environment variable
named ``E2VPT_<FIELD>`` (for example ``E2VPT_REDIS_URL``), or by a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="E2VPT_", env_file=".env", extra="ignore")

    # --- backbone -------------------------------------------------------------------------------
    backbone: str = "vit_tiny_patch16_224"
    backbone_checkpoint: str | None = None
    backbone_pretrained: bool = False
    device: str = "cpu"

    # --- prompt sets ----------------------------------------------------------------------------
    max_prompt_set_bytes: int = 64 * 1024 * 1024
    max_prompt_tokens: int = 256
    max_kv_tokens: int = 256
    max_classes: int = 100_000

    # --- Redis prompt store ---------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("E2VPT_REDIS_URL", "REDIS_URL"),
    )
    store_namespace: str = "e2vpt"
    keep_versions: int = 10

    # --- training (training/, `e2vpt train`) ----------------------------------------------------
    # Where the offline upstream ViT of the fidelity study is cached (created once by
    # `training.upstream.ensure_upstream`, then reused).
    upstream_checkpoint: str = "runs/upstream/vit_upstream_32.safetensors"
    # Output folder of `e2vpt train` when --out is not given (a subfolder per task).
    train_out_dir: str = "runs"
    # Registry API that `e2vpt train --register` PUTs prompt sets to, and its bearer token.
    register_url: str | None = None
    register_token: str | None = None
    register_timeout_s: float = 30.0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
