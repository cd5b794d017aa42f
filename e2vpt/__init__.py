"""E2VPT Serve: one frozen ViT, many tasks, each with its own pruned visual and key-value prompts."""

from e2vpt.backbone import Backbone, BackboneInfo, load_backbone
from e2vpt.model import PromptedViT, TaskBatch, TaskPrompts
from e2vpt.promptset import FORMAT_VERSION, PromptSet

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
