"""GPU serving defaults (issue 11, item 4): serving dtype "auto", TorchServe batching on a GPU, the
torch.compile option of the torch backend, a dtype-independent backbone fingerprint, and the benchmark's
null front-end handler."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from ts.context import Context, RequestProcessor

from e2vpt.config import Settings
from e2vpt.core.model import TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import BackendUnavailable, BadRequest
from e2vpt.registry.store import PromptStore
from e2vpt.serving.backends import TorchBackend, make_backend
from e2vpt.serving.engine import serving_dtype
from e2vpt.torchserve.archive import TorchServe
from tests.helpers import tiny_backbone

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("device", "dtype", "want"),
    [
        ("cpu", "auto", torch.float32),
        ("cuda", "auto", torch.float16),
        ("cuda:1", "auto", torch.float16),
        ("cuda", "float32", torch.float32),  # explicit values keep working
        ("cpu", "bfloat16", torch.bfloat16),
        ("cuda", "bfloat16", torch.bfloat16),
    ],
)
def test_serving_dtype_auto_is_fp16_on_cuda_only(device: str, dtype: str, want: torch.dtype) -> None:
    assert serving_dtype(Settings(device=device, serving_dtype=dtype)) == want


def test_serving_dtype_default_is_auto_and_unknown_names_are_refused() -> None:
    assert Settings().serving_dtype == "auto"
    with pytest.raises(BadRequest, match="auto"):
        serving_dtype(Settings(serving_dtype="float8"))


def test_torchserve_batching_uses_the_gpu_values_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = Settings(device="cpu"), Settings(device="cuda")
    assert cpu.ts_batching == (cpu.ts_workers, cpu.ts_batch_size, cpu.ts_max_batch_delay_ms)
    assert gpu.ts_batching == (gpu.ts_gpu_workers, gpu.ts_gpu_batch_size, gpu.ts_gpu_max_batch_delay_ms)
    assert gpu.ts_batching != cpu.ts_batching
    # an explicit value wins over the GPU default, field by field (argument or environment)
    assert Settings(device="cuda", ts_batch_size=16).ts_batching == (gpu.ts_gpu_workers, 16, 5)
    monkeypatch.setenv("E2VPT_TS_WORKERS", "3")
    monkeypatch.setenv("E2VPT_DEVICE", "cuda")
    assert Settings().ts_batching == (3, gpu.ts_gpu_batch_size, gpu.ts_gpu_max_batch_delay_ms)


def test_torchserve_config_gets_the_gpu_batching(tmp_path: Path) -> None:
    s = Settings(device="cuda")
    config = TorchServe(tmp_path / "e2vpt.mar", tmp_path, settings=s).config_text()
    models = json.loads(
        next(line for line in config.splitlines() if line.startswith("models=")).split("=", 1)[1]
    )
    version = models["e2vpt"]["1.0"]
    assert (version["minWorkers"], version["batchSize"], version["maxBatchDelay"]) == s.ts_batching
    cpu = TorchServe(tmp_path / "e2vpt.mar", tmp_path, settings=Settings(device="cpu"), workers=5)
    assert cpu.workers == 5 and cpu.batch_size == Settings().ts_batch_size


def test_fingerprint_does_not_depend_on_the_serving_dtype(redis_url: str, namespace: str) -> None:
    """A registry on fp32 and an fp16 (or bf16) engine name the same backbone: same store keys."""
    full = tiny_backbone()
    half = tiny_backbone(dtype=torch.float16)
    assert half.model.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert (
        half.info.fingerprint == full.info.fingerprint == tiny_backbone(dtype=torch.bfloat16).info.fingerprint
    )
    registry = PromptStore(redis_url, full.info, namespace=namespace)
    engine_side = PromptStore(redis_url, half.info, namespace=namespace)
    try:
        registry.register(PromptSet.create("pets", full.info, ["cat", "dog"]))
        ps, version = engine_side.get("pets")
        assert ps.task_id == "pets" and version == 1
    finally:
        registry.drop_all()
        registry.close()
        engine_side.close()


def test_torch_compile_setting_selects_the_mode() -> None:
    bb = tiny_backbone()
    assert make_backend("torch", bb, Settings()).compile_mode is None  # off by default
    assert make_backend("torch", bb, Settings(torch_compile_mode="reduce-overhead")).compile_mode is None
    with pytest.raises(BackendUnavailable, match="torch_compile_mode"):
        make_backend("torch", bb, Settings(torch_compile=True, torch_compile_mode="fastest"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_backend_matches_eager_cuda(mode: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bb = tiny_backbone(device="cuda")
    g = torch.Generator().manual_seed(0)
    sets = [PromptSet.create(f"t{i}", bb.info, ["a", "b", "c"][: 2 + i % 2], generator=g) for i in range(3)]
    tasks = TaskBatch.from_prompt_sets(sets, device="cuda")
    index = torch.tensor([0, 2, 1, 2], device="cuda")
    images = torch.randn(4, 3, *bb.info.img_size, generator=g).cuda()
    eager = TorchBackend(bb)
    compiled = make_backend("torch", bb, Settings(device="cuda", torch_compile=True, torch_compile_mode=mode))
    want = eager.features(images, *tasks.gather(index))
    first = compiled.features(images, *tasks.gather(index))
    second = compiled.features(images.flip(0), *tasks.gather(index.flip(0)))  # replays must not alias
    assert (first - want).abs().max() < 1e-3
    assert (second - eager.features(images.flip(0), *tasks.gather(index.flip(0)))).abs().max() < 1e-3


def _null_handler_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "ts_null_handler", ROOT / "benchmarks" / "ts_null_handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_null_handler_parses_like_the_product_and_answers_without_work() -> None:
    """The front-end ceiling's handler: the adapter's parsing and statuses, one fixed answer per good item;
    one handler class per file, as TorchServe requires."""
    module = _null_handler_module()
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
    assert [c.__name__ for c in classes] == ["NullHandler"]
    handler = module.NullHandler()
    handler.initialize(None)
    requests = [
        ({"body": b"not even an image"}, {"X-Task-Id": "pets"}),  # no decoding: answered
        ({"body": b"\xff\xd8"}, {}),  # no task id: 400 from the adapter
    ]
    ctx = Context("e2vpt-null", "/tmp", {}, len(requests), None, "0.12.0")
    ctx.request_processor = [RequestProcessor(h) for _, h in requests]
    out = [json.loads(body) for body in handler.handle([r for r, _ in requests], ctx)]
    assert [ctx.get_response_status(i)[0] for i in range(len(requests))] == [200, 400]
    assert out[0] == {"task_id": "pets", "version": 1, "predictions": [{"label": "null", "score": 1.0}]}
    assert out[1]["error"] == "bad_request"
