"""Datasets: load a named dataset (or a folder of images) as deterministic train/val/test splits.

Every split yields `(x, y)` with `x` a float32 tensor of shape `input_shape` and `y` an integer
label. In-memory splits are `TensorDataset`s so the trainer can index their tensors directly; a
training split with augmentation is an `AugmentedImages` dataset instead.

Split rules (all stratified by label and a pure function of `split_seed`):

* digits: 20% test, 10% validation, the rest train.
* cifar10 / cifar100 / mnist / fashion-mnist: the official test set; the validation set is
  `min(5000, round(10% of the official train set))` samples (at least 1), the rest train.
* imagefolder: `train/`, `val/`, `test/` sub-folders where present; a missing `val/` or `test/`
  takes 10% of `train/`; a folder of class folders alone is split 80/10/10.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ticketguard.errors import ConfigError, DatasetError

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist")
IMAGEFOLDER_PREFIX = "imagefolder:"
DEFAULT_IMAGE_SIZE = 32
MAX_VAL_SIZE = 5000

# Budgets of the dataset readers (docs/limits.md). Real files sit far below each one.
#: Largest CIFAR batch file read (CIFAR-100's `train` is 155 MB, a CIFAR-10 batch 31 MB).
MAX_CIFAR_BATCH_BYTES = 256 << 20
#: Most pickle opcodes in a CIFAR batch (a real one has about 200,000: labels and filenames),
#: so a small file cannot unpickle into millions of Python objects.
MAX_CIFAR_PICKLE_OPS = 2_000_000
#: Largest raw MNIST IDX file (the training images are 47 MB).
MAX_IDX_BYTES = 128 << 20
#: Most images an image folder may list, and most pixels one image may declare before decoding.
MAX_FOLDER_IMAGES = 1_000_000
MAX_IMAGE_PIXELS = 64 << 20
#: Largest decoded image folder in memory (N x 3 x size x size bytes).
MAX_FOLDER_DECODED_BYTES = 8 << 30
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_INFO: dict[str, tuple[int, tuple[int, int, int]]] = {
    "digits": (10, (1, 8, 8)),
    "cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
    "mnist": (10, (1, 28, 28)),
    "fashion-mnist": (10, (1, 28, 28)),
}


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test datasets of one dataset spec, with its class count and shape."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


class AugmentedImages(Dataset):
    """Serve uint8 images with a random padded crop and horizontal flip, normalised per item.

    Randomness comes from torch's global RNG, which the trainer seeds. The padding is black
    (zero before normalisation), as with torchvision's `RandomCrop(padding=...)`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(labels) != len(images):
            raise ValueError("images and labels differ in length")
        self.labels = labels.to(torch.int64)
        self.padding = padding
        self._size = tuple(images.shape[2:])
        self._padded = torch.nn.functional.pad(images, (padding,) * 4)
        channels = images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)

    @property
    def images(self) -> torch.Tensor:
        """The unaugmented uint8 images (a view into the padded store)."""
        height, width = self._size
        p = self.padding
        return self._padded[:, :, p : p + height, p : p + width]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        height, width = self._size
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        x = self._padded[index, :, top : top + height, left : left + width]
        if torch.randint(0, 2, ()).item():
            x = x.flip(-1)
        x = x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
        return x, int(self.labels[index])


def dataset_info(spec: str, *, image_size: int | None = None) -> tuple[int, tuple[int, int, int]]:
    """Return (num_classes, input_shape) of a dataset spec without loading its data."""
    name, folder = _parse_spec(spec)
    if folder is None:
        _check_native_size(name, image_size)
        return _INFO[name]
    size = _check_image_size(image_size)
    return len(_scan_imagefolder(folder).classes), (3, size, size)


