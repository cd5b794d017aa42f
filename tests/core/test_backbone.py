"""Backbone loading: supported timm ViTs (shrunk), local checkpoints (.safetensors, .pth, .npz),
fingerprints, freezing, and a typed error for models this project cannot prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

from e2vpt.core.backbone import Backbone, BackboneInfo, fingerprint_model, load_backbone, save_checkpoint
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import UnsupportedBackbone
from tests.helpers import TINY, tiny_backbone

# name, kwargs (on top of TINY: 32x32 images, 8x8 patches, 2 blocks), expected prefix tokens, pool
BACKBONES = [
    ("vit_tiny_patch16_224", {}, 1, "token"),
    ("vit_small_patch16_224", {}, 1, "token"),
    ("vit_base_patch16_224", {}, 1, "token"),
    ("deit_tiny_patch16_224", {}, 1, "token"),
    ("vit_medium_patch16_reg4_gap_256", {"embed_dim": 128, "num_heads": 2}, 4, "avg"),
    ("vit_base_patch16_reg4_gap_256", {"embed_dim": 192, "num_heads": 3}, 4, "avg"),
    ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5, "token"),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, 1, "avg"),
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0, "avg"),
    ("vit_tiny_patch16_224", {"qk_norm": True}, 1, "token"),
]


def images_for(info: BackboneInfo, n: int) -> torch.Tensor:
    return torch.randn(n, info.in_chans, *info.img_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "kwargs", "prefix", "pool"), BACKBONES)
def test_supported_backbones(name: str, kwargs: dict[str, object], prefix: int, pool: str) -> None:
    bb = tiny_backbone(name, **kwargs)
    info = bb.info
    timm_model = bb.model
    assert info.name == name and info.fingerprint.startswith(f"{name}@sha256:")
    assert info.num_prefix_tokens == prefix == timm_model.num_prefix_tokens and info.global_pool == pool
    assert (
        info.depth == 2 and info.num_patches == 16 and info.img_size == (32, 32) and info.patch_size == (8, 8)
    )
    assert info.embed_dim == info.num_heads * info.head_dim
    assert info.model_kwargs == {**TINY, **kwargs}
    assert BackboneInfo.from_dict(info.to_dict()) == info
    # frozen and in eval mode
    assert not timm_model.training and all(not p.requires_grad for p in timm_model.parameters())
    model = PromptedViT(bb).eval()
    images = images_for(info, 3)
    sets = [
        PromptSet.create(
            "a", info, ["x", "y"], num_prompts=3, num_kv=2, generator=torch.Generator().manual_seed(1)
        ),
        PromptSet.create("b", info, ["x", "y", "z"], num_prompts=1, num_kv=4, share_kv=False),
    ]
    with torch.no_grad():
        assert (model.forward_backbone(images) - timm_model(images)).abs().max() <= 1e-5
        mixed = model.forward_multi(images, TaskBatch.from_prompt_sets(sets), torch.tensor([0, 1, 0]))
        alone = model.forward_multi(images[1:2], TaskBatch.from_prompt_sets(sets[1:]), torch.tensor([0]))
    assert mixed.shape == (3, 3)
    assert (mixed[1] - alone[0]).abs().max() <= 1e-4


def test_prompted_model_keeps_backbone_in_eval(backbone: Backbone) -> None:
    model = PromptedViT(backbone)
    model.train()
    assert model.training and not backbone.model.training
    assert all(not m.training for m in backbone.model.modules())


# ---------- checkpoints
def source_model() -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """A tiny ViT with weights different from load_backbone's seeded init."""
    torch.manual_seed(1234)
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_local_safetensors_and_pth(tmp_path: Path) -> None:
    model, state = source_model()
    want = fingerprint_model("vit_tiny_patch16_224", model)
    assert want != tiny_backbone().info.fingerprint
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth"
    )
    for file in ("w.safetensors", "w.pth", "wrapped.pth"):
        bb = load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / file, **TINY)
        assert bb.info.fingerprint == want, file
        assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in state.items())
        assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())


