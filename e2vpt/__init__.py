"""E2VPT Serve: one frozen ViT, many tasks, each with its own pruned visual and key-value prompts."""

from e2vpt.core.backbone import Backbone, BackboneInfo, load_backbone
from e2vpt.core.model import PromptedViT, TaskBatch, TaskPrompts
from e2vpt.core.promptset import FORMAT_VERSION, PromptSet

__all__ = [
    "FORMAT_VERSION",
    "Backbone",
    "BackboneInfo",
    "PromptSet",
    "PromptedViT",
    "TaskBatch",
    "TaskPrompts",
    "load_backbone",
]
