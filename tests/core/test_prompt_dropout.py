"""Prompt dropout is drawn per image (as the official code, which drops out prompts already expanded to
the batch), not one mask for the whole batch; evaluation uses no dropout."""

from __future__ import annotations

import torch

from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskPrompts
from e2vpt.core.promptset import PromptSet


def prompts_for(bb: Backbone, p: float) -> TaskPrompts:
    g = torch.Generator().manual_seed(0)
    ps = PromptSet.create("drop", bb.info, ["a", "b", "c"], num_prompts=4, num_kv=2, generator=g)
    return TaskPrompts.from_prompt_set(ps, prompt_dropout=p)


def test_dropout_mask_is_drawn_per_image(backbone: Backbone) -> None:
    prompts = prompts_for(backbone, 0.5).train()
    torch.manual_seed(0)
    visual = prompts.effective_visual(batch=6)
    L, P, D = prompts.visual.shape
    assert visual.shape == (6, L, P, D)
    kept = visual != 0
    assert not all(torch.equal(kept[0], kept[b]) for b in range(1, 6))  # each image its own mask
    # where kept, the prompt is scaled by 1 / (1 - p), as nn.Dropout does
    full = prompts.visual.detach()[None].expand(6, -1, -1, -1)
    assert torch.allclose(visual[kept], 2 * full[kept])
    assert 0.35 < kept.float().mean() < 0.65


def test_no_dropout_in_eval_and_identical_images_agree(backbone: Backbone) -> None:
    prompts = prompts_for(backbone, 0.5)
    model = PromptedViT(backbone)
    image = torch.randn(
        1, backbone.info.in_chans, *backbone.info.img_size, generator=torch.Generator().manual_seed(1)
    )
    images = image.expand(4, -1, -1, -1)
    prompts.eval()
    with torch.no_grad():
        assert torch.equal(prompts.effective_visual(batch=3), prompts.visual[None].expand(3, -1, -1, -1))
        logits = model.eval().forward_task(images, prompts)
    assert torch.allclose(logits, logits[:1].expand_as(logits), atol=1e-5)
    prompts.train()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model.train().forward_task(images, prompts)
    # the same image four times in one training batch: four dropout masks, four different outputs
    assert not torch.allclose(logits[0], logits[1], atol=1e-5) or not torch.allclose(
        logits[0], logits[2], atol=1e-5
    )


def test_gradients_flow_through_per_image_dropout(backbone: Backbone) -> None:
    prompts = prompts_for(backbone, 0.1).train()
    model = PromptedViT(backbone).train()
    images = torch.randn(3, backbone.info.in_chans, *backbone.info.img_size)
    model.forward_task(images, prompts).sum().backward()
    assert prompts.visual.grad is not None and prompts.visual.grad.abs().sum() > 0
