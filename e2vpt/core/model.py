"""`PromptedViT`: a frozen timm ViT run with E2VPT prompts, for one task (training) or a batch in which
every image may belong to a different task (serving).

Per block i the sequence is ``[prefix (CLS, registers), visual prompts_i, patches]``; prompts get no
position embedding and replace the previous block's outputs at their positions. Inside each attention
the task's key-value prompts are appended to K and V after the head split (and after k-norm), so keys
have N + T entries while queries keep N. Mixed batches pad P, T and C per image; padded prompt positions
and padded KV slots are excluded with a key-padding mask, so every image's logits equal its logits alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.core.promptset import PromptSet, expand_segment_mask


def prompted_attention(attn: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None) -> Tensor:
    """timm `Attention` with key-value prompts. kv_prompt: [B, 2, H, T, Dh]; mask: [B, 1, 1, N + T], bool
    (True = attend) or additive float."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if kv_prompt is not None and kv_prompt.shape[3] > 0:
        k = torch.cat([k, kv_prompt[:, 0]], dim=2)
        v = torch.cat([v, kv_prompt[:, 1]], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _capturing_graph() -> bool:
    """True while an exporter or compiler traces the model (then in-place updates are avoided)."""
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def key_padding_mask(
    B: int,
    npre: int,
    n_patches: int,
    P: int,
    T: int,
    visual_valid: Tensor | None,
    kv_valid: Tensor | None,
    dtype: torch.dtype,
    always: bool = False,
) -> Tensor | None:
    """Additive attention mask [B, 1, 1, npre + P + n_patches + T] (0 = attend, -inf = padding), or None
    when nothing is padded (then the fused attention runs without a mask)."""
    if always:  # graph capture: no data-dependent branch, the mask is built whenever masks are given
        pad_p = P > 0 and visual_valid is not None
        pad_t = T > 0 and kv_valid is not None
    else:
        pad_p = P > 0 and visual_valid is not None and not bool(visual_valid.all())
        pad_t = T > 0 and kv_valid is not None and not bool(kv_valid.all())
    if not (pad_p or pad_t):
        return None
    device = (visual_valid if pad_p else kv_valid).device  # type: ignore[union-attr]
    valid = torch.ones(B, npre + P + n_patches + T, dtype=torch.bool, device=device)
    if pad_p:
        valid[:, npre : npre + P] = visual_valid
    if pad_t:
        valid[:, npre + P + n_patches :] = kv_valid
    mask = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, float("-inf"))
    return mask[:, None, None, :]


