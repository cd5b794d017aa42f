"""The KV-prompt forward as it was before the slot path (commit 7e3342e): in every block the task's KV
prompts are concatenated onto K and V after the head split and k-norm (keys N + T, queries N), and the
key-padding mask is built only when a valid mask really has a False entry (a host read).

Kept as an independent oracle: `tests/core/test_attention.py` checks the slot path against it (logits
and gradients), and `benchmarks/bench_attention.py` times it as "today's concat path". It shares no
code with `e2vpt.core.model` beyond timm's own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def concat_attention(attn: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None) -> Tensor:
    """timm `Attention` with KV prompts appended to K and V. kv_prompt [B, 2, H, T, Dh]; mask
    [B, 1, 1, N + T] additive float or bool (True = attend)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if kv_prompt is not None and kv_prompt.shape[3] > 0:
        k = torch.cat([k, kv_prompt[:, 0].to(k.dtype)], dim=2)
        v = torch.cat([v, kv_prompt[:, 1].to(v.dtype)], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def concat_forward_features(
    vit: nn.Module,
    images: Tensor,
    visual: Tensor | None = None,
    kv: Tensor | None = None,
    visual_valid: Tensor | None = None,
    kv_valid: Tensor | None = None,
) -> Tensor:
    """Pooled features [B, D'] with the sequence [prefix, visual prompts, patches] and KV prompts
    concatenated onto K and V in every block. Same arguments as `PromptedViT.forward_features`."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    B, n_tokens, _ = x.shape
    npre = vit.num_prefix_tokens
    P = visual.shape[2] if visual is not None else 0
    T = kv.shape[4] if kv is not None else 0
    pad_p = P > 0 and visual_valid is not None and not bool(visual_valid.all())
    pad_t = T > 0 and kv_valid is not None and not bool(kv_valid.all())
    mask = None
    if pad_p or pad_t:
        valid = torch.ones(B, n_tokens + P + T, dtype=torch.bool, device=x.device)
        if pad_p:
            valid[:, npre : npre + P] = visual_valid
        if pad_t:
            valid[:, n_tokens + P :] = kv_valid
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill_(~valid, float("-inf"))
        mask = mask[:, None, None, :]
    for i, blk in enumerate(vit.blocks):
        if P and i == 0:
            x = torch.cat([x[:, :npre], visual[:, 0].to(x.dtype), x[:, npre:]], dim=1)  # type: ignore[index]
        elif P:
            x[:, npre : npre + P] = visual[:, i]  # type: ignore[index]
        kvp = kv[:, i] if T else None  # type: ignore[index]
        x = x + blk.drop_path1(blk.ls1(concat_attention(blk.attn, blk.norm1(x), kvp, mask)))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = vit.norm(x)
    if P and vit.global_pool != "token":
        x = torch.cat([x[:, :npre], x[:, npre + P :]], dim=1)
    return vit.forward_head(x, pre_logits=True)
