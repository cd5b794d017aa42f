"""PromptedViT against references written out here: plain timm logits, a hand-written deep-prompt /
KV-prompt forward, and every image of a mixed batch against the same image run alone."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskBatch, TaskPrompts, prompted_attention, split_logits
from e2vpt.core.promptset import PromptSet
from tests.helpers import tiny_backbone

TOL = 1e-4


# ---------- helpers
def images_for(bb: Backbone, n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, bb.info.in_chans, *bb.info.img_size, generator=g)


def make_set(
    bb: Backbone,
    task_id: str,
    *,
    P: int,
    T: int,
    C: int,
    share_kv: bool = True,
    seed: int = 0,
    token_mask: list[int] | None = None,
    segments: int = 0,
    layout: str = "contiguous",
) -> PromptSet:
    """A prompt set with large random values (std 1), so that any masking or placement error shows up
    far above the 1e-4 tolerance. `segments` > 0 adds a random [P, segments] segment mask."""
    g = torch.Generator().manual_seed(seed)
    ps = PromptSet.create(
        task_id,
        bb.info,
        [f"c{i}" for i in range(C)],
        num_prompts=P,
        num_kv=T,
        share_kv=share_kv,
        segment_layout=layout,
        generator=g,
    )
    ps = replace(
        ps,
        visual=torch.randn(ps.visual.shape, generator=g),
        kv=torch.randn(ps.kv.shape, generator=g),
        head_weight=torch.randn(ps.head_weight.shape, generator=g),
        head_bias=torch.randn(ps.head_bias.shape, generator=g),
    )
    if token_mask is not None:
        ps = replace(ps, token_mask=torch.tensor(token_mask, dtype=torch.uint8))
    if segments:
        seg = (torch.rand(P, segments, generator=g) > 0.4).to(torch.uint8)
        ps = replace(ps, segment_mask=seg)
    return ps.validate(bb.info)


def run_sets(model: PromptedViT, images: Tensor, sets: list[PromptSet], task_index: list[int]) -> Tensor:
    tasks = TaskBatch.from_prompt_sets(sets, device=images.device)
    idx = torch.tensor(task_index, device=images.device)
    return model.forward_multi(images, tasks, idx)


def run_alone(model: PromptedViT, image: Tensor, ps: PromptSet) -> Tensor:
    return run_sets(model, image[None], [ps], [0])[0, : ps.num_classes]


def reference_attention(
    attn: nn.Module, x: Tensor, kv_prompt: Tensor | None, key_valid: Tensor | None
) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v with the KV prompts concatenated after the keys/values, written out.

    kv_prompt [B, 2, H, T, Dh]; key_valid [B, N + T] bool (False = never attended to)."""
    B, N, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = qkv.split(H * Dh, dim=-1)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(B, t.shape[1], H, Dh).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if kv_prompt is not None:
        k = torch.cat([k, kv_prompt[:, 0]], dim=2)
        v = torch.cat([v, kv_prompt[:, 1]], dim=2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, H * Dh)
    return out @ attn.proj.weight.T + attn.proj.bias


def reference_features(vit: nn.Module, images: Tensor, visual: Tensor, kv: Tensor | None) -> Tensor:
    """Deep VPT + KV prompts, one task, as method.md states it, over timm's own blocks.

    visual [L, P, D] (no position embedding; replaced before every block), kv [L, 2, H, T, Dh] or None
    (None: timm's own `blk(x)` runs each block). Pooling excludes the prompt positions."""
    B = images.shape[0]
    npre = vit.num_prefix_tokens
    P = visual.shape[1]
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))  # prefix + patches, with position embedding
    for i, blk in enumerate(vit.blocks):
        prompts = visual[i][None].expand(B, -1, -1)
        patches = x[:, npre:] if i == 0 else x[:, npre + P :]
        x = torch.cat([x[:, :npre], prompts, patches], dim=1)
        if kv is None:
            x = blk(x)
        else:
            kvb = kv[i][None].expand(B, -1, -1, -1, -1)
            x = x + blk.ls1(reference_attention(blk.attn, blk.norm1(x), kvb, None))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = vit.norm(x)
    if vit.global_pool == "token":
        pooled = x[:, 0]
    elif vit.global_pool == "avg":
        pooled = x[:, npre + P :].mean(dim=1)  # patch tokens only: no prefix, no prompts
    else:
        raise AssertionError(vit.global_pool)
    return vit.fc_norm(pooled)


