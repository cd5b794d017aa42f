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

    # --- ONNX export and the onnxruntime backend (issue 6) ---------------------------------------
    # An exported graph to serve with; None: export once into onnx_cache_dir (keyed by fingerprint
    # and options) on first use.
    onnx_path: str | None = None
    onnx_cache_dir: str = "~/.cache/e2vpt/onnx"
    # onnxruntime execution providers in priority order; empty: TensorRT, CUDA when present, then CPU.
    onnx_providers: list[str] = []
    # Largest P and T the graph is exported, checked and (TensorRT) profiled for; larger sets are refused.
    onnx_max_prompts: int = 64
    onnx_max_kv: int = 64
    onnx_opset: int = 18
    # fp16 weights and compute inside the graph (inputs and the pooled output stay float32).
    onnx_fp16: bool = False
    # "dynamo" (torch.export, default) or "legacy" (TorchScript tracing).
    onnx_exporter: str = "dynamo"
    # onnxruntime intra-op threads (0: onnxruntime's default, one per core).
    onnx_threads: int = 0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