def load_data(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    split_seed: int = 0,
    augment: bool = True,
    image_size: int | None = None,
) -> DataSplits:
    """Load a dataset spec as deterministic train/val/test splits."""
    name, folder = _parse_spec(spec)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    if folder is not None:
        return _load_imagefolder(spec, folder, split_seed, augment, _check_image_size(image_size))
    _check_native_size(name, image_size)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "digits":
        return _load_digits(spec, split_seed)
    if name in _CIFAR:
        return _load_cifar(spec, name, root, download, split_seed, augment)
    return _load_mnist(spec, name, root, download, split_seed)


def pixel_normalization(
    spec: str, *, split_seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel (mean, std) that turn pixels in [0, 1] into a dataset's model inputs.

    A model input is `(pixel / 255 - mean) / std` for uint8 pixels, exactly as the dataset's own
    splits are made, so images from elsewhere (trigger sets, a prediction server's PNG inputs)
    reach the model on the scale it was trained on. Digits are standardised with the statistics
    of their training split, so the answer depends on `split_seed`; no data is downloaded.
    """
    name, folder = _parse_spec(spec)
    if folder is not None:
        return (0.5,) * 3, (0.5,) * 3
    if name == "digits":
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise ConfigError(f"split_seed must be a non-negative integer, got {split_seed!r}")
        x, y = _digits_arrays()
        train, _val, _test = _digits_split_indices(y, split_seed)
        return (float(x[train].mean(dtype=np.float64)),), (float(x[train].std(dtype=np.float64)),)
    if name in _CIFAR:
        return _CIFAR[name].mean, _CIFAR[name].std
    mean, std = _MNIST_STATS[name]
    return (mean,), (std,)


def default_data_dir() -> Path:
    """Return the data directory used when none is given ($TICKETGUARD_DATA or a user cache)."""
    env = os.environ.get("TICKETGUARD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ticketguard" / "data"


# --- specs and splitting ---------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    if not isinstance(spec, str):
        raise DatasetError(f"a dataset spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if text.lower().startswith(IMAGEFOLDER_PREFIX):
        path = text[len(IMAGEFOLDER_PREFIX) :].strip()
        if not path:
            raise DatasetError(f"dataset spec {spec!r} names no folder; use imagefolder:PATH")
        return "imagefolder", Path(path).expanduser()
    name = text.lower()
    if name not in _INFO:
        known = ", ".join(DATASETS)
        raise DatasetError(f"unknown dataset {spec!r}; known: {known}, {IMAGEFOLDER_PREFIX}PATH")
    return name, None


def _check_image_size(image_size: int | None) -> int:
    if image_size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def _check_native_size(name: str, image_size: int | None) -> None:
    native = _INFO[name][1][1]
    if image_size is not None and image_size != native:
        raise ConfigError(
            f"dataset {name!r} has {native}x{native} images; image_size={image_size} applies "
            f"only to {IMAGEFOLDER_PREFIX}PATH datasets"
        )


def _holdout_size(n: int, fraction: float, cap: int | None = None) -> int:
    size = max(1, round(n * fraction))
    return size if cap is None else min(size, cap)


def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Order sample indices so that every prefix holds each class in proportion to its size."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def _stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split indices into hold-out sets of the given sizes plus the rest, each sorted ascending."""
    order = _stratified_order(np.asarray(labels), seed)
    bounds = np.cumsum([0, *sizes])
    parts = [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [*parts, np.sort(order[bounds[-1] :])]


def _train_val_split(what: str, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split an official train set into (train, val) indices by the validation size rule."""
    n = len(labels)
    if n < 2:
        raise DatasetError(f"{what} has {n} training samples; at least 2 are needed")
    val, train = _stratified_split(labels, [_holdout_size(n, 0.1, MAX_VAL_SIZE)], seed)
    return train, val


def _holdout_splits(
    what: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    split_seed: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Split an official training set into train and validation; keep the official test set."""
    train_np, val_np = _train_val_split(what, train_y.numpy(), split_seed)
    train, val = torch.from_numpy(train_np), torch.from_numpy(val_np)
    return {
        "train": (train_x[train], train_y[train]),
        "val": (train_x[val], train_y[val]),
        "test": test,
    }


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) images to float32 in [0, 1] and normalise per channel."""
    shape = (1, len(mean), 1, 1)
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def _image_splits(
    spec: str,
    num_classes: int,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    mean: Sequence[float],
    std: Sequence[float],
    augment_padding: int | None,
) -> DataSplits:
    """Build DataSplits from uint8 image tensors; augment the train split when padding is given."""
    datasets: dict[str, Dataset] = {
        key: TensorDataset(_normalise(x, mean, std), y.to(torch.int64))
        for key, (x, y) in splits.items()
        if key != "train" or augment_padding is None
    }
    if augment_padding is not None:
        x, y = splits["train"]
        datasets["train"] = AugmentedImages(x, y, mean, std, augment_padding)
    shape = tuple(splits["train"][0].shape[1:])
    return DataSplits(
        spec, datasets["train"], datasets["val"], datasets["test"], num_classes, shape
    )


# --- digits ------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as (x float32 (N, 1, 8, 8) in [0, 1], y int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64)


def _digits_split_indices(labels: np.ndarray, split_seed: int) -> tuple[np.ndarray, ...]:
    """Return the (train, val, test) indices of the digits split for `split_seed`."""
    n = len(labels)
    test, val, train = _stratified_split(
        labels, [_holdout_size(n, 0.2), _holdout_size(n, 0.1)], split_seed
    )
    return train, val, test


def _load_digits(spec: str, split_seed: int) -> DataSplits:
    x, y = _digits_arrays()
    train, val, test = _digits_split_indices(y, split_seed)
    mean = float(x[train].mean(dtype=np.float64))
    std = float(x[train].std(dtype=np.float64))
    x = ((x - mean) / std).astype(np.float32)

    def part(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return DataSplits(spec, part(train), part(val), part(test), *_INFO["digits"])


# --- CIFAR -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}
_CIFAR_PADDING = 4


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """Return the only globals a CIFAR batch pickle may reference: numpy array rebuilding."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays; refuse every other global (no code runs)."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load {self._path}: it references {module}.{name}, which a CIFAR "
                "batch never needs (the file may be malicious)"
            ) from None


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode("ascii"), key):
        if candidate in batch:
            return batch[candidate]
    raise DatasetError(f"{path} is not a CIFAR batch: it has no {key!r} entry")


def _check_pickle_budget(path: Path) -> None:
    """Refuse a batch file past the size budget, or one holding too many pickle opcodes."""
    import pickletools

    size = path.stat().st_size
    if size > MAX_CIFAR_BATCH_BYTES:
        raise DatasetError(
            f"{path}: {size} bytes is more than a CIFAR batch may have ({MAX_CIFAR_BATCH_BYTES})"
        )
    with path.open("rb") as f:
        for count, _op in enumerate(pickletools.genops(f), 1):
            if count > MAX_CIFAR_PICKLE_OPS:
                raise DatasetError(
                    f"{path}: more than {MAX_CIFAR_PICKLE_OPS} pickle operations; not a CIFAR batch"
                )


def _read_cifar_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file safely as (uint8 data (N, 3072), int64 labels (N,))."""
    try:
        _check_pickle_budget(path)
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "bad file"
        raise DatasetError(f"cannot read {path} as a CIFAR batch: {_describe(exc)}") from None
    if not isinstance(batch, dict):
        raise DatasetError(
            f"{path} is not a CIFAR batch: expected a dict, got {type(batch).__name__}"
        )
    data = _field(batch, "data", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or data.shape[0] == 0
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a non-empty uint8 array (N, 3072), got {got}")
    try:
        labels = np.asarray(_field(batch, layout.label_key, path))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {layout.label_key!r} is not a list of labels: {exc}") from None
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: {layout.label_key!r} must hold {len(data)} integers, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= layout.num_classes:
        raise DatasetError(
            f"{path}: labels must lie in 0..{layout.num_classes - 1}, "
            f"got {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)


def _download_cifar(name: str, layout: _CifarLayout, root: Path) -> None:
    """Fetch and extract the official CIFAR archive (md5-checked) without unpickling it."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    source = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        download_and_extract_archive(
            source.url, str(root), filename=source.filename, md5=source.tgz_md5
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise DatasetError(
            f"could not download {layout.title} into {root}: {_describe(exc)}"
        ) from None


def _read_cifar_files(
    folder: Path, names: Sequence[str], layout: _CifarLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(folder / name, layout) for name in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels)


def _load_cifar(
    spec: str, name: str, root: Path, download: bool, split_seed: int, augment: bool
) -> DataSplits:
    layout = _CIFAR[name]
    folder = root / layout.folder

    def missing() -> list[Path]:
        return [
            p
            for p in (folder / f for f in layout.train_files + layout.test_files)
            if not p.is_file()
        ]

    if missing():
        if not download:
            raise DatasetError(
                f"{layout.title} not found: {missing()[0]} does not exist (expected the python-version "
                f"files under {folder}); pass download=True / --download to fetch it"
            )
        _download_cifar(name, layout, root)
        if missing():
            raise DatasetError(
                f"{layout.title} download finished but {missing()[0]} is still missing"
            )
    train_x, train_y = _read_cifar_files(folder, layout.train_files, layout)
    test_x, test_y = _read_cifar_files(folder, layout.test_files, layout)
    splits = _holdout_splits(
        f"{layout.title} under {folder}", train_x, train_y, (test_x, test_y), split_seed
    )
    padding = _CIFAR_PADDING if augment else None
    return _image_splits(spec, layout.num_classes, splits, layout.mean, layout.std, padding)


# --- MNIST and Fashion-MNIST -------------------------------------------------------------------

_MNIST_STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


def _load_mnist(spec: str, name: str, root: Path, download: bool, split_seed: int) -> DataSplits:
    from torchvision.datasets import MNIST, FashionMNIST

    source = MNIST if name == "mnist" else FashionMNIST
    raw = root / source.__name__ / "raw"
    files = [raw / os.path.splitext(os.path.basename(url))[0] for url, _md5 in source.resources]
    missing = [path for path in files if not path.is_file()]
    if missing and not download:
        raise DatasetError(
            f"{source.__name__} not found: {missing[0]} does not exist; "
            "pass download=True / --download to fetch it"
        )
    if missing:
        try:
            source(root=str(root), train=True, download=True)
        except Exception as exc:  # network, checksum and extraction failures
            raise DatasetError(
                f"could not download {source.__name__} into {raw}: {_describe(exc)}"
            ) from None
    for path in files:
        if path.stat().st_size > MAX_IDX_BYTES:
            raise DatasetError(
                f"{path}: {path.stat().st_size} bytes is more than an MNIST file may have "
                f"({MAX_IDX_BYTES})"
            )
    loaded: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    for train in (True, False):
        try:
            ds = source(root=str(root), train=train)
        except Exception as exc:  # torchvision reports bad IDX files with asserts and many types
            raise DatasetError(
                f"cannot load {source.__name__} from {raw}: {_describe(exc)}"
            ) from None
        images, labels = ds.data, ds.targets
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DatasetError(
                f"{raw}: {source.__name__} images must be uint8 (N, 28, 28), got {tuple(images.shape)}"
            )
        if labels.shape != (len(images),):
            raise DatasetError(
                f"{raw}: {len(images)} images but labels of shape {tuple(labels.shape)}"
            )
        if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
            raise DatasetError(f"{raw}: {source.__name__} labels must be a non-empty list of 0..9")
        loaded[train] = images.unsqueeze(1), labels.to(torch.int64)
    train_x, train_y = loaded[True]
    splits = _holdout_splits(
        f"{source.__name__} under {raw}", train_x, train_y, loaded[False], split_seed
    )
    mean, std = _MNIST_STATS[name]
    return _image_splits(spec, 10, splits, (mean,), (std,), None)


# --- image folders -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _FolderPlan:
    classes: tuple[str, ...]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]] | None
    test: list[tuple[Path, int]] | None


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _scan_split(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """List (image, label) pairs of a val/test folder; its classes must be classes of train."""
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for class_dir in _subdirs(folder):
        if class_dir.name not in index:
            raise DatasetError(f"class folder {class_dir} is not a class of the train split")
        samples += [(p, index[class_dir.name]) for p in _images_in(class_dir)]
    if not samples:
        raise DatasetError(f"image folder {folder} has no images in class sub-folders")
    return samples


def _scan_imagefolder(root: Path) -> _FolderPlan:
    """List the classes and image files of an image folder without decoding any image."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    has_splits = (root / "train").is_dir()
    base = root / "train" if has_splits else root
    class_dirs = _subdirs(base)
    if not class_dirs:
        raise DatasetError(
            f"image folder {base} has no class sub-folders (expected {base}/CLASS/*.png)"
        )
    train: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        files = _images_in(class_dir)
        if not files:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"class folder {class_dir} has no images ({exts})")
        train += [(p, label) for p in files]
        if len(train) > MAX_FOLDER_IMAGES:
            raise DatasetError(f"image folder {base} has more than {MAX_FOLDER_IMAGES} images")
    classes = tuple(d.name for d in class_dirs)

    def optional(split: str) -> list[tuple[Path, int]] | None:
        folder = root / split
        return _scan_split(folder, classes) if has_splits and folder.is_dir() else None

    return _FolderPlan(classes, train, optional("val"), optional("test"))


def _read_images(
    samples: Sequence[tuple[Path, int]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode images as RGB, resize to size x size, and return (uint8 (N, 3, S, S), int64 labels)."""
    from PIL import Image

    if len(samples) * size * size * 3 > MAX_FOLDER_DECODED_BYTES:
        raise DatasetError(
            f"{len(samples)} images of {size}x{size} need more than "
            f"{MAX_FOLDER_DECODED_BYTES >> 30} GiB decoded; use a smaller --image-size or folder"
        )
    pixels = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _label) in enumerate(samples):
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DatasetError(
                        f"cannot read image {path}: {width}x{height} is more than "
                        f"{MAX_IMAGE_PIXELS} pixels"
                    )
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                pixels[i] = np.asarray(rgb)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {_describe(exc)}") from None
    labels = torch.tensor([label for _path, label in samples], dtype=torch.int64)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels


