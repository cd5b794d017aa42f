"""The real mini-VTAB: downstream tasks of real images that can be had offline, in VTAB-1k's shape
(800 train / 200 val / a held-out test split), next to the generated tasks of `training.synthetic.minivtab`.

natural:     `fashion`           Fashion-MNIST's 10 clothing classes (Debian `dataset-fashion-mnist`);
             `faces`             faces vs non-faces, scikit-image's `data.lfw_subset()` (only 200 images:
                                 100 train / 50 val / 50 test, not VTAB's 800/200);
             (`digits`, scikit-learn's handwritten digits, lives in `training.synthetic.minivtab`)
specialized: `photo-textures`    which of 8 grey-level photos a patch comes from (brick, grass, gravel,
                                 moon, coins, Hubble deep field, immunohistochemistry, cells: scikit-image's
                                 bundled photos); train/val patches come from the top 70% of each photo,
                                 test patches from the bottom 30%, so no test pixel was seen in training;
structured:  `fashion-rotation`  a Fashion-MNIST item turned by 0/90/180/270 degrees (4 classes);
             `fashion-position`  which cell of a 3x3 grid holds a (half-size) Fashion-MNIST item.

Fashion tasks draw train/val from Fashion-MNIST's training images and test from its t10k images.
Every task is deterministic from `seed`; a missing source raises `InvalidDataset` saying how to install it.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from e2vpt.errors import InvalidDataset

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
TEXTURE_PHOTOS = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "cell",
)
PATCH = 32  # photo-textures patches are stored at 32 x 32 (as the generated tasks)
TRAIN_REGION = 0.7  # photo-textures: rows [0, 70%) feed train/val, [70%, 100%) feed test

REAL_TASKS = ("fashion", "fashion-rotation", "fashion-position", "faces", "photo-textures")
REAL_GROUPS = {
    "fashion": "natural",
    "faces": "natural",
    "photo-textures": "specialized",
    "fashion-rotation": "structured",
    "fashion-position": "structured",
}
REAL_LABELS = {
    "fashion": FASHION_LABELS,
    "fashion-rotation": ["0deg", "90deg", "180deg", "270deg"],
    "fashion-position": [f"cell{r}{c}" for r in range(3) for c in range(3)],
    "faces": ["face", "non-face"],
    "photo-textures": list(TEXTURE_PHOTOS),
}
# Tasks with a fixed pool of images: (train, val, test) at most.
FACES_SPLIT = (100, 50, 50)


# ---------------------------------------------------------------------------------------- sources
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=2)
def fashion_mnist(split: str = "train", root: str | Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images [N, 28, 28] uint8 and labels from the idx files (`train` 60k, `t10k` 10k)."""
    root = Path(root)
    images, labels = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise InvalidDataset(
            f"Fashion-MNIST is not installed at {root} (Debian: apt-get install dataset-fashion-mnist)"
        )
    x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if x.shape != (len(y), 28, 28):
        raise InvalidDataset(f"unexpected Fashion-MNIST shapes {x.shape} / {y.shape} in {root}")
    return x, y


