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
    # Metadata other than labels (config, metrics, ...): JSON bytes. Listings copy it, so it stays small.
    max_metadata_bytes: int = 8 * 1024
    max_label_chars: int = 256

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

    # --- serving: images, engine, prompt cache, metrics (issue 5) ----------------------------------
    # Inference backend computing features: "torch" (eager) or "onnxruntime" (e2vpt.onnx.backend).
    backend: str = "torch"
    # Model dtype for serving ("float32", "float16", "bfloat16"); prompt sets are converted once on load.
    serving_dtype: str = "float32"
    top_k: int = 5
    # Images: encoded size limit and decoded pixel limit (larger -> 413); decompression bombs -> 413.
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Device-resident prompt cache: byte budget (LRU beyond it), pinned and preloaded task ids.
    cache_max_bytes: int = 512 * 1024 * 1024
    cache_pinned_tasks: list[str] = []
    cache_preload_tasks: list[str] = []
    # Fallback for missed pub/sub messages: one version check of the cached tasks every this many ms, on a
    # background thread (never in a request); negative: off.
    cache_version_check_ms: int = 500
    # After a store error, cold loads fail at once (503) until a background probe (one every this many ms)
    # gets an answer: a Redis that hangs (rather than refusing) must not stall batches.
    cache_store_backoff_ms: int = 1000
    # Socket (and connect) timeout of the serving engine's Redis connection: a hung Redis costs a cold load
    # at most this once; then cold loads fail at once (503) until the store answers a background probe.
    cache_store_timeout_ms: int = 1000
    # Metrics: per-task labels for the N busiest tasks, the rest as "other".
    metrics_top_tasks: int = 50
    # prometheus-client HTTP endpoint inside the TorchServe workers (None: no endpoint, e.g. in-process).
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    # TorchServe (model_store/, e2vpt.torchserve.archive): bind address, ports (0 = pick a free one), workers, batching.
    ts_bind: str = "127.0.0.1"
    ts_inference_port: int = 8080
    ts_management_port: int = 8081
    ts_metrics_port: int = 8082
    ts_workers: int = 1
    ts_batch_size: int = 8
    ts_max_batch_delay_ms: int = 5
    ts_response_timeout_s: int = 60
    ts_startup_timeout_s: int = 120
    ts_token_expiration_min: int = 60
    ts_model_name: str = "e2vpt"
    ts_java_heap_mb: int = 1024
    ts_job_queue_size: int = 1000
    ts_max_request_size: int = 24 * 1024 * 1024  # base64 JSON of a max_image_bytes image fits
    ts_workdir: str = "runs/torchserve"  # `serve start`: logs, key_file.json, TMPDIR, metrics files
    ts_mar_dir: str = "model_store/build"

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

    # --- ONNX export and the onnxruntime backend (issue 6) ---------------------------------------
    # An exported graph to serve with; None: export once into onnx_cache_dir (keyed by fingerprint
    # and options) on first use.
    onnx_path: str | None = None
    onnx_cache_dir: str = "~/.cache/e2vpt/onnx"
    # onnxruntime execution providers in priority order; empty: TensorRT, CUDA when present, then CPU.
    onnx_providers: list[str] = []
    # Largest P and T the graph is exported, checked and (TensorRT) profiled for; larger sets are refused
    # (422). None: the registry's limits (max_prompt_tokens / max_kv_tokens), so every valid set fits.
    onnx_max_prompts: int | None = None
    onnx_max_kv: int | None = None
    onnx_opset: int = 18
    # fp16 weights and compute inside the graph (inputs and the pooled output stay float32).
    onnx_fp16: bool = False
    # "dynamo" (torch.export, default) or "legacy" (TorchScript tracing).
    onnx_exporter: str = "dynamo"
    # onnxruntime intra-op threads (0: onnxruntime's default, one per core).
    onnx_threads: int = 0

    @property
    def onnx_limits(self) -> tuple[int, int]:
        """(max P, max T) of the exported graph, defaults resolved."""
        p = self.onnx_max_prompts if self.onnx_max_prompts is not None else self.max_prompt_tokens
        t = self.onnx_max_kv if self.onnx_max_kv is not None else self.max_kv_tokens
        return p, t


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def env_names(settings_cls: type[BaseSettings] = Settings) -> dict[str, str]:
    """Every environment variable that sets a field, mapped to the field's name.

    ``E2VPT_<FIELD>`` for every field, plus the names of a field's ``validation_alias`` (for example
    ``REDIS_URL``). Used by the configuration reference (docs/gen_config.py) and the stack tests, so
    docs and deployment files cannot name a variable the code does not read."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field_name, info in settings_cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    names[choice.upper()] = field_name
        elif isinstance(alias, str):
            names[alias.upper()] = field_name
        else:
            names[f"{prefix}{field_name}".upper()] = field_name
    return names


def settings_with_defaults(defaults: dict[str, object]) -> Settings:
    """Settings whose defaults come from `defaults` (e.g. the engine config packed into a .mar), while
    environment variables (E2VPT_*) still override them."""
    from_env = Settings()
    unknown = set(defaults) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    merged = {**defaults, **{k: getattr(from_env, k) for k in from_env.model_fields_set}}
    return Settings(**merged)
