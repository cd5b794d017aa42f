"""The real mini-VTAB: Fashion-MNIST, LFW faces and scikit-image's photos in VTAB-1k's shape."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from e2vpt.errors import InvalidDataset
from training import realdata as R
from training.synthetic.minivtab import (
    ALL_TASKS,
    LABELS,
    NUM_CLASSES,
    REAL_SUITE,
    TASK_GROUPS,
    max_test_images,
    mini_vtab,
)

fashion = pytest.mark.skipif(
    R.available()["fashion"] is not None, reason="dataset-fashion-mnist is not installed"
)


def test_real_tasks_are_registered_next_to_the_generated_ones() -> None:
    assert set(R.REAL_TASKS) <= set(ALL_TASKS) and set(REAL_SUITE) <= set(ALL_TASKS)
    for task in R.REAL_TASKS:
        assert NUM_CLASSES[task] == len(LABELS[task]) and TASK_GROUPS[task] in (
            "natural",
            "specialized",
            "structured",
        )
    assert {TASK_GROUPS[t] for t in REAL_SUITE} == {"natural", "specialized", "structured"}


@fashion
@pytest.mark.parametrize("task", ["fashion", "fashion-rotation", "fashion-position"])
def test_fashion_tasks_have_vtab_shape_and_are_deterministic(task: str) -> None:
    splits = mini_vtab(task, seed=0, n_test=300)
    assert splits.sizes() == {"train": 800, "val": 200, "test": 300}
    assert splits.num_classes == NUM_CLASSES[task]
    for ds in (splits.train, splits.val, splits.test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[-1] == 3
        assert set(np.unique(ds.labels)) == set(range(splits.num_classes))  # every class in every split
    again = mini_vtab(task, seed=0, n_test=300)
    assert np.array_equal(again.train.images, splits.train.images)
    assert np.array_equal(again.test.labels, splits.test.labels)
    other = mini_vtab(task, seed=1, n_test=300)
    assert not np.array_equal(other.train.images, splits.train.images)


@fashion
def test_fashion_test_images_come_from_t10k() -> None:
    splits = mini_vtab("fashion", seed=0, n_test=200)
    t10k, t10k_labels = R.fashion_mnist("t10k")
    test = splits.test.images[..., 0]
    rows = {img.tobytes(): lab for img, lab in zip(t10k, t10k_labels, strict=True)}
    assert all(rows[img.tobytes()] == lab for img, lab in zip(test, splits.test.labels, strict=True))


@fashion
def test_rotation_labels_undo_the_turn() -> None:
    splits = mini_vtab("fashion-rotation", seed=0, n_test=100)
    pool = {img.tobytes() for img in R.fashion_mnist("t10k")[0]}
    for img, k in zip(splits.test.images[..., 0], splits.test.labels, strict=True):
        assert np.rot90(img, -int(k)).tobytes() in pool


@fashion
def test_position_label_is_the_cell_holding_the_item() -> None:
    splits = mini_vtab("fashion-position", seed=0, n_test=100)
    for img, cell in zip(splits.test.images[..., 0], splits.test.labels, strict=True):
        ys, xs = np.nonzero(img)
        assert {int(y) // 16 for y in ys} == {int(cell) // 3} and {int(x) // 16 for x in xs} == {
            int(cell) % 3
        }


def test_faces_is_capped_at_its_pool_and_stratified() -> None:
    splits = mini_vtab("faces", seed=0, n_test=1000)
    assert splits.sizes() == {"train": 100, "val": 50, "test": 50}
    assert max_test_images("faces", 1000) == 50
    for ds in (splits.train, splits.val, splits.test):
        assert np.bincount(ds.labels).tolist() == [len(ds) // 2] * 2
    every = np.concatenate([splits.train.images, splits.val.images, splits.test.images])
    assert len({img.tobytes() for img in every}) == 200  # no image in two splits
    with pytest.raises(InvalidDataset, match="at most"):
        R.generate_real("faces", 0, (101, 50, 50))


def test_photo_texture_test_patches_come_from_unseen_rows() -> None:
    sizes = (40, 10, 40)
    images, labels = R.generate_real("photo-textures", 0, sizes)
    assert images.shape == (90, R.PATCH, R.PATCH, 3) and set(labels) <= set(range(len(R.TEXTURE_PHOTOS)))
    photos = R._texture_photos()
    for split, n in enumerate(sizes):
        crops = R.texture_crops(0, split, n)
        assert len(crops) == n
        for lab, y0, x0, side, _ in crops:
            h, w = photos[lab].shape
            cut = int(h * R.TRAIN_REGION)
            assert 40 <= side <= 80 and 0 <= x0 and x0 + side <= w
            assert (0 <= y0 and y0 + side <= cut) if split < 2 else (cut <= y0 and y0 + side <= h)
    first = [c[0] for c in R.texture_crops(0, 0, 40)]
    assert labels[:40].tolist() == first  # the labels are the photos the patches were cut from


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset, match="apt-get install dataset-fashion-mnist"):
        R.fashion_mnist("train", root=tmp_path)


def test_idx_reader(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 7]))
    x, y = R.fashion_mnist("t10k", root=tmp_path)
    assert np.array_equal(x, images) and y.tolist() == [3, 7]


def test_unknown_task_is_a_typed_error() -> None:
    with pytest.raises(InvalidDataset, match="unknown"):
        R.generate_real("imagenet", 0, (1, 1, 1))
