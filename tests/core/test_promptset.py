"""PromptSet: creation, compaction, bit-exact save/load, and a typed error for every invalid payload."""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.core.promptset import FORMAT_VERSION, META_KEY, PromptSet, check_task_id, expand_segment_mask
from e2vpt.errors import (
    CorruptPromptSet,
    E2VPTError,
    IncompatiblePromptSet,
    InvalidPromptSet,
    InvalidTaskId,
    PromptSetTooLarge,
    UnsupportedFormatVersion,
)


def new_set(info: BackboneInfo, **kwargs: object) -> PromptSet:
    g = torch.Generator().manual_seed(0)
    return PromptSet.create("task-1", info, ["cat", "dog", "bird"], generator=g, **kwargs)  # type: ignore[arg-type]


def payload(tensors: dict[str, torch.Tensor], meta: dict[str, object] | None) -> bytes:
    """A safetensors byte string written directly, bypassing PromptSet (to build invalid files)."""
    return st_save(tensors, metadata=None if meta is None else {META_KEY: json.dumps(meta)})


def expect(
    exc_type: type[E2VPTError], data: bytes, info: BackboneInfo | None = None, **kw: object
) -> E2VPTError:
    with pytest.raises(E2VPTError) as caught:
        PromptSet.from_bytes(data, **kw).validate(info)  # type: ignore[arg-type]
    assert type(caught.value) is exc_type, f"{type(caught.value).__name__}: {caught.value}"
    assert caught.value.http_status == exc_type.http_status
    return caught.value


# ---------- creation and shapes
def test_create_shapes_and_paper_init(backbone: Backbone) -> None:
    info = backbone.info
    ps = new_set(info, num_prompts=10, num_kv=5)
    L, D, H, Dh = info.depth, info.embed_dim, info.num_heads, info.head_dim
    assert ps.visual.shape == (L, 10, D) and ps.kv.shape == (L, 1, H, 5, Dh) and ps.share_kv
    assert ps.head_weight.shape == (3, D) and ps.head_bias.shape == (3,) and torch.all(ps.head_bias == 0)
    ph, pw = info.patch_size
    vb = math.sqrt(6.0 / (3 * ph * pw + D))
    kb = math.sqrt(6.0 / (5 * Dh))
    assert ps.visual.abs().max() <= vb and ps.visual.abs().max() > 0.9 * vb
    assert ps.kv.abs().max() <= kb and ps.kv.abs().max() > 0.9 * kb
    assert ps.kv_pair().shape == (L, 2, H, 5, Dh)
    sep = new_set(info, share_kv=False, num_kv=4)
    assert sep.kv.shape == (L, 2, H, 4, Dh) and not sep.share_kv
    assert ps.num_parameters == L * 10 * D + L * H * 5 * Dh + 3 * D + 3
    summary = ps.summary()
    assert summary["num_prompts"] == 10 and summary["num_kv"] == 5 and summary["dtype"] == "float32"
    assert summary["fingerprint"] == info.fingerprint and summary["format_version"] == FORMAT_VERSION
    ps.validate(info)


def test_vit_base_init_bound_matches_paper() -> None:
    info = BackboneInfo(
        name="x", fingerprint="x", depth=12, embed_dim=768, num_heads=12, head_dim=64, num_prefix_tokens=1,
        num_patches=196, patch_size=(16, 16), img_size=(224, 224), in_chans=3, global_pool="token",
        num_classes=0,
    )  # fmt: skip
    assert info.visual_init_bound == pytest.approx(0.0625)


@pytest.mark.parametrize("task_id", ["a", "A-b_c.1", "9" * 128])
def test_valid_task_ids(task_id: str) -> None:
    assert check_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", ["", "-a", ".hidden", "a/b", "a b", "x" * 129, "é", None, 5])
def test_invalid_task_ids(task_id: object) -> None:
    with pytest.raises(InvalidTaskId):
        check_task_id(task_id)


def test_expand_segment_mask_layouts() -> None:
    mask = torch.tensor([[1, 0], [0, 1]])
    assert expand_segment_mask(mask, 4, "contiguous").tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert expand_segment_mask(mask, 4, "strided").tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    with pytest.raises(InvalidPromptSet):
        expand_segment_mask(mask, 5)
    with pytest.raises(InvalidPromptSet):
        expand_segment_mask(mask, 4, "diagonal")


