"""Datasets for training: image folders, VTAB-1k list files and the generated mini-VTAB, with the
transforms of the backbone's pretrained config.

Every image file is checked up front (`verify=True`, the default): a corrupt or unreadable file raises
`InvalidDataset` naming its path before training starts, and a file that breaks later still raises
`InvalidDataset` with its path (never a bare PIL error in the middle of an epoch).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.images import (  # noqa: F401  (RECIPES re-exported: the one home is e2vpt.core.images)
    RECIPES,
    TRAINING_LIMITS,
    build_transform,
    decode_image,
)
from e2vpt.errors import E2VPTError, InvalidDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
Transform = Callable[[Image.Image | Tensor], Tensor]


# ---------------------------------------------------------------------------------------- datasets
# Train/serve parity: files are decoded as serving decodes requests (`decode_image`: EXIF orientation,
# alpha on white, 16-bit grayscale) and transformed by the same tensor `Preprocess` serving runs.
def load_image(path: Path) -> Image.Image:
    """An RGB image decoded as serving decodes it, or `InvalidDataset` naming the file."""
    try:
        return decode_image(path.read_bytes(), limits=TRAINING_LIMITS)
    except (OSError, E2VPTError) as exc:
        raise InvalidDataset(f"cannot read image {path}: {exc}") from exc


def verify_images(paths: Sequence[Path]) -> None:
    """Open and decode every file once; the first unreadable one raises `InvalidDataset` with its path."""
    bad: list[str] = []
    for p in paths:
        try:
            decode_image(p.read_bytes(), limits=TRAINING_LIMITS)
        except (OSError, E2VPTError) as exc:
            bad.append(f"{p} ({type(exc).__name__}: {exc})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InvalidDataset(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:5]) + more)


class FileDataset(Dataset):
    """(image file, label) pairs read with PIL and transformed on access."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Transform | None = None) -> None:
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        img = load_image(path)
        return (self.transform(img) if self.transform else T.functional.to_tensor(img)), label

    def with_transform(self, transform: Transform | None) -> FileDataset:
        return FileDataset(self.samples, transform)


class ArrayDataset(Dataset):
    """In-memory uint8 images [N, H, W, 3] and labels (the generated mini-VTAB)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InvalidDataset(
                f"array images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise InvalidDataset(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = torch.from_numpy(self.images[index]).permute(2, 0, 1)  # uint8 [3, H, W], as served
        x = self.transform(img) if self.transform else img.float() / 255.0
        return x, int(self.labels[index])

    def with_transform(self, transform: Transform | None) -> ArrayDataset:
        return ArrayDataset(self.images, self.labels, transform)


class TensorImageDataset(Dataset):
    """Pre-transformed images [N, 3, H, W] (deterministic recipes only): no decoding per epoch."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def materialize(ds: Dataset) -> TensorImageDataset:
    """Run a deterministic transform once over the whole dataset (VTAB recipe)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True) if len(ds) else ((), ())
    if not xs:
        raise InvalidDataset("empty dataset")
    return TensorImageDataset(torch.stack(list(xs)), torch.tensor(ys, dtype=torch.long))


@dataclass
class DataSplits:
    """train / val / test of one task, with its class names. `test` may be None."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    labels: list[str]
    name: str = "task"
    recipe: str = "vtab"  # the preprocessing recipe attached by `with_transforms` (recorded in prompt sets)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test) if self.test else 0}


def _apply(ds: Dataset, transform: Transform | None) -> Dataset:
    return ds.with_transform(transform) if hasattr(ds, "with_transform") else ds


def with_transforms(
    splits: DataSplits, info: BackboneInfo, recipe: str = "vtab", *, cache: bool = True
) -> DataSplits:
    """Attach the recipe's transforms; with the (deterministic) VTAB recipe, decode every image once."""
    train_tf = build_transform(info, recipe, train=True)
    eval_tf = build_transform(info, recipe, train=False)
    train, val = _apply(splits.train, train_tf), _apply(splits.val, eval_tf)
    test = _apply(splits.test, eval_tf) if splits.test is not None else None
    if cache and recipe == "vtab":
        train, val = materialize(train), materialize(val)
        test = materialize(test) if test is not None else None
    return DataSplits(train, val, test, splits.labels, splits.name, recipe)


