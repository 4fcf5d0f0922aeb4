"""Budgets of the dataset readers: hostile data files are refused before they cost memory."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ticketguard.errors import DatasetError
from ticketguard.tickets import data
from ticketguard.tickets.data import load_data


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar10(root: Path, batch: dict) -> Path:
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": [1] * 20}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(folder / name, good)
    _dump(folder / "data_batch_3", batch)
    return folder


def test_an_oversized_cifar_batch_is_refused_before_reading(tmp_path: Path) -> None:
    folder = _cifar10(tmp_path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    with (folder / "data_batch_3").open("r+b") as f:  # sparse: costs no disk
        f.truncate(data.MAX_CIFAR_BATCH_BYTES + 1)
    with pytest.raises(DatasetError, match="more than a CIFAR batch may have"):
        load_data("cifar10", tmp_path, augment=False)


def test_a_cifar_batch_of_millions_of_objects_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "MAX_CIFAR_PICKLE_OPS", 5_000)
    # 10,000 labels pickle to about 10,000 opcodes: past the (lowered) budget.
    _cifar10(tmp_path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": list(range(10_000))})
    with pytest.raises(DatasetError, match="pickle operations"):
        load_data("cifar10", tmp_path, augment=False)


def test_a_real_sized_cifar_batch_is_within_the_opcode_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, 10_000)],
        b"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(10_000)],
    }
    path = tmp_path / "batch"
    _dump(path, batch)
    data._check_pickle_budget(path)  # a real layout passes with a wide margin
    import pickletools

    with path.open("rb") as f:
        ops = sum(1 for _ in pickletools.genops(f))
    assert ops * 5 * 4 < data.MAX_CIFAR_PICKLE_OPS  # 50,000 rows (CIFAR-100 train) x 4 margin


def test_an_oversized_mnist_file_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    names += ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name in names:
        (raw / name).write_bytes(b"\0" * 16)
    with (raw / names[0]).open("r+b") as f:
        f.truncate(data.MAX_IDX_BYTES + 1)
    with pytest.raises(DatasetError, match="more than an MNIST file may have"):
        load_data("mnist", tmp_path)


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    for i, size in enumerate(sizes):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(folder / f"{i}.png")
    return root


def test_an_image_declaring_too_many_pixels_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 40 * 40)
    _folder(tmp_path, [(8, 8)] * 9 + [(41, 40)])
    with pytest.raises(DatasetError, match="is more than 1600 pixels"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_an_image_folder_past_the_decoded_budget_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "MAX_FOLDER_DECODED_BYTES", 10 * 8 * 8 * 3 - 1)
    _folder(tmp_path, [(8, 8)] * 12)
    with pytest.raises(DatasetError, match="decoded"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_an_image_folder_with_too_many_images_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "MAX_FOLDER_IMAGES", 5)
    _folder(tmp_path, [(8, 8)] * 12)
    with pytest.raises(DatasetError, match="more than 5 images"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)
