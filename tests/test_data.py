"""Tests of dataset loading: digits, CIFAR and MNIST files in their real formats, image folders."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from ticketguard.errors import ConfigError, DatasetError
from ticketguard.tickets.data import (
    DATASETS,
    AugmentedImages,
    DataSplits,
    _digits_arrays,
    _digits_split_indices,
    _stratified_split,
    dataset_info,
    load_data,
)

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616]).reshape(3, 1, 1)


def _tensors(ds: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(ds, TensorDataset)
    return ds.tensors[0], ds.tensors[1]


# --- spec handling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("digits", (10, (1, 8, 8))),
        ("cifar10", (10, (3, 32, 32))),
        ("cifar100", (100, (3, 32, 32))),
        ("mnist", (10, (1, 28, 28))),
        ("fashion-mnist", (10, (1, 28, 28))),
    ],
)
def test_dataset_info_of_named_datasets(spec: str, expected: tuple) -> None:
    assert dataset_info(spec) == expected


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'") as info:
        load_data("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    assert "imagefolder:PATH" in str(info.value)
    with pytest.raises(DatasetError, match="unknown dataset"):
        dataset_info("svhn")


def test_imagefolder_spec_needs_a_path() -> None:
    with pytest.raises(DatasetError, match="names no folder"):
        load_data("imagefolder:")


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="split_seed"):
        load_data("digits", split_seed=-1)
    with pytest.raises(ConfigError, match="image_size"):
        load_data("digits", image_size=16)
    with pytest.raises(ConfigError, match="image_size"):
        dataset_info("cifar10", image_size=64)


# --- stratified splitting ----------------------------------------------------------------------


def test_stratified_split_is_a_deterministic_stratified_partition() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    held, rest = _stratified_split(labels, [10], seed=3)
    assert len(held) == 10 and len(rest) == 90
    assert sorted(np.concatenate([held, rest]).tolist()) == list(range(100))
    assert np.bincount(labels[held], minlength=4).tolist() == [1, 2, 3, 4]
    again = _stratified_split(labels, [10], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip([held, rest], again, strict=True))
    assert not np.array_equal(held, _stratified_split(labels, [10], seed=4)[0])


# --- digits ------------------------------------------------------------------------------------


def test_digits_splits_partition_the_data() -> None:
    splits = load_data("digits")
    assert isinstance(splits, DataSplits)
    assert splits.name == "digits"
    assert (splits.num_classes, splits.input_shape) == (10, (1, 8, 8))
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [1258, 180, 359]
    assert sum(sizes) == 1797

    _x, y = _digits_arrays()
    train, val, test = _digits_split_indices(y, 0)
    assert [len(train), len(val), len(test)] == sizes
    assert len(set(train) | set(val) | set(test)) == 1797


def test_digits_tensors_are_standardised_rows_of_their_split() -> None:
    splits = load_data("digits", split_seed=0)
    raw_x, raw_y = _digits_arrays()
    train, val, test = _digits_split_indices(raw_y, 0)
    mean, std = raw_x[train].mean(dtype=np.float64), raw_x[train].std(dtype=np.float64)
    for ds, idx in ((splits.train, train), (splits.val, val), (splits.test, test)):
        x, y = _tensors(ds)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == (1, 8, 8)
        np.testing.assert_allclose(x.numpy() * std + mean, raw_x[idx], atol=1e-5)
        assert np.array_equal(y.numpy(), raw_y[idx])
    x_train = _tensors(splits.train)[0]
    assert abs(float(x_train.mean())) < 1e-5
    assert abs(float(x_train.std()) - 1.0) < 1e-3
    item_x, item_y = splits.test[0]
    assert item_x.shape == (1, 8, 8) and int(item_y) == int(raw_y[test[0]])


def test_digits_split_is_stratified_with_every_class_everywhere() -> None:
    splits = load_data("digits", split_seed=7)
    class_sizes = np.bincount(_digits_arrays()[1])
    for ds, fraction in ((splits.train, 0.7), (splits.val, 0.1), (splits.test, 0.2)):
        counts = np.bincount(_tensors(ds)[1].numpy(), minlength=10)
        assert (counts > 0).all()
        assert np.abs(counts - fraction * class_sizes).max() <= 1.5


def test_digits_split_depends_only_on_the_seed() -> None:
    first = load_data("digits", split_seed=0)
    second = load_data("digits", split_seed=0)
    other = load_data("digits", split_seed=1)
    for name in ("train", "val", "test"):
        a, b = _tensors(getattr(first, name)), _tensors(getattr(second, name))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    y = _digits_arrays()[1]
    assert not np.array_equal(_digits_split_indices(y, 0)[2], _digits_split_indices(y, 1)[2])
    assert not torch.equal(_tensors(first.test)[0], _tensors(other.test)[0])


# --- CIFAR -------------------------------------------------------------------------------------


def _cifar_rows(n: int, first_id: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Random uint8 rows whose first two bytes encode a row id and whose label is id % classes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    ids = np.arange(first_id, first_id + n)
    data[:, 0], data[:, 1] = ids // 256, ids % 256
    return data, [int(i % num_classes) for i in ids]


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root: Path, per_batch: int = 20, n_test: int = 12) -> Path:
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        data, labels = _cifar_rows(per_batch, b * per_batch, 10, seed=b)
        _dump(
            folder / f"data_batch_{b + 1}", {b"batch_label": b"x", b"data": data, b"labels": labels}
        )
    data, labels = _cifar_rows(n_test, 1000, 10, seed=99)
    data[3] = 0
    data[3, 2 * 1024 + 5 * 32 + 7] = 255  # channel 2 (blue), row 5, column 7
    _dump(folder / "test_batch", {b"batch_label": b"t", b"data": data, b"labels": labels})
    return folder


def _denormalise_cifar10(x: torch.Tensor) -> np.ndarray:
    return np.rint((x.numpy() * CIFAR10_STD + CIFAR10_MEAN) * 255).astype(np.int64)


def test_cifar10_reads_real_batch_format(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    splits = load_data("cifar10", tmp_path, augment=False)
    assert (splits.num_classes, splits.input_shape) == (10, (3, 32, 32))
    # 100 official training rows: validation is min(5000, 10%) = 10 rows.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 12)

    test_x, test_y = _tensors(splits.test)
    assert test_x.dtype == torch.float32 and test_x.shape == (12, 3, 32, 32)
    data, labels = _cifar_rows(12, 1000, 10, seed=99)
    assert test_y.tolist() == labels
    pixels = _denormalise_cifar10(test_x)
    assert pixels[3, 2, 5, 7] == 255
    assert pixels[3].sum() == 255
    data[3] = 0
    data[3, 2 * 1024 + 5 * 32 + 7] = 255
    assert np.array_equal(pixels, data.reshape(12, 3, 32, 32))

    seen = []
    for ds in (splits.train, splits.val):
        x, y = _tensors(ds)
        px = _denormalise_cifar10(x)
        ids = px[:, 0, 0, 0] * 256 + px[:, 0, 0, 1]
        assert y.tolist() == (ids % 10).tolist()
        seen += ids.tolist()
    assert sorted(seen) == list(range(100))
    assert np.bincount(_tensors(splits.val)[1].numpy(), minlength=10).tolist() == [1] * 10


def test_cifar10_split_seed_picks_the_validation_rows(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    a = _tensors(load_data("cifar10", tmp_path, augment=False, split_seed=0).val)[0]
    b = _tensors(load_data("cifar10", tmp_path, augment=False, split_seed=0).val)[0]
    c = _tensors(load_data("cifar10", tmp_path, augment=False, split_seed=5).val)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cifar10_train_augmentation_is_a_padded_crop_and_flip(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    splits = load_data("cifar10", tmp_path, augment=True)
    assert isinstance(splits.train, AugmentedImages)
    assert isinstance(splits.val, TensorDataset) and isinstance(splits.test, TensorDataset)
    plain_x, plain_y = _tensors(load_data("cifar10", tmp_path, augment=False).train)
    assert torch.equal(splits.train.labels, plain_y)
    assert np.array_equal(splits.train.images.numpy(), _denormalise_cifar10(plain_x))

    torch.manual_seed(0)
    padded = torch.nn.functional.pad(splits.train.images.float(), (4, 4, 4, 4))
    mean, std = torch.tensor(CIFAR10_MEAN).float(), torch.tensor(CIFAR10_STD).float()
    shifted = flipped = 0
    for i in range(20):
        x, y = splits.train[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
        source = x * std + mean
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.allclose(
                source,
                (lambda c: c.flip(-1) if flip else c)(
                    padded[i, :, top : top + 32, left : left + 32]
                )
                / 255,
                atol=1e-4,
            )
        ]
        assert matches, f"item {i} is not a crop of its padded image"
        shifted += (matches[0][0], matches[0][1]) != (4, 4)
        flipped += matches[0][2]
    assert shifted > 0 and 0 < flipped < 20


def test_cifar100_reads_fine_labels_and_str_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    data, labels = _cifar_rows(200, 0, 100, seed=1)
    _dump(folder / "train", {"data": data, "fine_labels": labels, "coarse_labels": [0] * 200})
    test_data, test_labels = _cifar_rows(30, 500, 100, seed=2)
    _dump(folder / "test", {b"data": test_data, b"fine_labels": test_labels})
    splits = load_data("cifar100", tmp_path, augment=False)
    assert (splits.num_classes, splits.input_shape) == (100, (3, 32, 32))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 30)
    assert _tensors(splits.test)[1].tolist() == test_labels
    train_y = _tensors(splits.train)[1].tolist() + _tensors(splits.val)[1].tolist()
    assert sorted(train_y) == sorted(labels)


class _Payload:
    """An object whose unpickling creates a file: what a malicious dataset file would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_malicious_cifar_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path / "data")
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps({b"data": _Payload(control)}, protocol=2))
    assert control.exists(), "the payload must be live for this test to mean anything"

    target = tmp_path / "pwned.txt"
    _dump(folder / "data_batch_3", {b"data": _Payload(target), b"labels": [0]})
    with pytest.raises(DatasetError, match="refusing to load .*data_batch_3"):
        load_data("cifar10", tmp_path / "data")
    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x02}q\x00(U\x04data", "cannot read"),
        (pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        (pickle.dumps({b"labels": [0]}, protocol=2), "no 'data' entry"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "0..9"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integers"),
    ],
)
def test_malformed_cifar_batches_are_dataset_errors(
    tmp_path: Path, content: bytes, message: str
) -> None:
    folder = _write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_data("cifar10", tmp_path)


def test_missing_cifar_without_download_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-10-batches-py.*download=True / --download"):
        load_data("cifar10", tmp_path)
    with pytest.raises(DatasetError, match="cifar-100-python.*--download"):
        load_data("cifar100", tmp_path / "nowhere")


# --- MNIST / Fashion-MNIST ---------------------------------------------------------------------


def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIII", 2051, len(images), 28, 28)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.astype(np.uint8).tobytes())
    label_header = struct.pack(">II", 2049, len(labels))
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        label_header + labels.astype(np.uint8).tobytes()
    )