# ---------------------------------------------------------------------------------------- image folders
def _class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) pairs of `root/<class>/*`. Given `classes`, each must exist and hold images."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidDataset(f"dataset folder {root} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise InvalidDataset(f"{root} has no class folders (expected {root}/<class>/<image>)")
        if len(classes) < 2:
            raise InvalidDataset(
                f"{root} has one class folder ({classes[0]}): a classifier needs at least two"
            )
    missing = [c for c in classes if c not in found]
    if missing:
        raise InvalidDataset(f"missing class folder(s) in {root}: {', '.join(missing)}")
    samples: list[tuple[Path, int]] = []
    for i, name in enumerate(classes):
        files = _class_files(root / name)
        if not files:
            raise InvalidDataset(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        samples += [(f, i) for f in files]
    return samples, list(classes)


def _split(samples: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: `fraction` of each class (at least one image) goes to the second part."""
    rng = random.Random(seed)
    first, second = [], []
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    for items in by_class.values():
        items = items[:]
        rng.shuffle(items)
        n = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        second += items[:n]
        first += items[n:]
    return first, second


def image_folder_splits(
    root: str | Path, *, val_fraction: float = 0.2, seed: int = 0, verify: bool = True
) -> DataSplits:
    """`root/{train,val,test}/<class>/` when `root/train` exists (val/test must have the same classes),
    else `root/<class>/` split into train/val (stratified, `val_fraction`) with no test split."""
    root = Path(root)
    if (root / "train").is_dir():
        train, labels = scan_image_folder(root / "train")
        val = scan_image_folder(root / "val", labels)[0] if (root / "val").is_dir() else None
        test = scan_image_folder(root / "test", labels)[0] if (root / "test").is_dir() else None
        if val is None:
            train, val = _split(train, val_fraction, seed)
    else:
        samples, labels = scan_image_folder(root)
        train, val = _split(samples, val_fraction, seed)
        test = None
    if verify:
        verify_images([p for p, _ in train + val + (test or [])])
    return DataSplits(
        FileDataset(train), FileDataset(val), FileDataset(test) if test else None, labels, root.name
    )


# ---------------------------------------------------------------------------------------- VTAB-1k lists
def read_list_file(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, int]]:
    """A VTAB-1k list file: one `relative/path label` per line (blank lines ignored), paths relative to
    `root` (default: the list file's folder). Bad lines raise `InvalidDataset` with file and line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidDataset(f"list file {path} does not exist")
    base = Path(root) if root is not None else path.parent
    out: list[tuple[Path, int]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise InvalidDataset(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        rel, label = parts
        try:
            y = int(label)
        except ValueError:
            raise InvalidDataset(f"{path}:{n}: label {label!r} is not an integer") from None
        if y < 0:
            raise InvalidDataset(f"{path}:{n}: negative label {y}")
        out.append((base / rel, y))
    if not out:
        raise InvalidDataset(f"list file {path} is empty")
    return out


def vtab_splits(list_dir: str | Path, *, final: bool = False, verify: bool = True) -> DataSplits:
    """A VTAB-1k task folder. Default: train800 / val200 / test (selection and grid search);
    `final=True`: train800val200 / val200 / test (the paper's final run on train+val)."""
    d = Path(list_dir)
    if not d.is_dir():
        raise InvalidDataset(f"VTAB folder {d} does not exist")
    train = read_list_file(d / ("train800val200.txt" if final else "train800.txt"))
    val = read_list_file(d / "val200.txt")
    test = read_list_file(d / "test.txt") if (d / "test.txt").is_file() else None
    all_samples = train + val + (test or [])
    missing = sorted({str(p) for p, _ in all_samples if not p.is_file()})
    if missing:
        raise InvalidDataset(f"{len(missing)} listed image(s) do not exist, e.g. {', '.join(missing[:3])}")
    if verify:
        verify_images(sorted({p for p, _ in all_samples}))
    num_classes = max(y for _, y in all_samples) + 1
    labels = [str(i) for i in range(num_classes)]
    return DataSplits(
        FileDataset(train), FileDataset(val), FileDataset(test) if test else None, labels, d.name
    )