def prompted_block(blk: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None) -> Tensor:
    """timm pre-norm `Block` with key-value prompts in its attention."""
    x = x + blk.drop_path1(blk.ls1(prompted_attention(blk.attn, blk.norm1(x), kv_prompt, mask)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@dataclass
class TaskBatch:
    """The prompt sets of the U distinct tasks in one forward, padded to common P, T and C.

    visual [U, L, P, D], visual_valid [U, P], kv [U, L, 2, H, T, Dh], kv_valid [U, T],
    head_weight [U, C, D], head_bias [U, C], num_classes [U]. Padding is zero; masks are bool.
    """

    visual: Tensor
    visual_valid: Tensor
    kv: Tensor
    kv_valid: Tensor
    head_weight: Tensor
    head_bias: Tensor
    num_classes: Tensor

    @classmethod
    def from_prompt_sets(
        cls,
        sets: Sequence[PromptSet],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        if not sets:
            raise ValueError("a TaskBatch needs at least one prompt set")
        dtype = dtype or sets[0].visual.dtype
        U = len(sets)
        L, _, D = sets[0].visual.shape
        _, _, H, _, Dh = sets[0].kv.shape
        visuals = [s.masked_visual() if s.is_masked else s.visual for s in sets]
        P = max(v.shape[1] for v in visuals)
        T = max(s.num_kv for s in sets)
        C = max(s.num_classes for s in sets)
        kw = {"device": device, "dtype": dtype}
        visual = torch.zeros(U, L, P, D, **kw)
        kv = torch.zeros(U, L, 2, H, T, Dh, **kw)
        head_weight = torch.zeros(U, C, D, **kw)
        head_bias = torch.zeros(U, C, **kw)
        visual_valid = torch.zeros(U, P, dtype=torch.bool, device=device)
        kv_valid = torch.zeros(U, T, dtype=torch.bool, device=device)
        for u, (s, vis) in enumerate(zip(sets, visuals, strict=True)):
            p, t, c = vis.shape[1], s.num_kv, s.num_classes
            visual[u, :, :p] = vis.to(**kw)
            kv[u, :, :, :, :t] = s.kv_pair().to(**kw)
            head_weight[u, :c] = s.head_weight.to(**kw)
            head_bias[u, :c] = s.head_bias.to(**kw)
            visual_valid[u, :p] = True
            kv_valid[u, :t] = True
        num_classes = torch.tensor([s.num_classes for s in sets], device=device)
        return cls(visual, visual_valid, kv, kv_valid, head_weight, head_bias, num_classes)

    def gather(self, task_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-image prompt inputs (visual, kv, visual_valid, kv_valid) for `forward_features`."""
        return (
            self.visual[task_index],
            self.kv[task_index],
            self.visual_valid[task_index],
            self.kv_valid[task_index],
        )

    def logits(self, feats: Tensor, task_index: Tensor) -> Tensor:
        """Per-image heads on pooled features [B, D]: padded logits [B, C_max]."""
        weight = self.head_weight[task_index].to(feats.dtype)
        return torch.einsum("bd,bcd->bc", feats, weight) + self.head_bias[task_index].to(feats.dtype)


class TaskPrompts(nn.Module):
    """One task's learnable E2VPT parameters (training). The backbone is not part of it.

    Masks are buffers shared by all blocks: `token_mask` [P] and `segment_mask` [P, R] (1 = kept).
    A pruned token is absent from the sequence, exactly as in a compacted set at serving time.
    """

    def __init__(
        self,
        visual: Tensor,
        kv: Tensor,
        head_weight: Tensor,
        head_bias: Tensor,
        *,
        prompt_dropout: float = 0.1,
        token_mask: Tensor | None = None,
        segment_mask: Tensor | None = None,
        segment_layout: str = "contiguous",
        num_segments: int = 16,
    ) -> None:
        super().__init__()
        self.visual = nn.Parameter(visual.detach().clone().float())
        self.kv = nn.Parameter(kv.detach().clone().float())
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
            self.head.bias.copy_(head_bias)
        self.dropout = nn.Dropout(prompt_dropout)
        P = visual.shape[1]
        R = segment_mask.shape[1] if segment_mask is not None else num_segments
        self.segment_layout = segment_layout
        self.register_buffer(
            "token_mask", (token_mask if token_mask is not None else torch.ones(P)).float().clone()
        )
        self.register_buffer(
            "segment_mask", (segment_mask if segment_mask is not None else torch.ones(P, R)).float().clone()
        )

    @classmethod
    def from_prompt_set(cls, ps: PromptSet, prompt_dropout: float = 0.1) -> TaskPrompts:
        return cls(
            ps.visual,
            ps.kv,
            ps.head_weight,
            ps.head_bias,
            prompt_dropout=prompt_dropout,
            token_mask=ps.token_mask,
            segment_mask=ps.segment_mask,
            segment_layout=ps.segment_layout,
            num_segments=int(ps.config.get("num_segments", 16)),
        )

    def to_prompt_set(self, template: PromptSet, *, pruned: bool | None = None) -> PromptSet:
        """The trained values in the metadata of `template`. Masks are recorded when any entry is pruned."""
        from dataclasses import replace

        tok = self.token_mask.detach().cpu().bool()
        seg = self.segment_mask.detach().cpu().bool()
        pruned = bool((~tok).any() or (~seg).any()) if pruned is None else pruned
        return replace(
            template,
            visual=self.visual.detach().cpu().clone(),
            kv=self.kv.detach().cpu().clone(),
            head_weight=self.head.weight.detach().cpu().clone(),
            head_bias=self.head.bias.detach().cpu().clone(),
            token_mask=tok.to(torch.uint8) if pruned else None,
            segment_mask=seg.to(torch.uint8) if pruned else None,
        )

    def effective_visual(
        self, token_gate: Tensor | None = None, segment_gate: Tensor | None = None
    ) -> Tensor:
        """[L, P_kept, D]: pruned tokens removed, pruned segments zeroed, dropout in training.

        `token_gate` [P] / `segment_gate` [P, R] multiply the prompts (held at 1 to measure importance
        as d loss / d gate)."""
        keep = self.token_mask > 0
        token = self.token_mask if token_gate is None else self.token_mask * token_gate
        segment = self.segment_mask if segment_gate is None else self.segment_mask * segment_gate
        scale = token[:, None] * expand_segment_mask(segment, self.visual.shape[2], self.segment_layout)
        return self.dropout(self.visual[:, keep] * scale[keep])

    def kv_pair(self) -> Tensor:
        return self.kv.expand(-1, 2, -1, -1, -1) if self.kv.shape[1] == 1 else self.kv


class PromptedViT(nn.Module):
    """The frozen backbone run with per-image prompts. Never edits timm's modules."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.vit = backbone.model
        self.info: BackboneInfo = backbone.info

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.vit.eval()  # the backbone stays in eval mode (no dropout / drop-path) even while prompts train
        return self

    def forward_features(
        self,
        images: Tensor,
        visual: Tensor | None = None,
        kv: Tensor | None = None,
        visual_valid: Tensor | None = None,
        kv_valid: Tensor | None = None,
    ) -> Tensor:
        """Pooled features [B, D'] of images [B, C, H, W] with per-image prompts.

        visual [B, L, P, D], kv [B, L, 2, H, T, Dh], visual_valid [B, P] / kv_valid [B, T] (bool, True = real;
        None = all real). P = T = 0 (or None) runs the plain backbone.
        """
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        B = x.shape[0]
        npre = vit.num_prefix_tokens
        P = visual.shape[2] if visual is not None else 0
        T = kv.shape[4] if kv is not None else 0
        tracing = _capturing_graph()
        mask = key_padding_mask(B, npre, x.shape[1] - npre, P, T, visual_valid, kv_valid, x.dtype, tracing)
        for i, blk in enumerate(vit.blocks):
            if P and i == 0:
                x = torch.cat([x[:, :npre], visual[:, 0].to(x.dtype), x[:, npre:]], dim=1)
            elif P and not tracing:
                # replace the previous block's outputs at the prompt positions (in place: the block's
                # output is a fresh tensor no backward saved; autograd records the copy)
                x[:, npre : npre + P] = visual[:, i]
            elif P:  # graph capture (ONNX / torch.export / TorchScript): the same thing, out of place
                x = torch.cat([x[:, :npre], visual[:, i].to(x.dtype), x[:, npre + P :]], dim=1)
            # KV prompts in the model's dtype, as the visual ones: a batch built in another dtype still runs
            x = prompted_block(blk, x, kv[:, i].to(x.dtype) if T else None, mask)
        x = vit.norm(x)
        if P and vit.global_pool != "token":
            x = torch.cat([x[:, :npre], x[:, npre + P :]], dim=1)  # pooling never sees prompt positions
        return vit.forward_head(x, pre_logits=True)

    def forward_backbone(self, images: Tensor) -> Tensor:
        """The backbone's own logits (P = T = 0, its own head): equals `timm_model(images)`."""
        return self.vit.head(self.forward_features(images))

    def forward_task(
        self,
        images: Tensor,
        prompts: TaskPrompts,
        token_gate: Tensor | None = None,
        segment_gate: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, C] of one task (training and evaluation of a single task)."""
        B = images.shape[0]
        visual = prompts.effective_visual(token_gate, segment_gate)
        kv = prompts.kv_pair()
        feats = self.forward_features(
            images,
            visual[None].expand(B, -1, -1, -1),
            kv[None].expand(B, -1, -1, -1, -1, -1),
        )
        return prompts.head(feats)

    def forward_multi(self, images: Tensor, tasks: TaskBatch, task_index: Tensor) -> Tensor:
        """Padded logits [B, C_max] for images of mixed tasks; image b uses task `task_index[b]` of `tasks`.

        Entries past an image's own class count are padding: slice with `split_logits`.
        """
        return tasks.logits(self.forward_features(images, *tasks.gather(task_index)), task_index)


def split_logits(logits: Tensor, num_classes: Sequence[int] | Tensor) -> list[Tensor]:
    """Per-image logits without padding."""
    return [logits[b, : int(c)] for b, c in enumerate(num_classes)]