def _mnist_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[0, 3, 20] = 255
    return images, np.arange(n) % 10


@pytest.mark.parametrize(
    ("spec", "folder", "mean", "std"),
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion-mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_family_reads_idx_files(
    tmp_path: Path, spec: str, folder: str, mean: float, std: float
) -> None:
    raw = tmp_path / folder / "raw"
    train_images, train_labels = _mnist_images(50, seed=1)
    test_images, test_labels = _mnist_images(12, seed=2)
    _write_idx(raw, "train", train_images, train_labels)
    _write_idx(raw, "t10k", test_images, test_labels)

    splits = load_data(spec, tmp_path)
    assert (splits.num_classes, splits.input_shape) == (10, (1, 28, 28))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 12)
    x, y = _tensors(splits.test)
    assert x.dtype == torch.float32 and x.shape == (12, 1, 28, 28)
    assert y.tolist() == test_labels.tolist()
    pixels = np.rint((x.numpy() * std + mean) * 255)
    assert np.array_equal(pixels[:, 0], test_images)
    assert pixels[0, 0, 3, 20] == 255 and pixels[0].sum() == 255

    train_x = torch.cat([_tensors(splits.train)[0], _tensors(splits.val)[0]])
    restored = np.rint((train_x.numpy()[:, 0] * std + mean) * 255)
    assert sorted(map(bytes, restored.astype(np.uint8))) == sorted(map(bytes, train_images))


