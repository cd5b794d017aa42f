"""ONNX export and the onnxruntime backend: parity with PyTorch on mixed-task batches, P = T = 0, register
tokens + avg pooling, refusals, fingerprint checks, the backend factory and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch

from e2vpt import cli
from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskBatch, split_logits
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import (
    BackendUnavailable,
    ExportError,
    IncompatibleOnnxModel,
    IncompatiblePromptSet,
    UnsupportedBackbone,
    http_status,
)
from e2vpt.onnx.backend import OnnxBackend, create_backend, onnx_cache_path
from e2vpt.onnx.export import INPUT_NAMES, check_exportable, export_onnx, onnx_metadata, verify_export
from e2vpt.serving.backends import TorchBackend, make_backend
from tests.helpers import tiny_backbone

MAX_P, MAX_T = 4, 4
FP32_ATOL = 1e-3


@pytest.fixture(scope="module")
def exported(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(
        backbone, tmp_path_factory.mktemp("onnx") / "tiny.onnx", max_prompts=MAX_P, max_kv=MAX_T
    )


@pytest.fixture(scope="module")
def onnx_backend(backbone: Backbone, exported: Path) -> OnnxBackend:
    return OnnxBackend(backbone, exported)


def make_sets(backbone: Backbone, specs: list[tuple[int, int, int]], seed: int = 0) -> list[PromptSet]:
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i, (p, t, c) in enumerate(specs):
        ps = PromptSet.create(
            f"task-{i}", backbone.info, [f"c{j}" for j in range(c)], num_prompts=p, num_kv=t, generator=g
        )
        ps.head_bias = torch.randn(c, generator=g)
        ps.head_weight = torch.randn(c, backbone.info.embed_dim, generator=g) * 0.1
        sets.append(ps.validate(backbone.info))
    return sets


def images_for(backbone: Backbone, n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, *backbone.info.img_size, generator=torch.Generator().manual_seed(seed))


def mixed_logits(
    backend: object, tasks: TaskBatch, images: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    feats = backend.features(images, *tasks.gather(index))  # type: ignore[attr-defined]
    return tasks.logits(feats, index)


def test_export_is_checked_dynamic_and_tagged(backbone: Backbone, exported: Path) -> None:
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert list(dims) == list(INPUT_NAMES)
    assert isinstance(dims["images"][0], str) and dims["images"][1:] == [
        3,
        32,
        32,
    ]  # dynamic batch, fixed image
    assert isinstance(dims["visual"][2], str) and isinstance(dims["kv"][4], str)  # dynamic P and T
    assert dims["visual"][2] == dims["visual_valid"][1] and dims["kv"][4] == dims["kv_valid"][1]
    meta = onnx_metadata(exported)
    assert meta["fingerprint"] == backbone.info.fingerprint
    assert (meta["max_prompts"], meta["max_kv"], meta["opset"], meta["fp16"]) == ("4", "4", "18", "0")
    assert model.opset_import[0].version == 18


def test_mixed_task_batch_matches_pytorch(backbone: Backbone, onnx_backend: OnnxBackend) -> None:
    sets = make_sets(backbone, [(4, 4, 3), (2, 1, 7), (0, 3, 2), (3, 0, 5), (1, 2, 4)])
    tasks = TaskBatch.from_prompt_sets(sets)
    index = torch.tensor([0, 1, 2, 3, 4, 2, 0, 3, 1])
    images = images_for(backbone, len(index))
    got = mixed_logits(onnx_backend, tasks, images, index)
    want = mixed_logits(TorchBackend(backbone), tasks, images, index)
    assert got.dtype == torch.float32 and got.shape == want.shape == (9, 7)
    assert (got - want).abs().max() <= FP32_ATOL
    # Each image's answer in the mixed batch equals its answer when its task runs alone in the graph.
    for b, (row, c) in enumerate(
        zip(split_logits(got, tasks.num_classes[index]), tasks.num_classes[index], strict=True)
    ):
        alone = TaskBatch.from_prompt_sets([sets[int(index[b])]])
        single = mixed_logits(onnx_backend, alone, images[b : b + 1], torch.tensor([0]))
        assert row.shape == (int(c),)
        assert (row - single[0, : int(c)]).abs().max() <= FP32_ATOL


def test_every_prompt_count_up_to_the_maxima(backbone: Backbone, exported: Path) -> None:
    sizes = [(p, t) for p in range(MAX_P + 1) for t in range(MAX_T + 1)]
    assert verify_export(backbone, exported, max_prompts=MAX_P, max_kv=MAX_T, sizes=sizes) <= FP32_ATOL


def test_zero_prompts_reproduce_the_plain_backbone(backbone: Backbone, onnx_backend: OnnxBackend) -> None:
    images = images_for(backbone, 3)
    info = backbone.info
    visual = torch.zeros(3, info.depth, 0, info.embed_dim)
    kv = torch.zeros(3, info.depth, 2, info.num_heads, 0, info.head_dim)
    empty = torch.zeros(3, 0, dtype=torch.bool)
    feats = onnx_backend.features(images, visual, kv, empty, empty)
    with torch.inference_mode():
        plain = backbone.model(images)
        torch_feats = PromptedViT(backbone).forward_features(images)
    assert (feats - torch_feats).abs().max() <= FP32_ATOL
    assert (backbone.model.head(feats) - plain).abs().max() <= FP32_ATOL


def test_one_masked_slot_padding_changes_nothing(backbone: Backbone, exported: Path) -> None:
    padded = OnnxBackend(backbone, exported, min_slots=1)  # what GPU providers do for P = 0 / T = 0
    plain = OnnxBackend(backbone, exported)
    sets = make_sets(backbone, [(0, 0, 3), (0, 2, 2), (3, 0, 4)], seed=5)
    index = torch.tensor([0, 1, 2, 0])
    images = images_for(backbone, 4)
    for subset in ([sets[0]], sets):
        tasks = TaskBatch.from_prompt_sets(subset)
        idx = index.clamp(max=len(subset) - 1)
        a, b = mixed_logits(padded, tasks, images, idx), mixed_logits(plain, tasks, images, idx)
        assert (a - b).abs().max() <= FP32_ATOL


def test_register_tokens_and_avg_pool(tmp_path: Path) -> None:
    reg = tiny_backbone(reg_tokens=3, global_pool="avg", fc_norm=True)
    assert reg.info.num_prefix_tokens == 4 and reg.info.global_pool == "avg"
    path = export_onnx(reg, tmp_path / "reg.onnx", max_prompts=3, max_kv=2, exporter="legacy", opset=17)
    backend = OnnxBackend(reg, path)
    sets = make_sets(reg, [(3, 2, 4), (1, 0, 2), (0, 1, 3), (2, 2, 5)], seed=7)
    tasks = TaskBatch.from_prompt_sets(sets)
    index = torch.tensor([3, 2, 1, 0, 1])
    images = images_for(reg, 5)
    got = mixed_logits(backend, tasks, images, index)
    want = mixed_logits(TorchBackend(reg), tasks, images, index)
    assert (got - want).abs().max() <= FP32_ATOL
    assert onnx_metadata(path)["exporter"] == "legacy"


def test_fp16_graph_for_a_float16_backbone(backbone: Backbone, tmp_path: Path) -> None:
    half = tiny_backbone(dtype=torch.float16)  # serving_dtype float16: the factory exports an fp16 graph
    backend = create_backend(half, Settings(onnx_cache_dir=str(tmp_path), onnx_max_prompts=2, onnx_max_kv=2))
    assert backend.fp16 and backend.path.name.endswith("-fp16.onnx")
    model = onnx.load(str(backend.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 io
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    sets = make_sets(backbone, [(2, 2, 3), (1, 0, 2)])
    tasks = TaskBatch.from_prompt_sets(sets)
    index = torch.tensor([0, 1, 1])
    images = images_for(backbone, 3)
    got = mixed_logits(backend, tasks, images.half(), index)
    assert got.dtype == torch.float32
    diff = (got - mixed_logits(TorchBackend(backbone), tasks, images, index)).abs().max()
    assert 0 < diff <= 5e-2  # really half precision, still close to the float32 model


@pytest.mark.parametrize(
    ("kwargs", "options", "message"),
    [
        ({"dynamic_img_size": True}, {}, "dynamic_img_size"),
        ({"global_pool": ""}, {}, "pooled"),
        ({}, {"opset": 23}, "opset 23"),
        ({}, {"opset": 16, "exporter": "legacy"}, "opset 16"),
        ({}, {"fp16": True, "exporter": "legacy"}, "fp16"),
        ({}, {"max_prompts": -1}, "max_prompts"),
        ({}, {"exporter": "onnxmltools"}, "exporter"),
    ],
)
def test_refuses_what_it_cannot_express(kwargs: dict, options: dict, message: str, tmp_path: Path) -> None:
    bb = tiny_backbone(**kwargs)
    opts = {"max_prompts": 2, "max_kv": 2, **options}
    with pytest.raises(ExportError, match=message) as err:
        export_onnx(bb, tmp_path / "x.onnx", **opts)
    assert http_status(err.value) == 422
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_bfloat16_and_foreign_models(backbone: Backbone) -> None:
    half = Backbone(model=tiny_backbone().model.to(torch.bfloat16), info=backbone.info)
    with pytest.raises(ExportError, match="float32"):
        check_exportable(half, max_prompts=1, max_kv=1, opset=18)
    foreign = Backbone(model=torch.nn.Linear(2, 2), info=backbone.info)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedBackbone):
        check_exportable(foreign, max_prompts=1, max_kv=1, opset=18)


def test_refuses_a_graph_from_other_weights(backbone: Backbone, exported: Path, tmp_path: Path) -> None:
    other = tiny_backbone(seed=1)  # same architecture, other weights
    assert other.info.fingerprint != backbone.info.fingerprint
    with pytest.raises(IncompatibleOnnxModel, match="exported from backbone") as err:
        OnnxBackend(other, exported)
    assert http_status(err.value) == 500
    with pytest.raises(IncompatibleOnnxModel, match="fingerprint|exported from"):
        OnnxBackend(other.info, exported)  # a BackboneInfo is enough
    untagged = onnx.load(str(exported))
    del untagged.metadata_props[:]
    onnx.save(untagged, str(tmp_path / "untagged.onnx"))
    with pytest.raises(IncompatibleOnnxModel, match="no e2vpt metadata"):
        OnnxBackend(backbone, tmp_path / "untagged.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    with pytest.raises(IncompatibleOnnxModel, match="not a readable ONNX model"):
        OnnxBackend(backbone, tmp_path / "junk.onnx")


def test_refuses_more_prompts_than_exported(backbone: Backbone, onnx_backend: OnnxBackend) -> None:
    tasks = TaskBatch.from_prompt_sets(make_sets(backbone, [(MAX_P + 1, 1, 2)]))
    with pytest.raises(IncompatiblePromptSet, match="exceed") as err:
        mixed_logits(onnx_backend, tasks, images_for(backbone, 1), torch.tensor([0]))
    assert http_status(err.value) == 422


def test_unavailable_providers_refused(backbone: Backbone, exported: Path) -> None:
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        OnnxBackend(backbone, exported, providers=["NoSuchExecutionProvider"])


def test_make_backend_exports_once_and_reuses(backbone: Backbone, exported: Path, tmp_path: Path) -> None:
    settings = Settings(
        onnx_cache_dir=str(tmp_path / "cache"),
        onnx_max_prompts=2,
        onnx_max_kv=3,
        onnx_exporter="legacy",
        onnx_opset=17,
    )
    assert isinstance(make_backend("torch", backbone, settings), TorchBackend)
    first = make_backend("onnxruntime", backbone, settings)
    assert isinstance(first, OnnxBackend) and first.path == onnx_cache_path(backbone, settings)
    assert (first.max_prompts, first.max_kv) == (2, 3)
    stamp = os.stat(first.path).st_mtime_ns
    second = make_backend("onnxruntime", backbone, settings)
    assert os.stat(second.path).st_mtime_ns == stamp  # reused, not re-exported
    configured = make_backend("onnxruntime", backbone, Settings(onnx_path=str(exported)))
    assert isinstance(configured, OnnxBackend) and configured.path == exported
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        make_backend("tensorflow", backbone, settings)
    with pytest.raises(IncompatibleOnnxModel):
        make_backend("onnxruntime", tiny_backbone(seed=2), Settings(onnx_path=str(exported)))


def test_cli_export(backbone: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    kwargs = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2})
    argv = [
        "export-onnx",
        "--backbone",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        kwargs,
        "--out",
        str(out),
        "--max-prompts",
        "2",
        "--max-kv",
        "1",
        "--exporter",
        "legacy",
        "--opset",
        "17",
    ]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fingerprint"] == backbone.info.fingerprint and summary["path"] == str(out)
    OnnxBackend(backbone, out)
    bad = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True})
    with pytest.raises(ExportError):
        cli.main(
            ["export-onnx", "--backbone", "vit_tiny_patch16_224", "--model-kwargs", bad, "--out", str(out)]
        )


def test_refuses_graphs_over_two_gigabytes(backbone: Backbone) -> None:
    import timm

    with torch.device("meta"):  # shapes only: no 2.5 GB allocation
        huge = timm.create_model("vit_huge_patch14_224", depth=32)
    big = Backbone(model=huge, info=backbone.info)
    with pytest.raises(ExportError, match="2 GB"):
        check_exportable(big, max_prompts=1, max_kv=1, opset=18)
