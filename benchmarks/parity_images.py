"""Train/serve parity of the image pipeline: the old PIL path against the tensor pipeline, on held-out images.

    .venv/bin/python benchmarks/parity_images.py [--backbone upstream|tiny] [--task digits] [--n 300]
        [--device cpu|cuda] [--out benchmarks/results/parity_images_cpu.json]

For each recipe (vtab, fgvc) a task is trained on mini-VTAB with the demo training config, no pruning,
on `--backbone upstream` (the cached offline upstream ViT; pretrained first if missing, which takes long)
or `--backbone tiny` (a random 2-block ViT at 32 px: a minute). Its held-out test images are JPEG-encoded at several display sizes (upscaled from 32 px
with Pillow, quality 95) and each file goes through
- old: Pillow decode + the PIL transform (torchvision transforms on PIL images, what training and serving
  ran before) and
- new: `ImagePipeline` (torchvision/nvjpeg decode, the tensor `Preprocess` on --device).
Both inputs go through the same model on the CPU. Reported per (recipe, size): pixel difference (grey
levels), top-1 agreement, max and mean |logit difference|, accuracy of each path. Training now uses the
tensor transform too (training/data.py), so on a CPU a task is served exactly the pixels it was trained on;
these numbers are the shift for sets trained before, and (on CUDA) nvjpeg's own difference.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.core.backbone import Backbone, load_backbone  # noqa: E402
from e2vpt.core.images import ImageLimits, decode_image  # noqa: E402
from e2vpt.core.model import PromptedViT, TaskBatch  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import pil_reference_transform  # noqa: E402
from e2vpt.serving.pipeline import ImagePipeline  # noqa: E402

SIZES = ((32, 32), (96, 72), (640, 480))


def task_prompt_set(backbone: Backbone, task: str, recipe: str, n: int) -> tuple[PromptSet, Any]:
    from training.data import with_transforms
    from training.pipeline import DEMO_CONFIG, run_task
    from training.synthetic.minivtab import mini_vtab

    splits = mini_vtab(task, n_test=n)
    with tempfile.TemporaryDirectory() as out:
        run = run_task(
            backbone,
            with_transforms(splits, backbone.info, recipe),
            f"parity-{recipe}",
            replace(DEMO_CONFIG),
            out,
        )
    assert run.prompt_set is not None
    return run.prompt_set, splits


def jpeg(arr: np.ndarray, size: tuple[int, int]) -> bytes:
    img = Image.fromarray(arr)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@torch.inference_mode()
def logits_of(model: PromptedViT, batch: TaskBatch, x: torch.Tensor, classes: int) -> torch.Tensor:
    out = [model.forward_multi(c, batch, torch.zeros(len(c), dtype=torch.long)) for c in x.split(64)]
    return torch.cat(out)[:, :classes].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("upstream", "tiny"), default="upstream")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--n", type=int, default=300, help="held-out test images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipes", nargs="+", default=["vtab", "fgvc"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.backbone == "upstream":
        from training.synthetic.upstream import load_upstream

        backbone = load_upstream()
    else:
        backbone = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    info = backbone.info
    model = PromptedViT(backbone)
    limits = ImageLimits()
    pipe = ImagePipeline(info, limits, args.device, threads=2)
    rows: list[dict[str, Any]] = []
    for recipe in args.recipes:
        ps, splits = task_prompt_set(backbone, args.task, recipe, args.n)
        batch = TaskBatch.from_prompt_sets([ps.validate(info)])
        test = splits.test
        arrays, labels = test.images[: args.n], torch.as_tensor(test.labels[: args.n])
        legacy = pil_reference_transform(info, recipe)
        for size in SIZES:
            files = [jpeg(a, size) for a in arrays]
            old = torch.stack([legacy(decode_image(f, limits=limits)) for f in files])
            decoded = pipe.decode(files)
            new = torch.stack(pipe.transform(decoded, [recipe] * len(files))).cpu()  # type: ignore[arg-type]
            grey = (old - new).abs() * torch.tensor(info.std).view(1, 3, 1, 1) * 255
            lo, ln = (
                logits_of(model, batch, old, ps.num_classes),
                logits_of(model, batch, new, ps.num_classes),
            )
            diff = (lo - ln).abs()
            rows.append(
                {
                    "recipe": recipe,
                    "size": f"{size[0]}x{size[1]}",
                    "images": len(files),
                    "max_grey_levels": float(grey.max()),
                    "pixels_differing": float((grey > 0.5).float().mean()),
                    "top1_agreement": float((lo.argmax(1) == ln.argmax(1)).float().mean()),
                    "max_logit_diff": float(diff.max()),
                    "mean_logit_diff": float(diff.mean()),
                    "logit_scale": float(lo.abs().mean()),
                    "accuracy_old": float((lo.argmax(1) == labels).float().mean()),
                    "accuracy_new": float((ln.argmax(1) == labels).float().mean()),
                }
            )
    pipe.close()
    print(
        f"parity: PIL path vs tensor pipeline on {args.device}; {args.backbone} backbone, mini-VTAB {args.task}"
    )
    head = (
        "recipe",
        "size",
        "max_grey",
        "px_diff",
        "top1_agree",
        "max_dlogit",
        "mean_dlogit",
        "acc_old",
        "acc_new",
    )
    print(" ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [
            r["recipe"],
            r["size"],
            f"{r['max_grey_levels']:.2f}",
            f"{r['pixels_differing']:.4f}",
            f"{r['top1_agreement']:.4f}",
            f"{r['max_logit_diff']:.4f}",
            f"{r['mean_logit_diff']:.5f}",
            f"{r['accuracy_old']:.3f}",
            f"{r['accuracy_new']:.3f}",
        ]
        print(" ".join(f"{c:>11}" for c in cells))
    device = torch.device(args.device)
    result = {
        "backbone": args.backbone,
        "backbone_name": info.name,
        "task": args.task,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "rows": rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"parity_images_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
