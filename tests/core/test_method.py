"""MethodConfig: the typed `config` of a prompt set, same JSON keys, unknown keys kept."""

from __future__ import annotations

import json

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from e2vpt.cli import build_parser
from e2vpt.core.backbone import load_backbone
from e2vpt.core.method import DEFAULTS, MethodConfig
from e2vpt.core.promptset import META_KEY, PromptSet, _read_metadata
from training.cli import DEFAULT_PRESET, train_config
from training.pruning import PruneConfig
from training.trainer import TrainConfig, preset_config


def test_unknown_keys_load_and_round_trip() -> None:
    backbone = load_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0, global_pool="avg"
    )
    data = PromptSet.create("t", backbone.info, ["a", "b"], num_prompts=2, num_kv=1).to_bytes()
    tensors = st_load(data)
    meta = _read_metadata(data)
    meta["config"] = {"num_prompts": 2, "num_kv": 1, "from_the_future": [1, 2], "recipe": "fgvc"}
    old = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
    ps = PromptSet.from_bytes(old)
    assert ps.config.extra == {"from_the_future": [1, 2]} and ps.recipe == "fgvc"
    assert ps.config.num_segments == DEFAULTS.num_segments  # absent: the one default
    again = _read_metadata(ps.to_bytes())["config"]
    assert again["from_the_future"] == [1, 2] and again["num_prompts"] == 2


def test_json_keys_are_the_fields_and_pruning_keys_appear_only_once_written() -> None:
    fresh = MethodConfig().to_dict()
    assert set(fresh) == {"num_prompts", "num_kv", "share_kv", "num_segments", "segment_layout"}
    pruned = MethodConfig().updated(token_ratio=0.5, kept_token_indices=[0, 2])
    assert pruned.token_ratio == 0.5 and pruned["kept_token_indices"] == [0, 2] and not pruned.extra


def test_defaults_are_defined_once() -> None:
    tc, pc = TrainConfig(), PruneConfig()
    for name in ("num_prompts", "num_kv", "share_kv", "num_segments", "segment_layout"):
        assert getattr(tc, name) == getattr(DEFAULTS, name)
    args = build_parser().parse_args(["train", "--backbone", "x", "--data", "d"])
    # the CLI leaves every training option to the preset (one home: training.trainer.PRESETS)
    assert train_config(args) == preset_config(DEFAULT_PRESET, method=args.method, progress=True)
    for name in ("num_prompts", "num_kv", "num_segments", "segment_layout"):
        assert getattr(train_config(args), name) == getattr(DEFAULTS, name)
    assert (args.importance, args.rewind, args.tolerance) == (pc.importance, pc.rewind, pc.tolerance)
