"""The KV-slot attention path of `PromptedViT.forward_features` against the former per-layer
concatenation path (`e2vpt.dev.kv_concat`, an independent copy of it): features and gradients in float64
and float32, padded and unpadded, across the backbone variants the model supports; its graph-capture
(out-of-place) form; the absence of host reads in the forward; and fp16/bf16 against fp32."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import e2vpt.core.model as model_module
from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskPrompts
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.kv_concat import concat_forward_features
from tests.helpers import tiny_backbone

# 3 blocks (prompt replacement and slot overwrites happen more than once); small enough for milliseconds
VARIANTS: dict[str, dict[str, object]] = {
    "cls": {},
    "avg": {"global_pool": "avg"},
    "reg4": {"reg_tokens": 4},
    "no-cls-reg-avg": {"class_token": False, "global_pool": "avg", "reg_tokens": 2},
    "qk-norm": {"qk_norm": True},
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def variant(name: str, dtype: torch.dtype = torch.float32) -> Backbone:
    bb = tiny_backbone(depth=3, **VARIANTS[name])
    if name == "qk-norm":  # non-trivial norms, so that writing the KV prompts before k-norm would show
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for blk in bb.model.blocks:
                for norm in (blk.attn.q_norm, blk.attn.k_norm):
                    norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
                    norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))
    bb.model.to(dtype)
    return bb


def prompt_inputs(
    bb: Backbone, B: int, P: int, T: int, *, padded: bool, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """images, visual [B, L, P, D], kv [B, L, 2, H, T, Dh] (std 1: errors show far above tolerance), and
    valid masks. padded: image 0 full, image 1 with no KV prompt at all, the others random subsets;
    padding entries are zero (as `TaskBatch` builds them). Unpadded: masks None."""
    g = torch.Generator().manual_seed(seed)
    i = bb.info
    images = torch.randn(B, i.in_chans, *i.img_size, generator=g, dtype=torch.float64).to(dtype)
    visual = torch.randn(B, i.depth, P, i.embed_dim, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(B, i.depth, 2, i.num_heads, T, i.head_dim, generator=g, dtype=torch.float64).to(dtype)
    if not padded:
        return images, visual, kv, None, None
    visual_valid = torch.rand(B, P, generator=g) > 0.4
    kv_valid = torch.rand(B, T, generator=g) > 0.4
    visual_valid[0], kv_valid[0] = True, True
    if B > 1:
        kv_valid[1] = False
    visual = visual * visual_valid[:, None, :, None]
    kv = kv * kv_valid[:, None, None, None, :, None]
    return images, visual, kv, visual_valid, kv_valid


def on(device: str, tensors: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
    return tuple(None if t is None else t.to(device) for t in tensors)


def no_tf32() -> None:
    """Exact float32 matmuls on a GPU (TF32 would differ between the two paths' matmul shapes)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ---------- features: slot path == concatenation path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("device", DEVICES)
def test_slot_path_equals_concat_path(device: str, name: str, padded: bool, dtype: torch.dtype) -> None:
    no_tf32()
    bb = variant(name, dtype)
    bb.model.to(device)
    model = PromptedViT(bb).eval()
    args = on(device, prompt_inputs(bb, 5, 3, 4, padded=padded, dtype=dtype))
    with torch.no_grad():
        got = model.forward_features(*args)
        want = concat_forward_features(bb.model, *args)
        no_kv = concat_forward_features(bb.model, *args[:2])
    assert got.shape == want.shape == (5, bb.info.embed_dim)
    assert got.dtype == dtype
    assert (got - want).abs().max().item() <= TOL[dtype]
    assert (want - no_kv).abs().max().item() > 1e-2  # the KV prompts really change the features


@pytest.mark.parametrize(("P", "T"), [(0, 3), (3, 0), (0, 0), (1, 1)])
def test_slot_path_with_only_one_kind_of_prompt(backbone: Backbone, P: int, T: int) -> None:
    model = PromptedViT(backbone).eval()
    for padded in (False, True):
        args = prompt_inputs(backbone, 3, P, T, padded=padded, dtype=torch.float32, seed=P + 10 * T)
        with torch.no_grad():
            got = model.forward_features(*args)
            want = concat_forward_features(backbone.model, *args)
        assert (got - want).abs().max().item() <= TOL[torch.float32], padded
    if P == T == 0:  # zero-size prompts are the bare backbone
        with torch.no_grad():
            bare = model.forward_features(args[0])
            assert (model.forward_features(*args) - bare).abs().max().item() <= 1e-6


def test_none_valid_means_nothing_padded(backbone: Backbone) -> None:
    """All-True masks and None give the same features; the mask is built from what the caller says,
    not from the values (padding passed as None is not detected: that is the caller's promise)."""
    model = PromptedViT(backbone).eval()
    images, visual, kv, _, _ = prompt_inputs(backbone, 3, 3, 4, padded=False)
    ones_p = torch.ones(3, 3, dtype=torch.bool)
    ones_t = torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        none = model.forward_features(images, visual, kv)
        full = model.forward_features(images, visual, kv, ones_p, ones_t)
        half = model.forward_features(images, visual, kv, ones_p, None)
    assert (none - full).abs().max().item() <= 1e-5
    assert (none - half).abs().max().item() <= 1e-5
    assert model_module.key_padding_mask(3, 1, 16, 3, 4, None, None, torch.float32) is None
    mask = model_module.key_padding_mask(2, 1, 16, 3, 4, ones_p[:2], ~ones_t[:2], torch.float32)
    assert mask is not None and mask.shape == (2, 1, 1, 1 + 3 + 16 + 4)
    assert (mask[..., :-4] == 0).all() and (mask[..., -4:] == float("-inf")).all()


def test_slot_rows_are_never_read(backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the slot rows hold (they are computed, then ignored), the features are the same."""
    model = PromptedViT(backbone).eval()
    args = prompt_inputs(backbone, 3, 2, 4, padded=True)
    with torch.no_grad():
        want = model.forward_features(*args)
        real_block = model_module.prompted_block

        def noisy_block(blk: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None, **kw: bool):
            if kv_prompt is not None:
                x = x.clone()
                x[:, -kv_prompt.shape[3] :] = 1e3 * torch.randn_like(x[:, -kv_prompt.shape[3] :])
            return real_block(blk, x, kv_prompt, mask, **kw)

        monkeypatch.setattr(model_module, "prompted_block", noisy_block)
        got = model.forward_features(*args)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_no_concatenation_in_any_block(grad: bool) -> None:
    """Eager, the forward runs the same number of concatenations whatever the depth (the sequence's
    start and the pooling): K and V are never concatenated per block, in serving or (under autograd) in
    training. (The backward's per-block stack is timm's own: the gradient of its qkv unbind.)"""

    def cats(depth: int) -> int:
        bb = tiny_backbone(depth=depth)
        model = PromptedViT(bb).train(grad)
        images, visual, kv, vv, kvv = prompt_inputs(bb, 3, 2, 4, padded=True)
        visual.requires_grad_(grad)
        kv.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            with torch.profiler.profile() as prof:
                feats = model.forward_features(images, visual, kv, vv, kvv)
            if grad:
                feats.square().sum().backward()
                assert kv.grad is not None and kv.grad.abs().sum() > 0
        return sum(e.count for e in prof.key_averages() if e.key == "aten::cat")

    assert 0 < cats(2) == cats(5) <= 3


# ---------- training: gradients equal the concatenation path's
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ["cls", "qk-norm", "no-cls-reg-avg"])
@pytest.mark.parametrize("capture", [False, True], ids=["eager", "capture"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_equal_concat_path(
    device: str, name: str, padded: bool, capture: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """d loss / d (visual, kv) through the slot path (in-place writes under autograd, or the out-of-place
    graph-capture form) equal those through the concatenation path, in float64."""
    bb = variant(name, torch.float64)
    bb.model.to(device)
    model = PromptedViT(bb).train()
    inputs = on(device, prompt_inputs(bb, 4, 3, 2, padded=padded, dtype=torch.float64, seed=2))
    images, visual, kv, vv, kvv = inputs
    proj = torch.randn(bb.info.embed_dim, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    proj = proj.to(device)

    def grads(forward: object) -> tuple[Tensor, Tensor, Tensor]:
        v = visual.clone().requires_grad_(True)
        k = kv.clone().requires_grad_(True)
        feats = forward(images, v, k, vv, kvv)  # type: ignore[operator]
        (feats @ proj).square().sum().backward()
        return feats.detach(), v.grad, k.grad  # type: ignore[return-value]

    want = grads(lambda *a: concat_forward_features(bb.model, *a))
    if capture:
        monkeypatch.setattr(model_module, "_capturing_graph", lambda: True)
    got = grads(model.forward_features)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e-9
    assert want[2].abs().sum() > 0 and want[2][:, 1:].abs().sum() > 0  # every block's KV prompts learn
    if padded:
        assert (got[2] * ~kvv[:, None, None, None, :, None]).abs().sum() == 0  # type: ignore[operator]
    assert all(p.grad is None for p in bb.model.parameters())


def test_backbone_gradients_equal_concat_path() -> None:
    """Full fine-tuning trains the backbone too: its parameters' gradients (the qkv projection's among
    them, computed by the slot buffer's own backward) equal the concatenation path's, in float64."""
    bb = variant("qk-norm", torch.float64)
    bb.model.requires_grad_(True)
    model = PromptedViT(bb).train()
    images, visual, kv, vv, kvv = prompt_inputs(bb, 3, 2, 3, padded=True, dtype=torch.float64, seed=7)

    def grads(forward: object) -> dict[str, Tensor]:
        bb.model.zero_grad(set_to_none=True)
        forward(images, visual, kv, vv, kvv).square().sum().backward()  # type: ignore[operator]
        return {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}

    want = grads(lambda *a: concat_forward_features(bb.model, *a))
    got = grads(model.forward_features)
    assert got.keys() == want.keys() and "blocks.0.attn.qkv.weight" in got and "blocks.0.attn.qkv.bias" in got
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() <= 1e-9, name


@pytest.mark.parametrize("share_kv", [True, False], ids=["tied", "separate"])
def test_forward_task_kv_gradients_equal_concat_path(share_kv: bool) -> None:
    """`forward_task` (expanded prompts, tied K/V) gives the KV prompts the oracle's gradients."""
    bb = variant("qk-norm", torch.float64)
    model = PromptedViT(bb).train()
    g = torch.Generator().manual_seed(6)
    ps = PromptSet.create(
        "t", bb.info, ["a", "b", "c"], num_prompts=3, num_kv=2, share_kv=share_kv, generator=g
    )
    prompts = TaskPrompts.from_prompt_set(ps, prompt_dropout=0.0).double()
    images = prompt_inputs(bb, 3, 0, 0, padded=False, dtype=torch.float64)[0]
    target = torch.tensor([0, 2, 1])
    nn.functional.cross_entropy(model.forward_task(images, prompts), target).backward()

    visual = prompts.visual.detach().clone().requires_grad_(True)
    kv = prompts.kv.detach().clone().requires_grad_(True)
    kv_pair = kv.expand(-1, 2, -1, -1, -1) if share_kv else kv
    feats = concat_forward_features(
        bb.model, images, visual[None].expand(3, -1, -1, -1), kv_pair[None].expand(3, -1, -1, -1, -1, -1)
    )
    nn.functional.cross_entropy(prompts.head(feats), target).backward()
    assert prompts.kv.grad is not None and prompts.kv.grad.abs().sum() > 0
    assert (prompts.kv.grad - kv.grad).abs().max().item() <= 1e-9  # type: ignore[operator]
    assert (prompts.visual.grad - visual.grad).abs().max().item() <= 1e-9  # type: ignore[operator]


# ---------- graph capture and host reads
@pytest.mark.parametrize("name", ["cls", "qk-norm", "no-cls-reg-avg"])
def test_graph_capture_form_equals_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = variant(name)
    model = PromptedViT(bb).eval()
    args = prompt_inputs(bb, 4, 3, 4, padded=True, seed=5)
    with torch.no_grad():
        eager = model.forward_features(*args)
        monkeypatch.setattr(model_module, "_capturing_graph", lambda: True)
        captured = model.forward_features(*args)
    assert (eager - captured).abs().max().item() <= 1e-5


def test_forward_never_reads_tensor_values_on_the_host(backbone: Backbone) -> None:
    """On the meta device a tensor has no values: any host read (`bool(t)`, `.item()`, `.tolist()`) raises.
    The whole forward, padded masks included, runs there; the former path does not."""
    meta = copy.deepcopy(PromptedViT(backbone).eval()).to("meta")
    args = [a.to("meta") for a in prompt_inputs(backbone, 3, 3, 4, padded=True) if a is not None]
    with torch.no_grad():
        out = meta.forward_features(*args)
        assert out.shape == (3, backbone.info.embed_dim) and out.device.type == "meta"
        with pytest.raises(RuntimeError, match="meta"):
            concat_forward_features(meta.vit, *args)  # it asks the host "is anything padded?"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forward_never_synchronises_cuda() -> None:
    bb = variant("reg4")
    bb.model.cuda()
    model = PromptedViT(bb).eval()
    args = [a.cuda() for a in prompt_inputs(bb, 4, 3, 4, padded=True) if a is not None]
    with torch.no_grad():
        model.forward_features(*args)  # warm up (lazy initialisation may synchronise once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.forward_features(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---------- reduced precision against fp32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_top1_agrees_with_fp32(
    device: str, dtype: torch.dtype, record_property: pytest.RecordProperty
) -> None:
    """A padded mixed-prompt batch in fp16/bf16 against the same batch in fp32 (TF32 off): the top-1
    class agrees wherever the fp32 margin between the two best classes exceeds twice the largest logit
    difference, and the largest difference stays small. The difference is reported."""
    no_tf32()
    bb = variant("cls")
    bb.model.to(device)
    B, C = 16, 10
    images, visual, kv, vv, kvv = prompt_inputs(bb, B, 5, 3, padded=True, seed=8)
    visual, kv = 0.1 * visual, 0.3 * kv  # the initialisation's scale (std 1 overflows nothing, but is unreal)
    g = torch.Generator().manual_seed(9)
    head = torch.randn(C, bb.info.embed_dim, generator=g) / bb.info.embed_dim**0.5
    model32 = PromptedViT(bb).eval()
    model_low = PromptedViT(Backbone(model=copy.deepcopy(bb.model).to(dtype), info=bb.info)).eval()
    to = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    with torch.no_grad():
        ref = model32.forward_features(to(images), to(visual), to(kv), to(vv), to(kvv)) @ to(head).T
        low = (
            model_low.forward_features(
                to(images, dtype), to(visual, dtype), to(kv, dtype), to(vv), to(kvv)
            ).float()
            @ to(head).T
        )
    diff = (low - ref).abs().max().item()
    top2 = ref.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * diff
    agree = low.argmax(1) == ref.argmax(1)
    record_property("max_logit_diff", diff)
    record_property("top1_agreement", f"{int(agree.sum())}/{B}")
    print(f"{device} {dtype}: max logit diff {diff:.4g}, top-1 {int(agree.sum())}/{B}")
    assert torch.isfinite(low).all()
    assert diff <= (0.05 if dtype == torch.float16 else 0.3)
    assert bool(agree[decided].all()) and int(decided.sum()) >= B // 2