@pytest.fixture(scope="module")
def model(backbone: Backbone) -> PromptedViT:
    return PromptedViT(backbone).eval()


# ---------- P = T = 0
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_tiny_patch16_224", {"global_pool": "avg"}),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}),
        ("deit_tiny_patch16_224", {}),
        ("vit_medium_patch16_reg4_gap_256", {"embed_dim": 128, "num_heads": 2}),
    ],
)
def test_zero_prompts_reproduce_timm_logits(name: str, kwargs: dict[str, object]) -> None:
    bb = tiny_backbone(name, **kwargs)
    model = PromptedViT(bb).eval()
    images = images_for(bb, 3)
    with torch.no_grad():
        expected = bb.model(images)
        own = model.forward_backbone(images)
        head = bb.model.head
        ps = PromptSet(
            task_id="own-head",
            visual=torch.zeros(bb.info.depth, 0, bb.info.embed_dim),
            kv=torch.zeros(bb.info.depth, 1, bb.info.num_heads, 0, bb.info.head_dim),
            head_weight=head.weight.detach().clone(),
            head_bias=head.bias.detach().clone(),
            labels=[str(i) for i in range(head.weight.shape[0])],
            backbone=bb.info.name,
            fingerprint=bb.info.fingerprint,
        ).validate(bb.info)
        multi = run_sets(model, images, [ps], [0, 0, 0])
    assert expected.shape == own.shape == multi.shape
    assert (own - expected).abs().max() <= 1e-5
    assert (multi - expected).abs().max() <= 1e-5


# ---------- references
def test_kv_attention_matches_reference(backbone: Backbone) -> None:
    attn = backbone.model.blocks[0].attn
    g = torch.Generator().manual_seed(1)
    B, N, T = 3, 9, 4
    H, Dh = attn.num_heads, attn.head_dim
    x = torch.randn(B, N, backbone.info.embed_dim, generator=g)
    kvp = torch.randn(B, 2, H, T, Dh, generator=g)
    # the KV prompts go into T slot rows appended to the sequence; the first N rows are the answer
    slots = torch.cat([x, torch.randn(B, T, x.shape[2], generator=g)], dim=1)
    with torch.no_grad():
        got = prompted_attention(attn, slots, kvp, None)[:, :N]
        want = reference_attention(attn, x, kvp, None)
        plain = reference_attention(attn, x, None, None)
    assert got.shape == (B, N, backbone.info.embed_dim)
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-2  # the prompts really change the output

    # key-padding mask: masked keys (a padded prompt position and padded KV slots) are never attended to
    valid = torch.ones(B, N + T, dtype=torch.bool)
    valid[0, 2] = False
    valid[1, N + 2 :] = False
    valid[2, N:] = False
    with torch.no_grad():
        got_m = prompted_attention(attn, slots, kvp, valid[:, None, None, :])[:, :N]
        want_m = reference_attention(attn, x, kvp, valid)
        # image 2 with all KV slots masked equals attention with no prompts at all
        no_kv = reference_attention(attn, x[2:], None, None)
    assert (got_m - want_m).abs().max() <= 1e-5
    assert (got_m[2] - no_kv[0]).abs().max() <= 1e-5
    assert (got_m - got).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs", [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg", "reg_tokens": 2}]
)
@pytest.mark.parametrize("with_kv", [False, True])
def test_deep_prompts_match_reference_loop(kwargs: dict[str, object], with_kv: bool) -> None:
    bb = tiny_backbone(**kwargs)
    model = PromptedViT(bb).eval()
    ps = make_set(bb, "ref", P=3, T=2 if with_kv else 0, C=4, share_kv=False, seed=5)
    images = images_for(bb, 2, seed=3)
    with torch.no_grad():
        got = run_sets(model, images, [ps], [0, 0])
        feats = reference_features(bb.model, images, ps.visual, ps.kv_pair() if with_kv else None)
        want = feats @ ps.head_weight.T + ps.head_bias
        # the same prompts given only before block 0 (not replaced) differ: replacement is observable
        inserted_once = ps.visual.clone()
        inserted_once[1:] = 0
        other = reference_features(bb.model, images, inserted_once, ps.kv_pair() if with_kv else None)
    assert (got - want).abs().max() <= TOL
    assert (feats - other).abs().max() > 1e-2