def test_mnist_missing_or_malformed_files_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="MNIST.*train-images-idx3-ubyte.*download=True"):
        load_data("mnist", tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images, labels = _mnist_images(20, seed=0)
    _write_idx(raw, "train", images, labels[:15])
    _write_idx(raw, "t10k", images, labels)
    with pytest.raises(DatasetError, match="20 images but labels"):
        load_data("mnist", tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    _write_idx(raw, "train", images, labels)
    with pytest.raises(DatasetError, match="cannot load MNIST"):
        load_data("mnist", tmp_path)


# --- image folders -----------------------------------------------------------------------------


def _png(path: Path, channel: int, value: int, size: tuple[int, int]) -> None:
    """Write a solid-colour PNG: `value` in one RGB channel, zero in the others."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., channel] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _class_folder(folder: Path, classes: dict[str, int], count: int, first_value: int = 40) -> None:
    """Fill folder/CLASS/ with `count` PNGs of varied sizes; class `name` uses channel classes[name]."""
    for name, channel in classes.items():
        for i in range(count):
            size = (6 + 3 * i, 5 + 2 * channel + i)
            _png(folder / name / f"img{i}.png", channel, first_value + 20 * i + channel, size)


def _decode(ds: TensorDataset) -> list[tuple[int, int, int]]:
    """Return (label, dominant channel, intensity) per item of a 0.5/0.5-normalised dataset."""
    x, y = _tensors(ds)
    pixels = np.rint((x.numpy() * 0.5 + 0.5) * 255).astype(int)
    out = []
    for image, label in zip(pixels, y.tolist(), strict=True):
        channel = int(image.reshape(3, -1).max(axis=1).argmax())
        assert (image[channel] == image[channel, 0, 0]).all(), "a solid image must stay solid"
        assert (np.delete(image, channel, axis=0) == 0).all()
        out.append((label, channel, int(image[channel, 0, 0])))
    return out


def test_imagefolder_flat_layout_is_split_80_10_10(tmp_path: Path) -> None:
    _class_folder(tmp_path / "pets", {"emu": 2, "cat": 0, "dog": 1}, count=10)
    spec = f"imagefolder:{tmp_path / 'pets'}"
    assert dataset_info(spec) == (3, (3, 32, 32))
    assert dataset_info(spec, image_size=12) == (3, (3, 12, 12))

    splits = load_data(spec, augment=False, image_size=12)
    assert splits.name == spec
    assert (splits.num_classes, splits.input_shape) == (3, (3, 12, 12))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 3, 3)
    seen = []
    for ds in (splits.train, splits.val, splits.test):
        assert _tensors(ds)[0].shape[1:] == (3, 12, 12)
        decoded = _decode(ds)
        # classes are sorted by name: cat (red) = 0, dog (green) = 1, emu (blue) = 2
        assert all(label == channel for label, channel, _v in decoded)
        seen += [(label, value) for label, _c, value in decoded]
    expected = [(c, 40 + 20 * i + c) for c in range(3) for i in range(10)]
    assert sorted(seen) == sorted(expected)
    assert sorted(label for label, _c, _v in _decode(splits.val)) == [0, 1, 2]


def test_imagefolder_split_is_deterministic_per_seed(tmp_path: Path) -> None:
    _class_folder(tmp_path, {"a": 0, "b": 1}, count=10)
    spec = f"imagefolder:{tmp_path}"
    first = load_data(spec, augment=False, split_seed=0)
    again = load_data(spec, augment=False, split_seed=0)
    other = load_data(spec, augment=False, split_seed=2)
    assert _decode(first.test) == _decode(again.test)
    assert _decode(first.train) == _decode(again.train)
    assert _decode(first.test) != _decode(other.test)


def test_imagefolder_with_split_folders_and_a_missing_class(tmp_path: Path) -> None:
    _class_folder(tmp_path / "train", {"apple": 0, "banana": 1, "cherry": 2}, count=4)
    _class_folder(tmp_path / "val", {"banana": 1}, count=2, first_value=200)
    _class_folder(tmp_path / "test", {"cherry": 2, "apple": 0}, count=3, first_value=150)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    splits = load_data(f"imagefolder:{tmp_path}", augment=False, image_size=8)
    assert (splits.num_classes, splits.input_shape) == (3, (3, 8, 8))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 2, 6)
    assert sorted(_decode(splits.val)) == [(1, 1, 201), (1, 1, 221)]
    assert sorted(label for label, _c, _v in _decode(splits.test)) == [0, 0, 0, 2, 2, 2]
    assert all(label == channel for label, channel, _v in _decode(splits.train))


def test_imagefolder_train_only_carves_val_and_test(tmp_path: Path) -> None:
    _class_folder(tmp_path / "train", {"x": 0, "y": 1}, count=10)
    splits = load_data(f"imagefolder:{tmp_path}", augment=True, image_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 2, 2)
    assert isinstance(splits.train, AugmentedImages) and splits.train.padding == 2
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty has no class sub-folders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="class folder .*cls has no images"):
        dataset_info(f"imagefolder:{tmp_path / 'hollow'}")

    _class_folder(tmp_path / "split" / "train", {"a": 0}, count=3)
    _class_folder(tmp_path / "split" / "val", {"zebra": 1}, count=1)
    with pytest.raises(DatasetError, match="zebra is not a class of the train split"):
        load_data(f"imagefolder:{tmp_path / 'split'}")

    _class_folder(tmp_path / "broken", {"a": 0, "b": 1}, count=3)
    (tmp_path / "broken" / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*bad.png"):
        load_data(f"imagefolder:{tmp_path / 'broken'}")

    _class_folder(tmp_path / "tiny", {"a": 0}, count=2)
    with pytest.raises(DatasetError, match="too few"):
        load_data(f"imagefolder:{tmp_path / 'tiny'}")
