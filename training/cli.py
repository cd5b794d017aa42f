"""`e2vpt train`: a dataset + a backbone -> a (pruned) E2VPT prompt set, report and plots.

    python -m e2vpt.cli train --backbone vit_base_patch16_224.augreg_in21k --pretrained \\
        --list-dir /data/vtab-1k/cifar100 --method e2vpt --prompts 10 --kv 5 --epochs 100 \\
        --prune-tokens 0.5 --prune-segments 0.25 --rewind rewind --out runs/cifar100

Also `e2vpt upstream` (pretrain the offline upstream ViT once) and `e2vpt demo-task` (the ~1 minute
mini-VTAB task of the demo).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.core.method import DEFAULT_RECIPE, SEGMENT_LAYOUTS
from e2vpt.errors import E2VPTError
from e2vpt.registry.client import read_token
from training.data import DataSplits, image_folder_splits, vtab_splits, with_transforms
from training.pruning import IMPORTANCE_MODES, REWIND_MODES, PruneConfig
from training.synthetic.minivtab import ALL_TASKS
from training.trainer import METHODS, OFFICIAL_LRS, OFFICIAL_WDS, SELECTIONS, TrainConfig

log = logging.getLogger(__name__)


def _ratio(text: str) -> float | str:
    """A pruning ratio in [0, 1), or 'auto' (search the grid on val)."""
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a pruning ratio must be in [0, 1) or 'auto', got {text}")
    return value


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    tc, pc = TrainConfig(), PruneConfig()  # the defaults, defined once there
    p = subparsers.add_parser("train", help="train a task's E2VPT prompts (or a baseline) on a dataset")
    bb = p.add_argument_group("backbone")
    bb.add_argument("--backbone", help="timm model name, e.g. vit_base_patch16_224.augreg_in21k")
    bb.add_argument(
        "--checkpoint", help="local weights (.safetensors/.pth/.npz); a project checkpoint needs no name"
    )
    bb.add_argument(
        "--pretrained", action="store_true", help="download timm's pretrained weights for --backbone"
    )
    bb.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model (e.g. img_size)")
    bb.add_argument("--device", default=None, help="torch device (default: Settings.device)")
    data = p.add_argument_group("data (one of)")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder: DIR/<class>/* or DIR/{train,val,test}/<class>/*")
    src.add_argument("--list-dir", help="VTAB-1k task folder with train800/val200/train800val200/test.txt")
    src.add_argument("--mini-vtab", choices=ALL_TASKS, help="a mini-VTAB task (generated or real images)")
    data.add_argument(
        "--final", action="store_true", help="VTAB: train on train800val200 (paper's final run)"
    )
    data.add_argument("--recipe", choices=("vtab", "fgvc"), default=DEFAULT_RECIPE, help="transform recipe")
    data.add_argument(
        "--val-fraction", type=float, default=0.2, help="image folder without val/: held-out share"
    )
    data.add_argument("--data-seed", type=int, default=0, help="mini-VTAB generation / folder split seed")
    data.add_argument("--test-size", type=int, default=1000, help="mini-VTAB test images")
    data.add_argument("--no-verify", action="store_true", help="skip decoding every image up front")
    t = p.add_argument_group("training")
    t.add_argument("--task-id", help="task id (default: from the dataset name)")
    t.add_argument("--method", choices=METHODS, default=tc.method)
    t.add_argument("--prompts", type=int, default=tc.num_prompts, help="visual prompt tokens per block (P)")
    t.add_argument("--kv", type=int, default=tc.num_kv, help="key-value prompt tokens per block (T)")
    t.add_argument("--separate-kv", action="store_true", help="separate K and V prompts (default: tied)")
    t.add_argument("--segments", type=int, default=tc.num_segments, help="segments per visual token (R)")
    t.add_argument("--segment-layout", choices=SEGMENT_LAYOUTS, default=tc.segment_layout)
    t.add_argument("--epochs", type=int, default=tc.epochs)
    t.add_argument("--warmup", type=int, default=tc.warmup_epochs, help="warm-up epochs")
    t.add_argument("--batch-size", type=int, default=tc.batch_size)
    t.add_argument("--lr", type=float, default=tc.base_lr, help="base lr (peak lr = base * batch / 256)")
    t.add_argument("--wd", type=float, default=tc.weight_decay, help="weight decay (prompts and head weight)")
    t.add_argument("--dropout", type=float, default=tc.prompt_dropout, help="prompt dropout")
    t.add_argument("--seed", type=int, default=tc.seed)
    t.add_argument("--select", choices=SELECTIONS, default=tc.select, help="checkpoint selection on val")
    t.add_argument("--grid", action="store_true", help="search the official lr x wd grid on train/val first")
    t.add_argument("--grid-lrs", type=_floats, help="comma-separated base lrs for --grid")
    t.add_argument("--grid-wds", type=_floats, help="comma-separated weight decays for --grid")
    t.add_argument("--workers", type=int, default=tc.num_workers, help="DataLoader workers")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr = p.add_argument_group("pruning (e2vpt / vpt-deep)")
    pr.add_argument("--prune-tokens", type=_ratio, help="fraction of tokens to prune, or 'auto'")
    pr.add_argument("--prune-segments", type=_ratio, help="fraction of each kept token's segments, or 'auto'")
    pr.add_argument(
        "--importance",
        choices=IMPORTANCE_MODES,
        default=pc.importance,
        help="abs (paper) or signed (official)",
    )
    pr.add_argument("--rewind", choices=REWIND_MODES, default=pc.rewind)
    pr.add_argument("--rewind-epochs", type=int, help="retraining epochs (default: --epochs)")
    pr.add_argument(
        "--tolerance", type=float, default=pc.tolerance, help="'auto': val points a pruning level may lose"
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (default: Settings.train_out_dir/<task id>)")
    _registry_args(o)
    p.set_defaults(func=cmd_train)

    u = subparsers.add_parser(
        "upstream", help="pretrain the offline upstream ViT once (fidelity study, demo)"
    )
    u.add_argument("--out", help="checkpoint path (default: Settings.upstream_checkpoint)")
    u.add_argument("--epochs", type=int, default=6)
    u.add_argument("--images-per-epoch", type=int, default=12_000)
    u.set_defaults(func=cmd_upstream)

    d = subparsers.add_parser(
        "demo-task", help="train a mini-VTAB task on the upstream ViT in about a minute"
    )
    d.add_argument("--task", choices=ALL_TASKS, default="digits")
    d.add_argument("--task-id")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--no-prune", action="store_true")
    _registry_args(d)
    d.set_defaults(func=cmd_demo)


def _registry_args(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--register",
        nargs="?",
        const=True,
        metavar="URL",
        help="PUT the prompt set to the registry API at URL (default URL: Settings.registry_url)",
    )
    group.add_argument("--token", help="registry bearer token (default: Settings.registry_token[_file])")


def _registry_target(args: argparse.Namespace, settings: Settings) -> dict[str, str | None]:
    """run_task's register_url / register_token: none without --register."""
    if not args.register:
        return {"register_url": None, "register_token": None}
    url = settings.registry_url if args.register is True else args.register
    return {"register_url": url, "register_token": args.token or read_token(settings)}