def test_avg_pool_excludes_prompts() -> None:
    bb = tiny_backbone(global_pool="avg")
    model = PromptedViT(bb).eval()
    ps = make_set(bb, "avg", P=4, T=0, C=3)
    images = images_for(bb, 2)
    npre, P = bb.model.num_prefix_tokens, 4
    with torch.no_grad():
        feats = model.forward_features(images, ps.visual[None].expand(2, -1, -1, -1))
        seen: list[Tensor] = []
        hook = bb.model.norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            model.forward_features(images, ps.visual[None].expand(2, -1, -1, -1))
        finally:
            hook.remove()
    tokens = seen[0]
    assert tokens.shape[1] == npre + P + bb.info.num_patches
    assert (feats - bb.model.fc_norm(tokens[:, npre + P :].mean(1))).abs().max() <= 1e-5
    assert (feats - bb.model.fc_norm(tokens[:, npre:].mean(1))).abs().max() > 1e-3


# ---------- mixed batch
def mixed_sets(bb: Backbone) -> list[PromptSet]:
    pruned = make_set(
        bb, "pruned", P=8, T=3, C=4, share_kv=False, seed=16, token_mask=[1, 0, 1, 1, 0, 0, 1, 1], segments=16
    )
    return [
        make_set(bb, "p0-t0", P=0, T=0, C=3, seed=10),
        make_set(bb, "p4-t0", P=4, T=0, C=5, seed=11),
        make_set(bb, "p0-t3", P=0, T=3, C=2, seed=12),
        make_set(bb, "tied", P=6, T=2, C=7, share_kv=True, seed=13),
        make_set(bb, "separate", P=3, T=5, C=1, share_kv=False, seed=14),
        make_set(bb, "p1-t1", P=1, T=1, C=10, seed=15),
        pruned,
        replace(pruned.compact(), task_id="pruned-compacted"),
        make_set(
            bb, "strided", P=5, T=4, C=3, seed=17, token_mask=[1, 1, 0, 1, 1], segments=8, layout="strided"
        ),
    ]


def check_mixed_batch(model: PromptedViT, bb: Backbone, device: torch.device) -> None:
    sets = [s.to(device) for s in mixed_sets(bb)]
    g = torch.Generator().manual_seed(0)
    order = list(range(len(sets))) * 2
    task_index = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    images = images_for(bb, len(task_index), seed=7).to(device)
    with torch.no_grad():
        logits = run_sets(model, images, sets, task_index)
        per_image = split_logits(logits, [sets[t].num_classes for t in task_index])
        for b, t in enumerate(task_index):
            alone = run_alone(model, images[b], sets[t])
            assert per_image[b].shape == (sets[t].num_classes,)
            assert (per_image[b] - alone).abs().max().item() <= TOL, (b, sets[t].task_id)
        # the check is sensitive: ignoring the padding masks changes the answers by far more than TOL
        tasks = TaskBatch.from_prompt_sets(sets, device=device)
        idx = torch.tensor(task_index, device=device)
        visual, kv, _, _ = tasks.gather(idx)
        unmasked = tasks.logits(model.forward_features(images, visual, kv), idx)
    assert (unmasked - logits).abs().max().item() > 1e-2