def test_compact_removes_pruned_tokens(backbone: Backbone) -> None:
    ps = new_set(backbone.info, num_prompts=4, num_segments=4)
    seg = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.uint8)
    ps = replace(ps, token_mask=torch.tensor([1, 1, 0, 1], dtype=torch.uint8), segment_mask=seg)
    c = ps.compact()
    D = backbone.info.embed_dim
    assert c.num_prompts == 3 and c.token_mask is None and c.segment_mask.shape == (3, 4)
    assert c.config["num_prompts"] == 3 and c.config["num_prompts_before_compaction"] == 4
    assert torch.equal(c.visual[:, 0], ps.visual[:, 0])
    assert torch.all(c.visual[:, 1, D // 4 : D // 2] == 0) and torch.equal(
        c.visual[:, 1, : D // 4], ps.visual[:, 1, : D // 4]
    )
    assert torch.equal(
        c.visual[:, 2, D // 2 : 3 * D // 4], torch.zeros_like(c.visual[:, 2, D // 2 : 3 * D // 4])
    )
    L = backbone.info.depth
    kept_visual = (4 + 2 + 3) * (D // 4) * L
    assert ps.num_parameters == c.num_parameters == kept_visual + ps.kv.numel() + 3 * D + 3
    # compacting twice changes nothing; the compacted set still round-trips
    assert torch.equal(c.compact().visual, c.visual)
    assert torch.equal(PromptSet.from_bytes(c.to_bytes()).visual, c.visual)


# ---------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share_kv", [True, False])
def test_round_trip_bit_exact(backbone: Backbone, tmp_path: Path, dtype: torch.dtype, share_kv: bool) -> None:
    ps = new_set(backbone.info, num_prompts=5, num_kv=3, share_kv=share_kv).to(dtype=dtype)
    ps = replace(
        ps,
        token_mask=torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8),
        segment_mask=(torch.arange(5 * 16).reshape(5, 16) % 3 != 0).to(torch.uint8),
        metrics={"val_acc": 0.5, "epochs": 3},
    )
    data = ps.to_bytes()
    path = ps.save(tmp_path / "sets" / "t.safetensors")
    for back in (PromptSet.from_bytes(data), PromptSet.load(path)):
        back.validate(backbone.info)
        for key, t in ps.tensors().items():
            got = back.tensors()[key]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)), key
        assert back.metadata() == ps.metadata()
        assert back.to_bytes() == data
    assert path.read_bytes() == data
    assert not list(path.parent.glob("*.tmp"))


# ---------- invalid payloads
def good_parts(info: BackboneInfo) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    ps = new_set(info, num_prompts=2, num_kv=2)
    return dict(ps.tensors()), ps.metadata()


def test_truncated(backbone: Backbone) -> None:
    data = new_set(backbone.info).to_bytes()
    for cut in (len(data) - 10, len(data) // 2, 100, 7, 0):
        expect(CorruptPromptSet, data[:cut])


def test_garbage() -> None:
    expect(CorruptPromptSet, b"\x00" * 64)
    expect(CorruptPromptSet, b"hello, this is not a prompt set at all")
    expect(CorruptPromptSet, (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"x" * 10)


def test_pickled_payload_is_refused_and_never_unpickled(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(CorruptPromptSet, pickle.dumps({"meta": meta, **tensors}))
    expect(CorruptPromptSet, pickle.dumps({"a": 1}))
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    expect(CorruptPromptSet, buf.getvalue())


def test_corrupt_tensor_section(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    data = bytearray(payload(tensors, meta))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["visual"]["data_offsets"][1] += 10_000  # points past the end of the buffer
    raw = json.dumps(header).encode()
    expect(CorruptPromptSet, len(raw).to_bytes(8, "little") + raw + bytes(data[8 + header_len :]))


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("visual", (2, 192)),  # wrong number of dimensions
        ("kv", (2, 3, 3, 2, 64)),  # kv axis 1 is neither 1 nor 2
        ("kv", (3, 1, 3, 2, 64)),  # other number of blocks than visual
        ("head_weight", (3, 100)),  # head width != D
        ("head_bias", (4,)),  # bias length != C
    ],
)
def test_wrong_shapes(backbone: Backbone, key: str, shape: tuple[int, ...]) -> None:
    tensors, meta = good_parts(backbone.info)
    tensors[key] = torch.zeros(shape)
    expect(InvalidPromptSet, payload(tensors, meta))


def test_shapes_of_another_backbone(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    L = backbone.info.depth
    tensors["visual"] = torch.zeros(L, 2, 96)
    tensors["head_weight"] = torch.zeros(3, 96)
    expect(IncompatiblePromptSet, payload(tensors, meta), backbone.info)


def test_bad_masks(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(InvalidPromptSet, payload({**tensors, "token_mask": torch.ones(5, dtype=torch.uint8)}, meta))
    expect(InvalidPromptSet, payload({**tensors, "segment_mask": torch.ones(2, 7, dtype=torch.uint8)}, meta))
    meta_bad = {**meta, "config": {**meta["config"], "segment_layout": "diagonal"}}  # type: ignore[dict-item]
    expect(
        InvalidPromptSet, payload({**tensors, "segment_mask": torch.ones(2, 16, dtype=torch.uint8)}, meta_bad)
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8])
def test_wrong_dtype(backbone: Backbone, dtype: torch.dtype) -> None:
    tensors, meta = good_parts(backbone.info)
    tensors["visual"] = tensors["visual"].to(dtype)
    expect(InvalidPromptSet, payload(tensors, meta))


def test_mixed_float_dtypes(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    tensors["kv"] = tensors["kv"].half()
    expect(InvalidPromptSet, payload(tensors, meta))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["visual", "kv", "head_weight", "head_bias"])
def test_non_finite(backbone: Backbone, key: str, value: float) -> None:
    tensors, meta = good_parts(backbone.info)
    t = tensors[key].clone()
    t.view(-1)[0] = value
    tensors[key] = t
    err = expect(InvalidPromptSet, payload(tensors, meta))
    assert "NaN" in str(err)


@pytest.mark.parametrize("key", ["visual", "kv", "head_weight", "head_bias"])
def test_values_past_float16_are_refused_unless_allowed(backbone: Backbone, key: str) -> None:
    """A finite float32 value beyond float16's range would be infinite in a CUDA engine's default dtype
    (NaN scores for the task): refused by default; float16's largest value passes; the limit is a setting."""
    tensors, meta = good_parts(backbone.info)
    for value, ok in ((65504.0, True), (-65504.0, True), (65505.0, False), (-1e30, False)):
        t = tensors[key].clone()
        t.view(-1)[-1] = value
        data = payload({**tensors, key: t}, meta)
        if ok:
            PromptSet.from_bytes(data).validate(backbone.info)
        else:
            assert "E2VPT_MAX_PROMPT_VALUE" in str(expect(InvalidPromptSet, data))
    looser = Settings(max_prompt_value=1e31).prompt_limits
    PromptSet.from_bytes(data, limits=looser).validate(backbone.info, looser)


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_unknown_format_version(backbone: Backbone, version: object) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(UnsupportedFormatVersion, payload(tensors, {**meta, "format_version": version}))


def test_other_backbone_fingerprint(backbone: Backbone) -> None:
    ps = new_set(backbone.info)
    other = replace(ps, fingerprint="vit_tiny_patch16_224@sha256:0000000000000000")
    err = expect(IncompatiblePromptSet, other.to_bytes(), backbone.info)
    assert err.http_status == 422
    other_info = replace(backbone.info, fingerprint="vit_small@sha256:1111111111111111")
    with pytest.raises(IncompatiblePromptSet):
        ps.validate(other_info)


def test_oversized(backbone: Backbone, tmp_path: Path) -> None:
    ps = new_set(backbone.info)
    data = ps.to_bytes()
    expect(PromptSetTooLarge, data, max_bytes=len(data) - 1)
    PromptSet.from_bytes(data, max_bytes=len(data))
    path = ps.save(tmp_path / "big.safetensors")
    with pytest.raises(PromptSetTooLarge):
        PromptSet.load(path, max_bytes=len(data) - 1)
    # not regular files: refused before the open (a FIFO blocks it) or a read (/dev/zero never ends)
    os.mkfifo(tmp_path / "fifo.safetensors")
    for special in (tmp_path / "fifo.safetensors", Path("/dev/zero"), tmp_path):
        with pytest.raises(OSError, match="not a regular file"):
            PromptSet.load(special)
    # too many tokens for the configured limits, although the bytes are small
    tensors, meta = good_parts(backbone.info)
    tensors["visual"] = torch.zeros(backbone.info.depth, 300, backbone.info.embed_dim)
    expect(PromptSetTooLarge, payload(tensors, meta))


def test_missing_metadata(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(CorruptPromptSet, payload(tensors, None))
    expect(CorruptPromptSet, st_save(tensors, metadata={"other": "x"}))
    expect(CorruptPromptSet, st_save(tensors, metadata={META_KEY: "not json"}))
    expect(CorruptPromptSet, st_save(tensors, metadata={META_KEY: "[1, 2]"}))
    for field in ("task_id", "labels", "backbone", "fingerprint", "format_version"):
        expect(InvalidPromptSet, payload(tensors, {k: v for k, v in meta.items() if k != field}))
    expect(InvalidPromptSet, payload(tensors, {**meta, "backbone": 5}))
    expect(InvalidPromptSet, payload(tensors, {**meta, "config": []}))


@pytest.mark.parametrize("task_id", ["", "../etc/passwd", "a b", "x" * 200, 7])
def test_bad_task_id(backbone: Backbone, task_id: object) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(InvalidTaskId, payload(tensors, {**meta, "task_id": task_id}))


@pytest.mark.parametrize("labels", [["a", "b"], ["a", "b", "c", "d"], [], ["a", "b", 3], "abc"])
def test_labels_must_match_head_rows(backbone: Backbone, labels: object) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(InvalidPromptSet, payload(tensors, {**meta, "labels": labels}))


def test_unknown_and_missing_tensor_keys(backbone: Backbone) -> None:
    tensors, meta = good_parts(backbone.info)
    expect(InvalidPromptSet, payload({**tensors, "extra": torch.zeros(2)}, meta))
    expect(InvalidPromptSet, payload({k: v for k, v in tensors.items() if k != "head_bias"}, meta))


def test_create_rejects_bad_task_id(backbone: Backbone) -> None:
    with pytest.raises(InvalidTaskId):
        PromptSet.create("no spaces", backbone.info, ["a"])


def test_unknown_preprocessing_recipe_is_refused(backbone) -> None:  # noqa: ANN001
    ps = PromptSet.create("t", backbone.info, ["a", "b"], config={"recipe": "imagenet"})
    with pytest.raises(InvalidPromptSet, match="recipe"):
        PromptSet.from_bytes(ps.to_bytes())
    assert PromptSet.create("t", backbone.info, ["a"]).recipe == "vtab"