def load_cli_backbone(args: argparse.Namespace) -> Backbone:
    settings = get_settings()
    kwargs = json.loads(args.model_kwargs or "{}")
    if not args.backbone and not args.checkpoint:
        raise SystemExit("train: give --backbone NAME and/or --checkpoint FILE")
    return load_backbone(
        args.backbone,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        device=args.device or settings.device,
        pretrained_dir=settings.pretrained_dir,
        **kwargs,
    )


def load_cli_data(args: argparse.Namespace, backbone: Backbone) -> DataSplits:
    verify = not args.no_verify
    if args.data:
        splits = image_folder_splits(
            args.data, val_fraction=args.val_fraction, seed=args.data_seed, verify=verify
        )
    elif args.list_dir:
        splits = vtab_splits(args.list_dir, final=args.final, verify=verify)
    else:
        from training.synthetic.minivtab import mini_vtab

        splits = mini_vtab(args.mini_vtab, seed=args.data_seed, n_test=args.test_size)
    return with_transforms(splits, backbone.info, args.recipe)


def _task_id(name: str) -> str:
    tid = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "task"
    return tid[:128]


def cmd_train(args: argparse.Namespace) -> int:
    from training.pipeline import run_task

    settings = get_settings()
    try:
        backbone = load_cli_backbone(args)
        splits = load_cli_data(args, backbone)
        config = TrainConfig(
            method=args.method,
            num_prompts=args.prompts,
            num_kv=args.kv,
            share_kv=not args.separate_kv,
            num_segments=args.segments,
            segment_layout=args.segment_layout,
            epochs=args.epochs,
            warmup_epochs=args.warmup,
            batch_size=args.batch_size,
            base_lr=args.lr,
            weight_decay=args.wd,
            prompt_dropout=args.dropout,
            seed=args.seed,
            select=args.select,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
        prune = None
        if args.prune_tokens is not None or args.prune_segments is not None:
            prune = PruneConfig(
                token_ratio=None if args.prune_tokens == "auto" else float(args.prune_tokens or 0.0),
                segment_ratio=None if args.prune_segments == "auto" else float(args.prune_segments or 0.0),
                importance=args.importance,
                rewind=args.rewind,
                rewind_epochs=args.rewind_epochs,
                tolerance=args.tolerance,
            )
        grid = None
        if args.grid or args.grid_lrs or args.grid_wds:
            grid = (list(args.grid_lrs or OFFICIAL_LRS), list(args.grid_wds or OFFICIAL_WDS))
        task_id = args.task_id or _task_id(splits.name)
        out = Path(args.out or Path(settings.train_out_dir) / task_id)
        run = run_task(
            backbone,
            splits,
            task_id,
            config,
            out,
            prune=prune,
            grid=grid,
            resume=args.resume,
            limits=settings.prompt_limits,
            **_registry_target(args, settings),
        )
    except E2VPTError as exc:
        log.error("%s: %s", type(exc).__name__, exc.message)
        return 1
    except FileNotFoundError as exc:  # a --checkpoint (or list-file image) path that does not exist
        log.error("%s", exc)
        return 1
    res = run.report["result"]
    print(json.dumps({"task_id": task_id, "out": str(out), **res, "files": run.report["files"]}, indent=2))
    return 0


def cmd_upstream(args: argparse.Namespace) -> int:
    from training.synthetic.upstream import ensure_upstream

    path = ensure_upstream(args.out, epochs=args.epochs, images_per_epoch=args.images_per_epoch)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.pipeline import quick_demo_task

    settings = get_settings()
    try:
        run = quick_demo_task(
            args.task,
            args.out,
            task_id=args.task_id,
            prune=not args.no_prune,
            **_registry_target(args, settings),
        )
    except E2VPTError as exc:
        log.error("%s: %s", type(exc).__name__, exc.message)
        return 1
    print(json.dumps(run.report["result"] | {"files": run.report["files"]}, indent=2))
    return 0