def _load_imagefolder(
    spec: str, root: Path, split_seed: int, augment: bool, size: int
) -> DataSplits:
    plan = _scan_imagefolder(root)
    carve = [name for name in ("test", "val") if getattr(plan, name) is None]
    train_x, train_y = _read_images(plan.train, size)
    n = len(train_y)
    sizes = [_holdout_size(n, 0.1) for _ in carve]
    if n - sum(sizes) < 1:
        raise DatasetError(
            f"image folder {root} has {n} training images, too few to split off {' and '.join(carve)}"
        )
    *held, rest = _stratified_split(train_y.numpy(), sizes, split_seed)
    splits = {"train": (train_x[torch.from_numpy(rest)], train_y[torch.from_numpy(rest)])}
    for name, idx in zip(carve, held, strict=True):
        splits[name] = (train_x[torch.from_numpy(idx)], train_y[torch.from_numpy(idx)])
    for name in ("val", "test"):
        samples = getattr(plan, name)
        if samples is not None:
            splits[name] = _read_images(samples, size)
    padding = max(1, size // 8) if augment else None
    return _image_splits(spec, len(plan.classes), splits, (0.5,) * 3, (0.5,) * 3, padding)


def _describe(exc: BaseException, limit: int = 300) -> str:
    """Return an exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(exc).__name__
