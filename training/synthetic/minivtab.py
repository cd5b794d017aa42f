"""The generated "mini-VTAB": small offline downstream tasks in the spirit of VTAB-1k's groups, each
deterministic from a seed, with 800 train / 200 val / a held-out test split.

structured: `position` (dSprites-loc: which of 3x3 cells holds the object), `orientation`
(dSprites-ori: angle of a bar in 6 bins over 180 degrees), `count` (Clevr-count: 1 to 6 objects);
textures: `textures` (DTD-like: 6 procedural pattern families under random colours, scale, rotation);
natural: `digits` (real handwritten digits from scikit-learn, upscaled and coloured).
The real-image tasks (`training.realdata`: Fashion-MNIST, LFW faces, photo textures, rotation, position)
are built through the same `generate` / `mini_vtab`; `REAL_SUITE` is the suite of real images.

The upstream task (`training.synthetic.upstream`) classifies shape x colour family of one main object among
distractors, at any position, size and rotation: it teaches shapes and colours but not positions,
angles, counts or textures, so the downstream tasks differ from it as VTAB's do from ImageNet.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from e2vpt.errors import InvalidDataset
from training.data import ArrayDataset, DataSplits
from training.realdata import REAL_GROUPS, REAL_LABELS, REAL_TASKS, generate_real, max_split_sizes

SIZE = 32
SUPERSAMPLE = 2
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOR_FAMILIES = ("red", "green", "blue")
TASKS = ("position", "orientation", "count", "textures", "digits")
TASK_GROUPS = {
    "position": "structured",
    "orientation": "structured",
    "count": "structured",
    "textures": "specialized",
    "digits": "natural",
}
TRAIN, VAL = 800, 200
ALL_TASKS = TASKS + REAL_TASKS
# The mini-VTAB of real images: the real tasks and scikit-learn's digits.
REAL_SUITE = ("fashion", "digits", "faces", "photo-textures", "fashion-rotation", "fashion-position")
TASK_GROUPS.update(REAL_GROUPS)


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c, indexing="xy")


_X, _Y = _grid()


def shape_mask(
    shape: str, cx: float, cy: float, scale: float, angle: float, aspect: float = 1.0
) -> np.ndarray:
    """Boolean coverage [2S, 2S] of a shape centred at (cx, cy) (pixels), radius `scale`, rotated."""
    ca, sa = np.cos(angle), np.sin(angle)
    dx, dy = _X - cx, _Y - cy
    u = (ca * dx + sa * dy) / scale
    v = (-sa * dx + ca * dy) / (scale * aspect)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "triangle":
        return (v >= -0.6) & (v <= 0.9 - 1.6 * abs(u))
    if shape == "cross":
        return ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1))
    if shape == "ring":
        r = u**2 + v**2
        return (r <= 1) & (r >= 0.35)
    if shape == "diamond":
        return abs(u) + abs(v) <= 1
    if shape == "bar":
        return (abs(u) <= 1) & (abs(v) <= 0.22)
    raise ValueError(shape)


def _downsample(img: np.ndarray) -> np.ndarray:
    n = img.shape[0] // SUPERSAMPLE
    return img.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))


def random_color(rng: np.random.Generator, family: int | None = None) -> np.ndarray:
    """An RGB colour in [0, 1]; a family (0 red, 1 green, 2 blue) dominates its channel."""
    if family is None:
        return rng.uniform(0.15, 1.0, 3)
    c = rng.uniform(0.0, 0.45, 3)
    c[family] = rng.uniform(0.7, 1.0)
    return c


def background(rng: np.random.Generator, dark: bool = False) -> np.ndarray:
    """A smooth random gradient plus pixel noise, [2S, 2S, 3] in [0, 1]."""
    n = SIZE * SUPERSAMPLE
    base = rng.uniform(0.0, 0.25 if dark else 0.6, 3)
    slope = rng.uniform(-0.2, 0.2, (2, 3))
    g = base + slope[0] * (_X[..., None] / SIZE) + slope[1] * (_Y[..., None] / SIZE)
    return np.clip(g + rng.normal(0, 0.03, (n, n, 3)), 0, 1)


def paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    canvas[mask] = color


def finish(canvas: np.ndarray) -> np.ndarray:
    return (np.clip(_downsample(canvas), 0, 1) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------- downstream tasks
def _position(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    canvas = background(rng, dark=True)
    cell = rng.integers(9)
    row, col = divmod(int(cell), 3)
    w = SIZE / 3
    cx, cy = (col + rng.uniform(0.25, 0.75)) * w, (row + rng.uniform(0.25, 0.75)) * w
    shape = SHAPES[rng.integers(len(SHAPES))]
    paint(
        canvas, shape_mask(shape, cx, cy, rng.uniform(2.5, 4), rng.uniform(0, 2 * np.pi)), random_color(rng)
    )
    return finish(canvas), int(cell)


def _orientation(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    canvas = background(rng)
    label = int(rng.integers(6))
    angle = (label + rng.uniform(0.1, 0.9)) * np.pi / 6
    cx, cy = rng.uniform(10, SIZE - 10, 2)
    paint(canvas, shape_mask("bar", cx, cy, rng.uniform(7, 10), angle), random_color(rng))
    return finish(canvas), label


def _count(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    canvas = background(rng)
    label = int(rng.integers(6))
    placed: list[tuple[float, float]] = []
    while len(placed) < label + 1:
        cx, cy = rng.uniform(4, SIZE - 4, 2)
        if all((cx - a) ** 2 + (cy - b) ** 2 > 8.5**2 for a, b in placed):
            placed.append((cx, cy))
            shape = SHAPES[rng.integers(len(SHAPES))]
            paint(
                canvas,
                shape_mask(shape, cx, cy, rng.uniform(2.5, 3.8), rng.uniform(0, 6.3)),
                random_color(rng),
            )
    return finish(canvas), label


TEXTURES = ("stripes", "checker", "dots", "waves", "grid", "blotches")


def _textures(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    label = int(rng.integers(len(TEXTURES)))
    a, b = random_color(rng), random_color(rng)
    while np.abs(a - b).sum() < 0.6:
        b = random_color(rng)
    th = rng.uniform(0, np.pi)
    u = np.cos(th) * _X + np.sin(th) * _Y
    v = -np.sin(th) * _X + np.cos(th) * _Y
    period = rng.uniform(4, 8)
    phase = rng.uniform(0, 2 * np.pi)
    w = 2 * np.pi / period
    if label == 0:
        m = np.sin(w * u + phase) > 0
    elif label == 1:
        m = (np.sin(w * u + phase) > 0) ^ (np.sin(w * v) > 0)
    elif label == 2:
        m = np.sin(w * u + phase) * np.sin(w * v) > 0.55
    elif label == 3:
        m = np.sin(w * u + 2.0 * np.sin(w * 0.5 * v) + phase) > 0
    elif label == 4:
        m = (np.abs(np.sin(w * u / 2 + phase)) < 0.3) | (np.abs(np.sin(w * v / 2)) < 0.3)
    else:
        f = np.zeros_like(_X)
        for _ in range(6):
            k = rng.normal(0, w / 2.5, 2)
            f += np.sin(k[0] * _X + k[1] * _Y + rng.uniform(0, 6.3))
        m = f > 0
    canvas = np.where(m[..., None], a, b) + rng.normal(0, 0.03, (*m.shape, 3))
    return finish(canvas), label


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, int]]] = {
    "position": _position,
    "orientation": _orientation,
    "count": _count,
    "textures": _textures,
}
NUM_CLASSES = {"position": 9, "orientation": 6, "count": 6, "textures": 6, "digits": 10}
LABELS = {
    "position": [f"cell{r}{c}" for r in range(3) for c in range(3)],
    "orientation": [f"{30 * i}-{30 * i + 30}deg" for i in range(6)],
    "count": [str(i) for i in range(1, 7)],
    "textures": list(TEXTURES),
    "digits": [str(i) for i in range(10)],
    **REAL_LABELS,
}
NUM_CLASSES.update({task: len(labels) for task, labels in REAL_LABELS.items()})


DIGITS_IMAGES = 1797  # scikit-learn's handwritten digits


def max_test_images(task: str, requested: int) -> int:
    """`requested`, capped where a task has a fixed pool of images (digits: what train + val leave)."""
    if task == "digits":
        return min(requested, DIGITS_IMAGES - TRAIN - VAL)
    return max_split_sizes(task, TRAIN, VAL, requested)[2]


def _digits(seed: int, sizes: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng([seed, 99]).permutation(len(d.images))
    n_train, n_val, n_test = sizes
    if n_test > len(d.images) - TRAIN - VAL:
        raise InvalidDataset(f"digits has {len(d.images) - TRAIN - VAL} test images, not {n_test}")
    picks = np.concatenate(
        [order[:n_train], order[TRAIN : TRAIN + n_val], order[TRAIN + VAL : TRAIN + VAL + n_test]]
    )
    out = np.empty((len(picks), SIZE, SIZE, 3), np.uint8)
    for j, i in enumerate(picks):
        rng = np.random.default_rng([seed, 98, int(i)])  # an image's colours do not depend on the split sizes
        g = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).resize(
            (SIZE - 8, SIZE - 8), Image.BILINEAR
        )
        g = np.pad(np.asarray(g, np.float64) / 255, 4)
        fg, bg = random_color(rng), rng.uniform(0, 0.3, 3)
        out[j] = (np.clip(bg + g[..., None] * (fg - bg), 0, 1) * 255).round().astype(np.uint8)
    return out, d.target[picks].astype(np.int64)


def generate(
    task: str, seed: int = 0, n_test: int = 1000, n_train: int = TRAIN, n_val: int = VAL
) -> tuple[np.ndarray, np.ndarray]:
    """Images [n_train + n_val + n_test, 32, 32, 3] uint8 and labels of a task, deterministic from `seed`.

    Each split has its own random stream, so a split's images do not depend on the other splits' sizes
    (a smaller train set is a prefix of the full one; the test set is always the same)."""
    if task == "digits":
        return _digits(seed, (n_train, n_val, n_test))
    if task in REAL_TASKS:
        return generate_real(task, seed, (n_train, n_val, n_test))
    if task not in GENERATORS:
        raise InvalidDataset(f"unknown mini-VTAB task {task!r}; expected one of {ALL_TASKS}")
    parts_x, parts_y = [], []
    for split, n in enumerate((n_train, n_val, n_test)):
        rng = np.random.default_rng([seed, TASKS.index(task), split])
        images = np.empty((n, SIZE, SIZE, 3), np.uint8)
        labels = np.empty(n, np.int64)
        for i in range(n):
            images[i], labels[i] = GENERATORS[task](rng)
        parts_x.append(images)
        parts_y.append(labels)
    return np.concatenate(parts_x), np.concatenate(parts_y)


def mini_vtab(
    task: str, seed: int = 0, n_test: int = 1000, n_train: int = TRAIN, n_val: int = VAL
) -> DataSplits:
    """One task's splits: 800 train / 200 val / `n_test` held-out test (n_train/n_val: fewer, for tests).
    A task with a fixed pool of images gives at most what it has (`faces`: 100 / 50 / 50)."""
    if task in REAL_TASKS:
        n_train, n_val, n_test = max_split_sizes(task, n_train, n_val, n_test)
    images, labels = generate(task, seed, n_test, n_train, n_val)
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    return DataSplits(
        ArrayDataset(images[tr], labels[tr]),
        ArrayDataset(images[va], labels[va]),
        ArrayDataset(images[te], labels[te]) if n_test else None,
        LABELS[task],
        f"minivtab-{task}",
    )