def test_mixed_batch_equals_each_image_alone(model: PromptedViT, backbone: Backbone) -> None:
    assert len(mixed_sets(backbone)) >= 8
    check_mixed_batch(model, backbone, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_batch_equals_each_image_alone_cuda() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bb = tiny_backbone()
    bb.model.cuda()
    model = PromptedViT(bb).eval()
    check_mixed_batch(model, bb, torch.device("cuda"))


def test_split_logits_drops_padding() -> None:
    logits = torch.arange(12.0).reshape(3, 4)
    parts = split_logits(logits, torch.tensor([1, 4, 2]))
    assert [p.tolist() for p in parts] == [[0.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]


# ---------- K/V and pruning
def test_tied_and_separate_kv(model: PromptedViT, backbone: Backbone) -> None:
    tied = make_set(backbone, "tied", P=2, T=3, C=4, share_kv=True, seed=3)
    assert tied.kv.shape[1] == 1 and tied.share_kv
    separate_same = replace(tied, task_id="sep-same", kv=tied.kv.repeat(1, 2, 1, 1, 1).clone())
    assert not separate_same.share_kv
    other_v = separate_same.kv.clone()
    other_v[:, 1] = torch.randn_like(other_v[:, 1])
    separate = replace(tied, task_id="sep", kv=other_v)
    images = images_for(backbone, 2)
    with torch.no_grad():
        a = run_sets(model, images, [tied], [0, 0])
        b = run_sets(model, images, [separate_same], [0, 0])
        c = run_sets(model, images, [separate], [0, 0])
        d = run_sets(model, images, [tied, separate], [0, 1])
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - c).abs().max() > 1e-2  # separate values are really used
    assert (d[0] - a[0]).abs().max() <= TOL and (d[1] - c[1]).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_compacted_set_equals_masked_set(model: PromptedViT, backbone: Backbone, layout: str) -> None:
    ps = make_set(
        backbone, "masked", P=6, T=2, C=5, seed=21, token_mask=[1, 0, 1, 0, 0, 1], segments=16, layout=layout
    )
    compact = ps.compact()
    assert compact.num_prompts == 3 and compact.token_mask is None
    assert compact.config["kept_token_indices"] == [0, 2, 5]
    prompts = TaskPrompts.from_prompt_set(ps, prompt_dropout=0.1).eval()  # eval: no prompt dropout
    assert prompts.segment_layout == layout
    images = images_for(backbone, 3, seed=2)
    with torch.no_grad():
        masked = model.forward_task(images, prompts)
        served = run_sets(model, images, [compact], [0, 0, 0])
        served_masked = run_sets(model, images, [ps], [0, 0, 0])
        full = TaskPrompts.from_prompt_set(replace(ps, token_mask=None, segment_mask=None)).eval()
        unpruned = model.forward_task(images, full)
    assert torch.equal(masked, served) or (masked - served).abs().max() <= 1e-5
    assert (served_masked - served).abs().max() <= TOL
    assert (masked - unpruned).abs().max() > 1e-2  # the masks have an effect


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compact_is_device_safe(backbone: Backbone, device: str) -> None:
    """Prompts on another device than their masks (`PromptSet.to` moves only the float tensors): compact
    keeps everything on the prompts' device and needs no values from it (meta tensors have none)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ps = make_set(backbone, "dev", P=5, T=2, C=3, seed=4, token_mask=[1, 0, 1, 1, 0], segments=8)
    moved = ps.to(device)
    assert moved.token_mask is not None and moved.token_mask.device.type == "cpu"
    compact = moved.compact()
    assert compact.visual.device.type == device and compact.visual.shape == (backbone.info.depth, 3, 192)
    assert compact.config["kept_token_indices"] == [0, 2, 3]
    assert moved.masked_visual().shape == compact.visual.shape
    if device != "meta":
        assert torch.equal(compact.visual.cpu(), ps.compact().visual)


def test_segment_layouts_differ(backbone: Backbone) -> None:
    ps = make_set(backbone, "seg", P=2, T=1, C=2, segments=4, layout="contiguous")
    strided = replace(ps, config={**ps.config, "segment_layout": "strided"})
    a, b = ps.compact().visual, strided.compact().visual
    D = backbone.info.embed_dim
    seg = ps.segment_mask.bool()
    for p in range(2):
        for r in range(4):
            contiguous_dims = ps.visual[:, p, r * D // 4 : (r + 1) * D // 4]
            strided_dims = ps.visual[:, p, r::4]
            assert torch.equal(a[:, p, r * D // 4 : (r + 1) * D // 4], contiguous_dims * seg[p, r])
            assert torch.equal(b[:, p, r::4], strided_dims * seg[p, r])


# ---------- training
def test_training_gives_gradients_to_prompts_and_head_only(backbone: Backbone) -> None:
    model = PromptedViT(backbone)
    ps = make_set(backbone, "train", P=4, T=2, C=3, seed=1, token_mask=[1, 1, 0, 1])
    prompts = TaskPrompts.from_prompt_set(ps)
    model.train()
    prompts.train()
    assert not backbone.model.training and all(not m.training for m in backbone.model.modules())
    images = images_for(backbone, 4)
    logits = model.forward_task(images, prompts)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    for name, p in prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a pruned token is absent: no gradient reaches it
    assert prompts.visual.grad[:, 2].abs().sum() == 0
    assert prompts.visual.grad[:, 0].abs().sum() > 0
    # importance gates: d loss / d gate at gate = 1
    gate = torch.ones(4, requires_grad=True)
    seg_gate = torch.ones(4, 16, requires_grad=True)
    prompts.eval()
    loss = nn.functional.cross_entropy(
        model.forward_task(images, prompts, gate, seg_gate), torch.tensor([0, 1, 2, 0])
    )
    loss.backward()
    assert gate.grad is not None and gate.grad[0] != 0 and gate.grad[2] == 0
    assert seg_gate.grad is not None and seg_gate.grad.abs().sum() > 0


def _graph_size(t: Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def test_linear_probe_leaves_the_frozen_backbone_out_of_autograd(backbone: Backbone) -> None:
    """No prompts and a frozen backbone: only the head is in the graph (same logits, a far cheaper
    backward); with prompts, or a trainable backbone (`full`), the backbone is in it."""
    model = PromptedViT(backbone)
    images = images_for(backbone, 4)
    linear = TaskPrompts.from_prompt_set(make_set(backbone, "lin", P=0, T=0, C=3, seed=2))
    logits = model.forward_task(images, linear)
    assert _graph_size(logits) <= 4  # addmm, its weight transpose, two leaves
    logits.sum().backward()
    assert linear.head.weight.grad is not None and linear.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ref = linear.head(model.forward_features(images))
    torch.testing.assert_close(logits.detach(), ref, rtol=0, atol=0)
    prompted = TaskPrompts.from_prompt_set(make_set(backbone, "vpt", P=2, T=0, C=3, seed=2))
    assert _graph_size(model.forward_task(images, prompted)) > 50
    full = PromptedViT(backbone)
    try:
        for p in backbone.model.parameters():
            p.requires_grad_(True)
        assert _graph_size(full.forward_task(images, linear)) > 50
    finally:
        for p in backbone.model.parameters():
            p.requires_grad_(False)


def test_forward_task_equals_forward_multi_in_eval(model: PromptedViT, backbone: Backbone) -> None:
    ps = make_set(backbone, "same", P=3, T=2, C=4, share_kv=False, seed=8)
    prompts = TaskPrompts.from_prompt_set(ps).eval()
    images = images_for(backbone, 2)
    with torch.no_grad():
        a = model.forward_task(images, prompts)
        b = run_sets(model, images, [ps], [0, 0])
    assert (a - b).abs().max() <= 1e-5
    back = prompts.to_prompt_set(ps)
    assert torch.equal(back.visual, ps.visual) and torch.equal(back.kv, ps.kv)
    assert back.token_mask is None and back.segment_mask is None


def test_training_gradients_match_reference(backbone: Backbone) -> None:
    """Gradients through the (in-place) prompt replacement equal those of the reference loop."""
    model = PromptedViT(backbone).train()
    ps = make_set(backbone, "grad", P=3, T=2, C=4, share_kv=False, seed=9)
    prompts = TaskPrompts.from_prompt_set(ps, prompt_dropout=0.0)
    images = images_for(backbone, 2)
    target = torch.tensor([1, 3])
    nn.functional.cross_entropy(model.forward_task(images, prompts), target).backward()
    visual = ps.visual.clone().requires_grad_(True)
    kv = ps.kv.clone().requires_grad_(True)
    weight = ps.head_weight.clone().requires_grad_(True)
    feats = reference_features(backbone.model, images, visual, kv)
    nn.functional.cross_entropy(feats @ weight.T + ps.head_bias, target).backward()
    assert (prompts.visual.grad - visual.grad).abs().max() <= 1e-5
    assert (prompts.kv.grad - kv.grad).abs().max() <= 1e-5
    assert (prompts.head.weight.grad - weight.grad).abs().max() <= 1e-5
    assert visual.grad[1].abs().sum() > 0  # the prompts of block 1 (replaced in place) get gradients


def test_graph_capture_path_gives_the_same_logits(
    model: PromptedViT, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ONNX/torch.export capture the forward avoids in-place updates and data-dependent mask
    decisions; it must compute the same thing."""
    import e2vpt.core.model as model_module

    sets = mixed_sets(backbone)
    task_index = list(range(len(sets)))
    images = images_for(backbone, len(sets), seed=4)
    with torch.no_grad():
        eager = run_sets(model, images, sets, task_index)
        uniform = run_sets(model, images[:2], sets[3:4], [0, 0])  # nothing padded: no mask in eager mode
        monkeypatch.setattr(model_module, "_capturing_graph", lambda: True)
        captured = run_sets(model, images, sets, task_index)
        uniform_captured = run_sets(model, images[:2], sets[3:4], [0, 0])
    assert (eager - captured).abs().max() <= 1e-5
    assert (uniform - uniform_captured).abs().max() <= 1e-5
