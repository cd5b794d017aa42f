"""Shared by the serving tests: the offline reference prediction."""

from __future__ import annotations

import torch

from e2vpt.core.backbone import Backbone
from e2vpt.core.images import decode_image, eval_transform
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet


@torch.inference_mode()
def offline_predict(
    backbone: Backbone, ps: PromptSet, data: bytes, top_k: int = 5
) -> list[tuple[str, float]]:
    """The offline model: one image, one task, alone in its batch (no cache, no server)."""
    x = eval_transform(backbone.info, ps.recipe)(decode_image(data))[None]
    batch = TaskBatch.from_prompt_sets([ps.validate(backbone.info)])
    logits = PromptedViT(backbone).forward_multi(x, batch, torch.zeros(1, dtype=torch.long))[
        0, : ps.num_classes
    ]
    scores, idx = torch.softmax(logits, 0).topk(min(top_k, ps.num_classes))
    return [(ps.labels[j], float(s)) for s, j in zip(scores.tolist(), idx.tolist(), strict=True)]
