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
    store_socket_timeout: float = 5.0  # seconds; Redis calls slower than this raise StoreUnavailable
    store_health_check_seconds: int = 15  # idle Redis connections (pub/sub) are pinged this often

    # --- registry HTTP API and `e2vpt tasks` CLI (issue 4) -----------------------------------------
    registry_host: str = "127.0.0.1"
    registry_port: int = 8000
    registry_url: str = "http://127.0.0.1:8000"  # where the CLI finds the registry API
    registry_token: str | None = None  # bearer token for writes (prefer registry_token_file)
    registry_token_file: str | None = None  # a file holding the token (Docker/K8s secret); wins over the env
    registry_auth_reads: bool = False  # reads need the token too
    registry_client_timeout: float = 30.0  # CLI HTTP timeout, seconds


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