def _skimage_data():  # noqa: ANN202  (a module)
    try:
        from skimage import data
    except ImportError as exc:
        raise InvalidDataset("scikit-image is not installed (it is a dependency: make setup)") from exc
    return data


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _grey(photo: np.ndarray) -> np.ndarray:
    """A photo as uint8 grey levels (colour would be a shortcut between photos)."""
    if photo.ndim == 3:
        photo = photo[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(photo.round(), 0, 255).astype(np.uint8)
    return photo.astype(np.uint8)


# ---------------------------------------------------------------------------------------- tasks
Sizes = tuple[int, int, int]


def _pick(rng: np.random.Generator, pool: int, n: int) -> np.ndarray:
    if n > pool:
        raise InvalidDataset(f"asked for {n} images of a pool of {pool}")
    return rng.permutation(pool)[:n]


def _fashion_splits(seed: int, sizes: Sizes, salt: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images [n, 28, 28], labels) for train, val (from `train`) and test (from `t10k`)."""
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("t10k")
    n_train, n_val, n_test = sizes
    idx = _pick(np.random.default_rng([seed, salt, 0]), len(x), n_train + n_val)
    tidx = _pick(np.random.default_rng([seed, salt, 1]), len(xt), n_test)
    return [(x[idx[:n_train]], y[idx[:n_train]]), (x[idx[n_train:]], y[idx[n_train:]]), (xt[tidx], yt[tidx])]


def _fashion(seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    parts = _fashion_splits(seed, sizes, 1)
    return _rgb(np.concatenate([p[0] for p in parts])), np.concatenate([p[1] for p in parts])


def _fashion_rotation(seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for split, (x, _) in enumerate(_fashion_splits(seed, sizes, 2)):
        k = np.random.default_rng([seed, 2, 10 + split]).integers(4, size=len(x))
        xs.append(np.stack([np.rot90(img, int(r)) for img, r in zip(x, k, strict=True)]) if len(x) else x)
        ys.append(k.astype(np.int64))
    return _rgb(np.concatenate(xs)), np.concatenate(ys)


def _fashion_position(seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    cell, item, side = 16, 14, 48
    xs, ys = [], []
    for split, (x, _) in enumerate(_fashion_splits(seed, sizes, 3)):
        rng = np.random.default_rng([seed, 3, 10 + split])
        canvas = np.zeros((len(x), side, side), np.uint8)
        labels = rng.integers(9, size=len(x))
        for i, (img, lab) in enumerate(zip(x, labels, strict=True)):
            small = np.asarray(Image.fromarray(img).resize((item, item), Image.BOX))
            r, c = divmod(int(lab), 3)
            dy, dx = rng.integers(0, cell - item + 1, 2)
            canvas[i, r * cell + dy : r * cell + dy + item, c * cell + dx : c * cell + dx + item] = small
        xs.append(canvas)
        ys.append(labels.astype(np.int64))
    return _rgb(np.concatenate(xs)), np.concatenate(ys)


def _faces(seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 200 LFW crops: the first 100 are faces, the last 100 are not (25 x 25 grey)."""
    faces = _skimage_data().lfw_subset()
    images = (np.clip(faces, 0, 1) * 255).round().astype(np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    n_train, n_val, n_test = sizes
    if any(n > m for n, m in zip(sizes, FACES_SPLIT, strict=True)):
        raise InvalidDataset(f"faces has {FACES_SPLIT} (train, val, test) images at most, not {sizes}")
    rng = np.random.default_rng([seed, 4])
    # stratified: each class's 100 images split 50 / 25 / 25, each split a prefix of its class part
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    bounds = np.cumsum([0, *(s // 2 for s in FACES_SPLIT)])
    picks = []
    for k, n in enumerate((n_train, n_val, n_test)):
        split = np.concatenate([p[bounds[k] : bounds[k + 1]] for p in per])
        split = np.random.default_rng([seed, 4, k]).permutation(split)[:n]
        picks.append(split)
    idx = np.concatenate(picks)
    return _rgb(images[idx]), labels[idx]


@lru_cache(maxsize=1)
def _texture_photos() -> tuple[np.ndarray, ...]:
    data = _skimage_data()
    return tuple(_grey(getattr(data, name)()) for name in TEXTURE_PHOTOS)


def texture_crops(seed: int, split: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """(label, top, left, side, quarter turns) of each patch of a split (0 train, 1 val, 2 test): train and
    val patches lie in the top `TRAIN_REGION` of their photo, test patches below it."""
    shapes = [p.shape for p in _texture_photos()]
    rng = np.random.default_rng([seed, 5, split])
    out = []
    for lab in rng.integers(len(shapes), size=n):
        h, w = shapes[lab]
        cut = int(h * TRAIN_REGION)
        top, bottom = (0, cut) if split < 2 else (cut, h)
        side = int(rng.integers(40, min(81, bottom - top + 1, w + 1)))
        y0, x0 = int(rng.integers(top, bottom - side + 1)), int(rng.integers(0, w - side + 1))
        out.append((int(lab), y0, x0, side, int(rng.integers(4))))
    return out


def _photo_textures(seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    photos = _texture_photos()
    crops = [c for split, n in enumerate(sizes) for c in texture_crops(seed, split, n)]
    out = np.empty((len(crops), PATCH, PATCH), np.uint8)
    for i, (lab, y0, x0, side, turns) in enumerate(crops):
        patch = Image.fromarray(photos[lab][y0 : y0 + side, x0 : x0 + side])
        out[i] = np.rot90(np.asarray(patch.resize((PATCH, PATCH), Image.BILINEAR)), turns)
    return _rgb(out), np.array([c[0] for c in crops], np.int64)


GENERATORS: dict[str, Callable[[int, Sizes], tuple[np.ndarray, np.ndarray]]] = {
    "fashion": _fashion,
    "fashion-rotation": _fashion_rotation,
    "fashion-position": _fashion_position,
    "faces": _faces,
    "photo-textures": _photo_textures,
}


def max_split_sizes(task: str, n_train: int, n_val: int, n_test: int) -> Sizes:
    """The split sizes a task can give: `faces` caps them at its 100 / 50 / 50 images."""
    if task == "faces":
        return min(n_train, FACES_SPLIT[0]), min(n_val, FACES_SPLIT[1]), min(n_test, FACES_SPLIT[2])
    return n_train, n_val, n_test


def generate_real(task: str, seed: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    """Images [sum(sizes), H, W, 3] uint8 (train, then val, then test) and labels of a real task."""
    if task not in GENERATORS:
        raise InvalidDataset(f"unknown real mini-VTAB task {task!r}; expected one of {REAL_TASKS}")
    images, labels = GENERATORS[task](seed, sizes)
    assert len(images) == len(labels) == sum(sizes), (task, images.shape, sizes)
    return images, labels


def available() -> dict[str, str | None]:
    """Each real task and why it cannot be built here (None: it can)."""
    out: dict[str, str | None] = {}
    for task in REAL_TASKS:
        try:
            if task.startswith("fashion"):
                fashion_mnist("t10k")
            else:
                _skimage_data()
            out[task] = None
        except InvalidDataset as exc:
            out[task] = str(exc)
    return out
