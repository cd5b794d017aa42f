"""`PromptedViT`: a frozen timm ViT run with E2VPT prompts, for one task (training) or a batch in which
every image may belong to a different task (serving).

Per block i the sequence is ``[prefix (CLS, registers), visual prompts_i, patches, KV slots]``; prompts
get no position embedding and replace the previous block's outputs at their positions. The task's T
key-value prompts act as if appended to K and V after the head split (and after k-norm): the sequence is
extended once with T slot rows, and in every attention the slots' keys and values are overwritten with
the prompts after the projection (no per-layer concatenation of K and V; the slots' queries and outputs
are never read). Mixed batches pad P, T and C per image; padded prompt positions and padded KV slots are
excluded with a key-padding mask, so every image's logits equal its logits alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.core.promptset import PromptSet, expand_segment_mask


def prompted_attention(
    attn: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None, *, inplace: bool = True
) -> Tensor:
    """timm `Attention` over x [B, N, D] whose last T rows are KV slots. kv_prompt: [B, 2, H, T, Dh];
    mask: [B, 1, 1, N], bool (True = attend) or additive float.

    The qkv projection runs over all N rows; then the slots' keys and values are replaced by the
    prompts (keys after k-norm, as if the prompts were appended to K and V). The slots' own queries and
    outputs are computed but never read by the other rows. `inplace` writes the prompts into the
    projection's output (eager, also under autograd); False (graph capture) builds K and V out of place.
    """
    B, N, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    T = kv_prompt.shape[3] if kv_prompt is not None else 0
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh], a view
    plain_k = isinstance(attn.k_norm, nn.Identity)
    if T and inplace:
        # into the projection's fresh output (no backward saved it), before unbind and the norms read it
        if plain_k:
            qkv[1:, :, :, N - T :] = kv_prompt.transpose(0, 1)  # K and V slots in one copy
        else:
            qkv[2, :, :, N - T :] = kv_prompt[:, 1]
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if T and inplace and not plain_k:
        k[:, :, N - T :] = kv_prompt[:, 0]  # k-norm's output is a fresh tensor
    elif T and not inplace:  # graph capture: the same values, out of place
        k = torch.cat([k[:, :, : N - T], kv_prompt[:, 0].to(k.dtype)], dim=2)
        v = torch.cat([v[:, :, : N - T], kv_prompt[:, 1].to(v.dtype)], dim=2)
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
) -> Tensor | None:
    """Additive attention mask [B, 1, 1, npre + P + n_patches + T] (0 = attend, -inf = padding), or None
    when no valid mask is given (None means "nothing padded": the fused attention then runs unmasked).

    The values of the masks are never read on the host (no device sync): a caller who knows that
    nothing is padded passes None."""
    pad_p = P > 0 and visual_valid is not None
    pad_t = T > 0 and kv_valid is not None
    if not (pad_p or pad_t):
        return None
    device = (visual_valid if pad_p else kv_valid).device  # type: ignore[union-attr]

    def ones(n: int) -> Tensor:
        return torch.ones(B, n, dtype=torch.bool, device=device)

    valid = torch.cat(
        [
            ones(npre),
            visual_valid.bool() if pad_p else ones(P),  # type: ignore[union-attr]
            ones(n_patches),
            kv_valid.bool() if pad_t else ones(T),  # type: ignore[union-attr]
        ],
        dim=1,
    )
    mask = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, float("-inf"))
    return mask[:, None, None, :]


def prompted_block(
    blk: nn.Module, x: Tensor, kv_prompt: Tensor | None, mask: Tensor | None, *, inplace: bool = True
) -> Tensor:
    """timm pre-norm `Block` with key-value prompts written into the KV slots (the last T rows of x)."""
    attn_out = prompted_attention(blk.attn, blk.norm1(x), kv_prompt, mask, inplace=inplace)
    x = x + blk.drop_path1(blk.ls1(attn_out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class PromptInputs(NamedTuple):
    """Per-image prompt inputs of `PromptedViT.forward_features`: visual [B, L, P, D], kv [B, L, 2, H, T, Dh],
    visual_valid [B, P] / kv_valid [B, T] (bool, True = real). A mask is None when nothing is padded (the
    caller knows that on the host, so the forward needs no device-to-host synchronisation)."""

    visual: Tensor
    kv: Tensor
    visual_valid: Tensor | None
    kv_valid: Tensor | None

    def to(self, dtype: torch.dtype) -> PromptInputs:
        """Visual and KV prompts in `dtype` (the backbone's); masks unchanged. No copy when already so."""
        return self._replace(visual=self.visual.to(dtype), kv=self.kv.to(dtype))


def head_logits(
    feats: Tensor, weight: Tensor, bias: Tensor, first: Tensor, count: Tensor, width: int, fill: float = 0.0
) -> Tensor:
    """Per-image linear heads packed row-wise: image b's head is rows ``first[b] : first[b] + count[b]`` of
    weight [R, D] / bias [R]. Returns logits [B, width], entries past an image's own count set to `fill`.

    One matmul of the features against all R rows ([B, R]), then each image gathers its own columns: no
    per-image copy of a head ([B, C_max, D]) is ever made, so a 100,000-class task costs B x R logits,
    not B x 100,000 x D weights. feats are cast to the heads' dtype."""
    scores = torch.addmm(bias, feats.to(weight.dtype), weight.t())  # [B, R]
    cols = torch.arange(width, device=feats.device)
    pad = cols[None, :] >= count[:, None]  # [B, width]
    index = (first[:, None] + cols[None, :]).masked_fill_(pad, 0)
    return scores.gather(1, index).masked_fill_(pad, fill)


@dataclass
class TaskBatch:
    """The prompt sets of the U distinct tasks in one forward, built on every call (training, ONNX export
    and tests; serving assembles batches from the device-resident `e2vpt.serving.table.PromptTable`).

    visual [U, L, P, D], visual_valid [U, P], kv [U, L, 2, H, T, Dh], kv_valid [U, T] padded to common P
    and T (zeros; masks bool). Heads packed row-wise (see `head_logits`): head_weight [R, D], head_bias
    [R], task u owns rows head_first[u] : head_first[u] + num_classes[u]. Host-side: `width` (the largest
    class count: the logits' width) and `padded` (whether P or T differ between the tasks; else `gather`
    returns no masks).
    """

    visual: Tensor
    visual_valid: Tensor
    kv: Tensor
    kv_valid: Tensor
    head_weight: Tensor
    head_bias: Tensor
    head_first: Tensor
    num_classes: Tensor
    width: int
    padded: bool

    @classmethod
    def from_prompt_sets(
        cls,
        sets: Sequence[PromptSet],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TaskBatch:
        """Padded copies of `sets` in `dtype` (pass the backbone's; `PromptedViT.forward_multi` casts to
        the backbone's dtype in any case). A set's own dtype never decides."""
        if not sets:
            raise ValueError("a TaskBatch needs at least one prompt set")
        U = len(sets)
        L, _, D = sets[0].visual.shape
        _, _, H, _, Dh = sets[0].kv.shape
        visuals = [s.masked_visual() if s.is_masked else s.visual for s in sets]
        sizes_p = [v.shape[1] for v in visuals]
        sizes_t = [s.num_kv for s in sets]
        counts = [s.num_classes for s in sets]
        P, T = max(sizes_p), max(sizes_t)
        kw = {"device": device, "dtype": dtype}
        visual = torch.zeros(U, L, P, D, **kw)
        kv = torch.zeros(U, L, 2, H, T, Dh, **kw)
        visual_valid = torch.zeros(U, P, dtype=torch.bool, device=device)
        kv_valid = torch.zeros(U, T, dtype=torch.bool, device=device)
        for u, (s, vis) in enumerate(zip(sets, visuals, strict=True)):
            p, t = vis.shape[1], s.num_kv
            visual[u, :, :p] = vis.to(**kw)
            kv[u, :, :, :, :t] = s.kv_pair().to(**kw)
            visual_valid[u, :p] = True
            kv_valid[u, :t] = True
        head_weight = torch.cat([s.head_weight.to(**kw) for s in sets])
        head_bias = torch.cat([s.head_bias.to(**kw) for s in sets])
        first = [sum(counts[:u]) for u in range(U)]
        return cls(
            visual,
            visual_valid,
            kv,
            kv_valid,
            head_weight,
            head_bias,
            torch.tensor(first, device=device),
            torch.tensor(counts, device=device),
            width=max(counts),
            padded=len(set(sizes_p)) > 1 or len(set(sizes_t)) > 1,
        )

    def gather(self, task_index: Tensor) -> PromptInputs:
        """Per-image prompt inputs for `forward_features` (masks None when no task is padded)."""
        return PromptInputs(
            self.visual[task_index],
            self.kv[task_index],
            self.visual_valid[task_index] if self.padded else None,
            self.kv_valid[task_index] if self.padded else None,
        )

    def logits(self, feats: Tensor, task_index: Tensor, fill: float = 0.0) -> Tensor:
        """Per-image heads on pooled features [B, D]: logits [B, C_max], padding = `fill`."""
        return head_logits(
            feats,
            self.head_weight,
            self.head_bias,
            self.head_first[task_index],
            self.num_classes[task_index],
            self.width,
            fill,
        )


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
            num_segments=ps.config.num_segments,
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
        self,
        token_gate: Tensor | None = None,
        segment_gate: Tensor | None = None,
        *,
        batch: int | None = None,
    ) -> Tensor:
        """[L, P_kept, D]: pruned tokens removed, pruned segments zeroed, dropout in training.
        With `batch`: [batch, L, P_kept, D], the dropout mask drawn per image (as the official code, which
        drops out prompts already expanded to the batch), not one mask shared by the whole batch.

        `token_gate` [P] / `segment_gate` [P, R] multiply the prompts (held at 1 to measure importance
        as d loss / d gate)."""
        keep = self.token_mask > 0
        token = self.token_mask if token_gate is None else self.token_mask * token_gate
        segment = self.segment_mask if segment_gate is None else self.segment_mask * segment_gate
        scale = token[:, None] * expand_segment_mask(segment, self.visual.shape[2], self.segment_layout)
        visual = self.visual[:, keep] * scale[keep]
        return self.dropout(visual if batch is None else visual[None].expand(batch, -1, -1, -1))

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

        visual [B, L, P, D], kv [B, L, 2, H, T, Dh], visual_valid [B, P] / kv_valid [B, T] (bool, True = real).
        A valid mask of None means "nothing padded" (no attention mask is built); a given mask is used
        as is, its values never read on the host, so the forward has no device-to-host sync. P = T = 0 (or
        None) runs the plain backbone.

        The sequence is ``[prefix, visual prompts, patches, T KV slots]``, extended once; each block
        replaces the prompt rows and writes its KV prompts into the slots' keys and values.
        """
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        B, n_tokens, D = x.shape
        npre = vit.num_prefix_tokens
        P = visual.shape[2] if visual is not None else 0
        T = kv.shape[4] if kv is not None else 0
        inplace = not _capturing_graph()
        mask = key_padding_mask(B, npre, n_tokens - npre, P, T, visual_valid, kv_valid, x.dtype)
        if P or T:
            parts = [x[:, :npre]]
            if P:
                parts.append(visual[:, 0].to(x.dtype))  # type: ignore[index]
            parts.append(x[:, npre:])
            if T:
                parts.append(x.new_zeros(B, T, D))  # the KV slots: their rows' values are never read
            x = torch.cat(parts, dim=1)
        for i, blk in enumerate(vit.blocks):
            if P and i > 0:
                if inplace:
                    # replace the previous block's outputs at the prompt positions (in place: the block's
                    # output is a fresh tensor no backward saved; autograd records the copy)
                    x[:, npre : npre + P] = visual[:, i]  # type: ignore[index]
                else:  # graph capture (ONNX / torch.export / compile): the same thing, out of place
                    x = torch.cat([x[:, :npre], visual[:, i].to(x.dtype), x[:, npre + P :]], dim=1)  # type: ignore[index]
            # KV prompts in the model's dtype, as the visual ones: a batch built in another dtype still runs
            x = prompted_block(blk, x, kv[:, i].to(x.dtype) if T else None, mask, inplace=inplace)  # type: ignore[index]
        if T:
            x = x[:, : x.shape[1] - T]  # drop the KV slots
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
        kv = prompts.kv_pair()
        # No prompts on a frozen backbone (a linear probe): nothing before the head needs a gradient, so
        # the backbone runs without autograd (the empty prompt parameters would otherwise make every
        # activation part of the graph and the backward pass cost as much as prompt tuning's).
        frozen = prompts.visual.numel() == 0 and kv.numel() == 0 and not self._backbone_trainable()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.forward_features(
                images,
                prompts.effective_visual(token_gate, segment_gate, batch=B),  # dropout drawn per image
                kv[None].expand(B, -1, -1, -1, -1, -1),
            )
        return prompts.head(feats)

    def _backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vit.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vit.parameters()).dtype

    def forward_multi(self, images: Tensor, tasks: TaskBatch, task_index: Tensor) -> Tensor:
        """Padded logits [B, C_max] for images of mixed tasks; image b uses task `task_index[b]` of `tasks`.

        Entries past an image's own class count are padding (0): slice with `split_logits`. Prompts are
        cast to the backbone's dtype, whatever the batch was built in.
        """
        feats = self.forward_features(images, *tasks.gather(task_index).to(self.dtype))
        return tasks.logits(feats, task_index)


def split_logits(logits: Tensor, num_classes: Sequence[int] | Tensor) -> list[Tensor]:
    """Per-image logits without padding."""
    return [logits[b, : int(c)] for b, c in enumerate(num_classes)]
