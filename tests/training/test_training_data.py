"""Datasets: image folders, VTAB-1k list files, mini-VTAB, transforms, and clear errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e2vpt.errors import InvalidDataset, InvalidPromptSet
from training.data import (
    FileDataset,
    build_transform,
    image_folder_splits,
    read_list_file,
    vtab_splits,
    with_transforms,
)
from training.synthetic.minivtab import NUM_CLASSES, TASKS, generate, mini_vtab


def _img(path: Path, value: int = 128, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 3) -> Path:
    for c in classes:
        for i in range(n):
            _img(root / c / f"{i}.png", 40 * i)
    return root


def test_image_folder_flat_split(tmp_path: Path) -> None:
    splits = image_folder_splits(_folder(tmp_path / "ds", n=5), val_fraction=0.2)
    assert splits.labels == ["cat", "dog"]
    assert splits.sizes() == {"train": 8, "val": 2, "test": 0}
    x, y = splits.train[0]
    assert x.shape == (3, 20, 20) and y in (0, 1)


def test_one_class_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset, match=r"one class folder \(cat\)"):
        image_folder_splits(_folder(tmp_path / "ds", classes=("cat",)))
    with pytest.raises(InvalidDataset, match=r"one class folder"):
        image_folder_splits(_folder(tmp_path / "split" / "train", classes=("cat",)).parent)


def test_image_folder_with_splits_and_missing_class(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _folder(root / "train")
    _folder(root / "val")
    _folder(root / "test", classes=("cat",))
    with pytest.raises(InvalidDataset, match=r"missing class folder.*dog"):
        image_folder_splits(root)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    (root / "bird").mkdir()
    with pytest.raises(InvalidDataset, match=r"bird holds no images"):
        image_folder_splits(root)


def test_corrupt_image_reported_by_path_up_front(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(InvalidDataset, match=r"broken\.jpg"):
        image_folder_splits(root)


def test_image_broken_after_scan_raises_with_path(tmp_path: Path) -> None:
    p = _img(tmp_path / "a.png")
    ds = FileDataset([(p, 0)])
    p.write_bytes(b"garbage")
    with pytest.raises(InvalidDataset, match=r"a\.png"):
        ds[0]


def test_list_file_parsing(tmp_path: Path) -> None:
    d = tmp_path / "vtab"
    for split, n in (("train800", 4), ("val200", 2), ("test", 3)):
        lines = []
        for i in range(n):
            _img(d / "images" / split / f"{i} x.png", 10 * i)
            lines.append(f"images/{split}/{i} x.png {i % 3}")
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n\n")
    samples = read_list_file(d / "train800.txt")
    assert samples[1] == (d / "images/train800/1 x.png", 1)  # spaces in paths: the label is the last field
    splits = vtab_splits(d)
    assert splits.sizes() == {"train": 4, "val": 2, "test": 3}
    assert splits.labels == ["0", "1", "2"]
    with pytest.raises(InvalidDataset, match=r"train800val200\.txt does not exist"):
        vtab_splits(d, final=True)
    (d / "bad.txt").write_text("images/a.png 1\nimages/b.png cat\n")
    with pytest.raises(InvalidDataset, match=r"bad\.txt:2: label 'cat'"):
        read_list_file(d / "bad.txt")
    (d / "bad2.txt").write_text("justonefield\n")
    with pytest.raises(InvalidDataset, match=r"bad2\.txt:1"):
        read_list_file(d / "bad2.txt")
    (d / "test.txt").write_text("images/nowhere.png 0\n")
    with pytest.raises(InvalidDataset, match=r"do not exist.*nowhere\.png"):
        vtab_splits(d)


def test_transforms_follow_backbone_config(backbone) -> None:
    info = backbone.info
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    for recipe in ("vtab", "fgvc"):
        for train in (True, False):
            x = build_transform(info, recipe, train=train)(img)
            assert tuple(x.shape) == (3, *info.img_size)
    flat = Image.fromarray(np.full((8, 8, 3), 255, np.uint8))
    x = build_transform(info, "vtab")(flat)
    expected = (1.0 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-5)
    with pytest.raises(InvalidPromptSet, match="unknown transform recipe"):
        build_transform(info, "imagenet")


def test_mini_vtab_deterministic_and_sized(backbone) -> None:
    for task in TASKS[:4]:
        a, ya = generate(task, seed=3, n_test=10, n_train=60, n_val=5)
        b, yb = generate(task, seed=3, n_test=10, n_train=30, n_val=5)
        c, _ = generate(task, seed=4, n_test=10, n_train=60, n_val=5)
        assert a.shape == (75, 32, 32, 3)
        assert np.array_equal(a[:30], b[:30]) and np.array_equal(a[-15:], b[-15:])  # splits are independent
        assert not np.array_equal(a, c)
        assert set(ya.tolist()) == set(range(NUM_CLASSES[task]))
    splits = with_transforms(mini_vtab("digits", seed=0, n_test=20, n_train=40, n_val=10), backbone.info)
    assert splits.sizes() == {"train": 40, "val": 10, "test": 20}
    assert splits.train[0][0].shape == (3, 32, 32)
    with pytest.raises(InvalidDataset, match="unknown mini-VTAB task"):
        mini_vtab("imagenet")


def test_upstream_shape_task_labels_and_sizes() -> None:
    """The default upstream task is shape only (6 classes); the old shape x colour task has 18."""
    from training.synthetic.upstream import num_upstream_classes, upstream_batch

    x, y = upstream_batch(64, seed=3)
    assert x.shape == (64, 3, 32, 32) and int(y.min()) >= 0 and int(y.max()) < num_upstream_classes("shape")
    assert num_upstream_classes("shape") == 6 and num_upstream_classes("shape-colour") == 18
    _, y2 = upstream_batch(64, seed=3, task="shape-colour")
    assert int(y2.max()) < 18 and int(y2[0]) // 3 == int(y[0])  # first image: same draws, same shape
    with pytest.raises(ValueError, match="upstream task"):
        num_upstream_classes("colour")


def test_digits_test_split_is_capped_to_the_pool() -> None:
    from training.synthetic.minivtab import DIGITS_IMAGES, VAL, max_test_images
    from training.synthetic.minivtab import TRAIN as N_TRAIN

    assert max_test_images("digits", 1000) == DIGITS_IMAGES - N_TRAIN - VAL
    assert max_test_images("count", 1000) == 1000
    with pytest.raises(InvalidDataset, match="digits has"):
        mini_vtab("digits", n_test=1000)