def write_jax_npz(model: VisionTransformer, path: Path) -> None:
    """Write a timm ViT in the original Google JAX/Flax `.npz` layout that timm's `_load_weights` reads.

    timm has no writer for this layout, so the test writes it: kernels in HWIO / [in, out] / [in, H, Dh] /
    [H, Dh, out] order as the JAX checkpoints store them."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    H = model.blocks[0].attn.num_heads
    D = model.embed_dim
    Dh = D // H
    w: dict[str, np.ndarray] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w = sd[b + "attn.qkv.weight"].reshape(3, D, D)
        qkv_b = sd[b + "attn.qkv.bias"].reshape(3, H, Dh)
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j].T.reshape(D, H, Dh)
            w[mha + f"{n}/bias"] = qkv_b[j]
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, H, Dh).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


def test_local_npz(tmp_path: Path) -> None:
    model, state = source_model()
    write_jax_npz(model, tmp_path / "w.npz")
    bb = load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "w.npz", **TINY)
    for k, v in state.items():
        assert torch.allclose(bb.model.state_dict()[k], v, atol=1e-7), k
    assert bb.info.fingerprint == fingerprint_model("vit_tiny_patch16_224", model)
    x = images_for(bb.info, 2)
    model.eval()
    with torch.no_grad():
        assert (bb.model(x) - model(x)).abs().max() <= 1e-5


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    bb = tiny_backbone("vit_tiny_patch16_224", reg_tokens=2)
    path = save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, tmp_path / "up" / "b.safetensors")
    back = load_backbone(checkpoint=path)
    assert back.info == bb.info
    assert back.info.fingerprint == bb.info.fingerprint and back.info.num_prefix_tokens == 3


def test_fingerprint_changes_with_any_weight() -> None:
    bb = tiny_backbone()
    before = bb.info.fingerprint
    assert fingerprint_model(bb.info.name, bb.model) == before
    assert tiny_backbone().info.fingerprint == before  # the same build in another call: same weights
    with torch.no_grad():
        bb.model.blocks[1].mlp.fc2.bias[0] += 1e-6
    assert fingerprint_model(bb.info.name, bb.model) != before
    assert fingerprint_model("other_name", tiny_backbone().model) != before
    assert tiny_backbone(seed=1).info.fingerprint != before


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.safetensors", **TINY)
    small = timm.create_model("vit_small_patch16_224", **TINY).state_dict()
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(UnsupportedBackbone):  # wrong shapes
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "small.safetensors", **TINY)
    for bad in ("garbage.safetensors", "garbage.pth", "garbage.npz"):
        (tmp_path / bad).write_bytes(b"this is not a checkpoint" * 10)
        with pytest.raises(UnsupportedBackbone):
            load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / bad, **TINY)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))  # an npz in no layout timm knows
    with pytest.raises(UnsupportedBackbone):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "other.npz", **TINY)
    partial = {
        k: v
        for k, v in timm.create_model("vit_tiny_patch16_224", **TINY).state_dict().items()
        if "head" not in k
    }
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UnsupportedBackbone):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "partial.safetensors", **TINY)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(UnsupportedBackbone):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "w.onnx", **TINY)
    with pytest.raises(UnsupportedBackbone):
        load_backbone(checkpoint=tmp_path / "partial.safetensors")  # no name and no spec inside


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("vit_tiny_patch16_224", {"block_fn": ParallelScalingBlock}),
        ("vit_tiny_patch16_224", {"attn_layer": "diff"}),
        ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),
        ("no_such_model_anywhere", {}),
    ],
)
def test_unsupported_backbones(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(UnsupportedBackbone) as caught:
        load_backbone(name, **kwargs)
    assert caught.value.http_status == 422


def test_backbone_from_settings_agrees_with_the_checkpoint(tmp_path) -> None:  # noqa: ANN001
    """Registry and engine build their backbone from settings: a project checkpoint names its own model,
    whatever `backbone` says, so both compute the checkpoint's fingerprint."""
    from e2vpt.config import Settings
    from e2vpt.core.backbone import backbone_from_settings

    src = tiny_backbone("vit_small_patch16_224")
    path = save_checkpoint(src.model, src.info.name, src.info.model_kwargs, tmp_path / "b.safetensors")
    built = backbone_from_settings(Settings(backbone="vit_tiny_patch16_224", backbone_checkpoint=str(path)))
    assert built.info.fingerprint == src.info.fingerprint
    assert built.info.name == "vit_small_patch16_224"
