"""Tests for B1 trigger sets: generation, the commitment, the JSON form and the folder loader."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ticketguard.errors import ConfigError, DatasetError, TriggerSetError
from ticketguard.signatures import triggers as triggers_module
from ticketguard.signatures.payload import KeyedStream
from ticketguard.signatures.triggers import (
    COMMITMENT_PREFIX,
    MAX_TRIGGERS,
    TRIGGER_FORMAT,
    TriggerSet,
    generate_triggers,
    load_trigger_folder,
)

SEED = b"\x00" * 32
OTHER_SEED = b"\x01" + b"\x00" * 31


def small_set(labels: list[int] | None = None, source: str = "generated") -> TriggerSet:
    """A 4-image 1x2x3 set with known pixels."""
    images = torch.arange(4 * 6, dtype=torch.uint8).view(4, 1, 2, 3) * 10
    labels = [0, 0, 1, 2] if labels is None else labels
    names = tuple(f"{i}.png" for i in range(4)) if source == "folder" else ()
    return TriggerSet(images, torch.tensor(labels, dtype=torch.int64), source, names)


# --- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 5, 17), (3, 224, 224)])
def test_generated_shapes_and_dtypes(shape: tuple[int, int, int]) -> None:
    ts = generate_triggers(SEED, 3, shape, 10)
    assert ts.images.dtype == torch.uint8 and ts.images.shape == (3, *shape)
    assert ts.images.is_contiguous() and ts.images.device.type == "cpu"
    assert ts.labels.dtype == torch.int64 and ts.labels.shape == (3,)
    assert ts.size == 3 and ts.input_shape == shape
    assert ts.source == "generated" and ts.names == ()


def test_generation_is_deterministic_and_seed_sensitive() -> None:
    a = generate_triggers(SEED, 50, (3, 32, 32), 10)
    b = generate_triggers(SEED, 50, (3, 32, 32), 10)
    assert a == b
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert a.commitment() == b.commitment()
    c = generate_triggers(OTHER_SEED, 50, (3, 32, 32), 10)
    assert a.labels.tolist() != c.labels.tolist()
    # No image of one seed reappears under the other.
    assert not any(torch.equal(x, y) for x in a.images for y in c.images)
    assert a.commitment() != c.commitment()


def test_generation_is_pinned() -> None:
    """The set for a fixed seed never changes: the credential commits to it across versions."""
    ts = generate_triggers(SEED, 8, (1, 8, 8), 10)
    assert ts.labels.tolist() == [8, 3, 0, 2, 1, 7, 1, 2]
    assert ts.commitment() == PINNED_COMMITMENT


PINNED_COMMITMENT = "73f5fc9b71c839bdfc1205f01b5a325ffc4b89173364efdcea0433bd03dd0216"


def test_labels_are_drawn_first_one_uniform_per_image() -> None:
    stream = KeyedStream(SEED, "B1 trigger set")
    expected = [stream.uniform(7) for _ in range(40)]
    assert generate_triggers(SEED, 40, (1, 8, 8), 7).labels.tolist() == expected
    # Labels do not depend on the image shape: they come before any image draw.
    assert generate_triggers(SEED, 40, (3, 16, 24), 7).labels.tolist() == expected


def test_labels_cover_classes_roughly_uniformly() -> None:
    ts = generate_triggers(b"uniformity", 2000, (1, 8, 8), 10)
    counts = torch.bincount(ts.labels, minlength=10)
    assert counts.numel() == 10 and int(ts.labels.min()) >= 0 and int(ts.labels.max()) <= 9
    # Binomial(2000, 0.1): mean 200, sd 13.4; six sd either side.
    assert all(120 <= int(n) <= 280 for n in counts), counts.tolist()
    assert ts.max_label_frequency() == int(counts.max()) / 2000


def test_labels_in_range_for_two_classes() -> None:
    ts = generate_triggers(SEED, 200, (1, 8, 8), 2)
    assert set(ts.labels.tolist()) == {0, 1}


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_generated_images_are_varied(shape: tuple[int, int, int]) -> None:
    ts = generate_triggers(b"variety", 300, shape, 10)
    flat = ts.images.flatten(1).to(torch.float64)
    assert bool((flat.std(dim=1) > 5).all()), "a generated image is (nearly) constant"
    assert len({bytes(row.numpy()) for row in ts.images.flatten(1)}) == 300
    assert float(flat.std()) > 40
    assert int(ts.images.min()) <= 5 and int(ts.images.max()) >= 250
    # Not the same picture in every channel: colour images have colour.
    if shape[0] == 3:
        assert not torch.equal(ts.images[:, 0], ts.images[:, 1])


@pytest.mark.parametrize(
    ("size", "shape", "classes"),
    [
        (0, (1, 8, 8), 10),
        (MAX_TRIGGERS + 1, (1, 8, 8), 10),
        (True, (1, 8, 8), 10),
        (5, (1, 8), 10),
        (5, (0, 8, 8), 10),
        (5, (1, 8, 8.0), 10),
        (5, (3, 2048, 2048), 10),
        (5, (1, 8, 8), 1),
        (5, (1, 8, 8), True),
    ],
)
def test_generate_rejects_bad_arguments(size: object, shape: object, classes: object) -> None:
    with pytest.raises(ConfigError):
        generate_triggers(SEED, size, shape, classes)  # type: ignore[arg-type]


def test_generate_rejects_empty_seed() -> None:
    with pytest.raises(ConfigError):
        generate_triggers(b"", 5, (1, 8, 8), 10)


# --- the TriggerSet type -------------------------------------------------------------------------


def test_commitment_byte_layout() -> None:
    ts = small_set()
    header = b'{"labels":[0,0,1,2],"shape":[4,1,2,3]}'
    raw = bytes(range(0, 240, 10))
    expected = hashlib.sha256(COMMITMENT_PREFIX + header + b"\x00" + raw).hexdigest()
    assert ts.commitment() == expected


def test_commitment_binds_every_pixel_and_label_but_not_source() -> None:
    ts = generate_triggers(SEED, 10, (3, 8, 8), 10)
    base = ts.commitment()
    assert len(base) == 64 and base == ts.commitment()
    for index in [(0, 0, 0, 0), (9, 2, 7, 7), (4, 1, 3, 5)]:
        images = ts.images.clone()
        images[index] ^= 1
        assert TriggerSet(images, ts.labels, "generated").commitment() != base
    labels = ts.labels.clone()
    labels[3] = (labels[3] + 1) % 10
    assert TriggerSet(ts.images, labels, "generated").commitment() != base
    # Same bytes under another shape is another set.
    reshaped = TriggerSet(ts.images.view(10, 3, 4, 16), ts.labels, "generated")
    assert reshaped.commitment() != base
    names = tuple(f"{i}.jpg" for i in range(10))
    assert TriggerSet(ts.images.clone(), ts.labels.clone(), "folder", names).commitment() == base


def test_inputs_normalisation() -> None:
    images = torch.tensor([0, 255, 51, 102], dtype=torch.uint8).view(1, 1, 2, 2)
    ts = TriggerSet(images, torch.tensor([0]), "generated")
    x = ts.inputs([0.5], [0.25])
    assert x.dtype == torch.float32 and x.shape == (1, 1, 2, 2)
    assert torch.allclose(x.flatten(), torch.tensor([-2.0, 2.0, -1.2, -0.4]), atol=1e-6)
    rgb = TriggerSet(
        torch.full((2, 3, 1, 1), 255, dtype=torch.uint8), torch.tensor([0, 1]), "generated"
    )
    y = rgb.inputs((0.0, 0.5, 1.0), (1.0, 0.5, 2.0))
    assert torch.allclose(y[:, :, 0, 0], torch.tensor([[1.0, 1.0, 0.0]] * 2))
    assert ts.images[0, 0, 0, 1] == 255  # the stored pixels are untouched


@pytest.mark.parametrize(
    ("mean", "std"), [([0.5, 0.5], [0.25]), ([0.5], [0.25, 0.25]), ([0.5], [0.0]), ([0.5], [-1.0])]
)
def test_inputs_rejects_bad_statistics(mean: list[float], std: list[float]) -> None:
    with pytest.raises(ConfigError):
        small_set().inputs(mean, std)


def test_max_label_frequency() -> None:
    assert small_set([0, 0, 1, 2]).max_label_frequency() == 0.5
    assert small_set([3, 3, 3, 3]).max_label_frequency() == 1.0
    assert small_set([4, 1, 2, 3]).max_label_frequency() == 0.25
    assert small_set([2**62, 0, 2**62, 1]).max_label_frequency() == 0.5


@pytest.mark.parametrize(
    ("images", "labels", "source", "names", "message"),
    [
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), "generated", (), "uint8"),
        (
            torch.zeros(2, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            "generated",
            (),
            "uint8",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int32),
            "generated",
            (),
            "int64",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            "generated",
            (),
            "int64",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.tensor([0, -1]),
            "generated",
            (),
            ">= 0",
        ),
        (
            torch.zeros(0, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.int64),
            "generated",
            (),
            "empty",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            "drawn",
            (),
            "source",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            "folder",
            ("a",),
            "names",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            "generated",
            ("a", "b"),
            "names",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            "folder",
            ["a", "b"],
            "names",
        ),
    ],
)
def test_trigger_set_validation(images, labels, source, names, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TriggerSetError, match=message):
        TriggerSet(images, labels, source, names)


def test_trigger_set_size_limit_and_frozen() -> None:
    n = MAX_TRIGGERS + 1
    with pytest.raises(TriggerSetError, match="at most"):
        TriggerSet(
            torch.zeros(n, 1, 1, 1, dtype=torch.uint8),
            torch.zeros(n, dtype=torch.int64),
            "generated",
        )
    ts = small_set()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ts.source = "folder"  # type: ignore[misc]
    assert issubclass(TriggerSetError, DatasetError)


def test_non_contiguous_images_are_made_contiguous() -> None:
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 1, 3, 4).transpose(2, 3)
    ts = TriggerSet(images, torch.tensor([0, 1]), "generated")
    assert ts.images.is_contiguous() and torch.equal(ts.images, images)
    assert ts.to_dict()["shape"] == [2, 1, 4, 3]


# --- JSON form -----------------------------------------------------------------------------------


def roundtrip(ts: TriggerSet) -> TriggerSet:
    return TriggerSet.from_dict(json.loads(json.dumps(ts.to_dict())))


def test_to_dict_round_trip_generated_and_folder() -> None:
    ts = generate_triggers(SEED, 20, (3, 16, 16), 10)
    data = ts.to_dict()
    assert set(data) == {"format", "source", "shape", "labels", "names", "images"}
    assert data["format"] == TRIGGER_FORMAT and data["shape"] == [20, 3, 16, 16]
    assert data["labels"] == ts.labels.tolist() and data["names"] == []
    assert zlib.decompress(base64.b64decode(data["images"])) == ts.images.numpy().tobytes()
    back = roundtrip(ts)
    assert back == ts and back.commitment() == ts.commitment()
    folder = small_set(source="folder")
    back = roundtrip(folder)
    assert back == folder and back.names == ("0.png", "1.png", "2.png", "3.png")


def tampered(**changes: object) -> dict[str, object]:
    data = small_set().to_dict()
    data.update(changes)
    return data


def compressed(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


RAW = bytes(range(0, 240, 10))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "expected an object"),
        (tampered(format="ticketguard-triggers/2"), "format must be"),
        (tampered(extra=1), "unknown keys \\['extra'\\]"),
        ({k: v for k, v in tampered().items() if k != "names"}, "missing keys \\['names'\\]"),
        (tampered(source="drawn"), "source must be"),
        (tampered(shape=[4, 1, 2]), "shape must be"),
        (tampered(shape=[4, 1, 2, 0]), "shape must be"),
        (tampered(shape=[4, True, 2, 3]), "shape must be"),
        (tampered(shape=[4, 1, 2, 3.0]), "shape must be"),
        (tampered(labels=[0, 0, 1]), "labels must be a list of 4"),
        (tampered(labels=[0, True, 1, 2]), "label 1 must be an integer"),
        (tampered(labels=[0, 0, -1, 2]), "label 2 must be an integer >= 0"),
        (tampered(labels=[0, 0, 1.0, 2]), "label 2 must be an integer"),
        (tampered(labels=[0, 0, 1, 2**63]), "label 3"),
        (tampered(names=["a"] * 4), "a generated set has 0 names"),
        (tampered(source="folder"), "a folder set has 4 names"),
        (tampered(names=[1, 2, 3, 4]), "names must be a list of strings"),
        (tampered(images=123), "base64 string"),
        (tampered(images="eJw*"), "not valid base64"),
        (tampered(images="eJw=\n"), "not valid base64"),
        (tampered(images="é"), "not valid base64"),
        (tampered(images=base64.b64encode(b"not zlib at all").decode()), "not valid zlib"),
        (tampered(images=compressed(RAW[:-1])), "hold 23 bytes, shape needs 24"),
        (tampered(images=compressed(RAW + b"\x00")), "more than the 24 bytes"),
        (tampered(images=base64.b64encode(zlib.compress(RAW)[:-2]).decode()), "truncated"),
        (tampered(images=base64.b64encode(zlib.compress(RAW) + b"junk").decode()), "trailing"),
    ],
)
def test_from_dict_rejects_tampering(data: object, message: str) -> None:
    with pytest.raises(TriggerSetError, match=message) as info:
        TriggerSet.from_dict(data, what="secret file s.json: trigger set")
    text = str(info.value)
    assert text.startswith("secret file s.json: trigger set: ") and "\n" not in text


def test_from_dict_default_what() -> None:
    with pytest.raises(TriggerSetError, match="^trigger set: format"):
        TriggerSet.from_dict(tampered(format="x"))


@pytest.mark.parametrize(
    "shape", [[MAX_TRIGGERS + 1, 1, 1, 1], [1, 3, 1024, 1025], [10_000, 3, 224, 224]]
)
def test_from_dict_refuses_huge_shapes_before_decompressing(
    shape: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompression attempted")

    monkeypatch.setattr(triggers_module.zlib, "decompressobj", refuse)
    data = tampered(shape=shape, labels=[0] * shape[0], images=compressed(b"\x00" * 64))
    with pytest.raises(TriggerSetError, match="(at most|too large)"):
        TriggerSet.from_dict(data)


def test_from_dict_inflates_no_more_than_the_shape_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small bomb: 40 MB of zeros in ~40 kB, claimed to be 24 pixels, is refused unread.
    bomb = zlib.compress(b"\x00" * 40_000_000, 9)
    assert len(bomb) < 100_000
    data = tampered(images=base64.b64encode(bomb).decode("ascii"))
    with pytest.raises(TriggerSetError, match="longer than 24 pixels can need"):
        TriggerSet.from_dict(data)
    # A bomb small enough to pass that check is inflated only up to the shape's size.
    inflated: list[int] = []
    real = zlib.decompressobj

    class Recording:
        def __init__(self) -> None:
            self._inner = real()

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self._inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

    monkeypatch.setattr(triggers_module.zlib, "decompressobj", Recording)
    n = 100
    data = tampered(shape=[n, 1, 100, 100], labels=[0] * n, images=compressed(b"\x00" * 4_000_000))
    with pytest.raises(TriggerSetError, match="more than the 1000000 bytes"):
        TriggerSet.from_dict(data)
    assert inflated and sum(inflated) <= 1_000_001


# --- the Adi et al. folder format ----------------------------------------------------------------


def solid(
    path: Path,
    value: int | tuple[int, int, int],
    size: tuple[int, int] = (40, 30),
    fmt: str = "PNG",
) -> None:
    """Write a solid image (width, height) in `fmt`, whatever the file name says."""
    mode = "L" if isinstance(value, int) else "RGB"
    Image.new(mode, size, value).save(path, format=fmt)


def make_folder(
    root: Path,
    files: dict[str, int],
    labels: list[str],
    labels_name: str = "labels-cifar.txt",
) -> Path:
    (root / "pics").mkdir(parents=True)
    for name, value in files.items():
        solid(root / "pics" / name, value)
    (root / labels_name).write_text("\n".join(labels) + "\n")
    return root


# value = 2 * number so the test can tell which file landed where.
NUMBERED = ["1.jpg", "10.jpg", "2.jpg", "100.jpg", "11.png", "3.jpeg"]
LEX = ["1.jpg", "10.jpg", "100.jpg", "11.png", "2.jpg", "3.jpeg"]
NUMERIC = ["1.jpg", "2.jpg", "3.jpeg", "10.jpg", "11.png", "100.jpg"]
FLOAT_LABELS = [
    "6.000000000000000000e+00",
    "1.000000000000000000e+00",
    "0",
    "9.0",
    "+2",
    "4.000000000000000000e+00",
    "",
    "",
]


def value_of(name: str) -> int:
    return 2 * int(name.split(".")[0])


@pytest.mark.parametrize(("order", "expected"), [("lexicographic", LEX), ("numeric", NUMERIC)])
def test_folder_order_and_labels(tmp_path: Path, order: str, expected: list[str]) -> None:
    folder = make_folder(tmp_path / "t", {n: value_of(n) for n in NUMBERED}, FLOAT_LABELS)
    (folder / "pics" / ".DS_Store").write_bytes(b"\x00junk")
    (folder / "pics" / "sub").mkdir()
    ts = load_trigger_folder(folder, (1, 8, 8), 10, order=order)
    assert ts.source == "folder" and ts.names == tuple(expected)
    assert ts.images.shape == (6, 1, 8, 8) and ts.images.dtype == torch.uint8
    # Each image is solid with its file's intensity, so this pins which file went where.
    assert ts.images.flatten(1).tolist() == [[value_of(n)] * 64 for n in expected]
    # The i-th label belongs to the i-th name in the chosen order.
    assert ts.labels.tolist() == [6, 1, 0, 9, 2, 4]


def test_folder_lexicographic_with_odd_names(tmp_path: Path) -> None:
    files = {"1.jpg": 10, "10.jpg": 20, "2.jpg": 30, "100.jpg": 40, "a b.jpg": 50, "B.JPG": 60}
    folder = make_folder(tmp_path, files, ["0", "1", "2", "3", "4", "5"])
    ts = load_trigger_folder(folder, (1, 4, 4), 6)
    assert ts.names == ("1.jpg", "10.jpg", "100.jpg", "2.jpg", "B.JPG", "a b.jpg")
    assert ts.images[:, 0, 0, 0].tolist() == [10, 20, 40, 30, 60, 50]
    with pytest.raises(TriggerSetError, match=r"pics/B\.JPG: numeric order needs an integer"):
        load_trigger_folder(folder, (1, 4, 4), 6, order="numeric")


def test_folder_numeric_duplicate_numbers(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.jpg": 10, "01.png": 20}, ["0", "1"])
    with pytest.raises(TriggerSetError, match="have the same number 1 in numeric order"):
        load_trigger_folder(folder, (1, 4, 4), 2, order="numeric")


def test_folder_content_formats_channels_and_sizes(tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    solid(pics / "1.jpg", (90, 90, 90), size=(300, 200), fmt="PNG")  # PNG bytes, .jpg name
    solid(pics / "2.jpg", 120, size=(200, 300), fmt="JPEG")  # a real JPEG, portrait
    solid(pics / "3.bmp", (200, 30, 60), size=(64, 64), fmt="BMP")  # colour, odd extension
    solid(pics / "4", 33, size=(8, 8), fmt="GIF")  # no extension at all, already the right size
    (tmp_path / "labels.txt").write_text("1\n2\n3\n0\n")
    gray = load_trigger_folder(tmp_path, (1, 16, 16), 4)
    assert gray.images.shape == (4, 1, 16, 16)
    img = gray.images[:, 0]
    assert bool((img[0] == 90).all())
    assert int(img[1].min()) >= 118 and int(img[1].max()) <= 122
    # RGB to L with ITU-R 601-2 luma, as PIL converts: 0.299 R + 0.587 G + 0.114 B.
    assert abs(int(img[2, 5, 5]) - round(0.299 * 200 + 0.587 * 30 + 0.114 * 60)) <= 1
    assert bool((img[3] == 33).all())
    colour = load_trigger_folder(tmp_path, (3, 16, 24), 4)
    assert colour.images.shape == (4, 3, 16, 24)
    assert colour.images[2, :, 8, 12].tolist() == [200, 30, 60]
    assert colour.images[0, :, 8, 12].tolist() == [90, 90, 90]
    assert torch.equal(colour.images[3], torch.full((3, 16, 24), 33, dtype=torch.uint8))


def test_folder_resizes_shorter_side_and_crops_centre(tmp_path: Path) -> None:
    """A 200x100 picture with black side bands: scaling 100 -> 16 then cropping cuts them off."""
    pics = tmp_path / "pics"
    pics.mkdir()
    band = np.zeros((100, 200), dtype=np.uint8)
    band[:, 50:150] = 200
    Image.fromarray(band, mode="L").save(pics / "wide.png")
    tall = np.zeros((200, 100), dtype=np.uint8)
    tall[50:150, :] = 100
    Image.fromarray(tall, mode="L").save(pics / "tall.png")
    (tmp_path / "l.txt").write_text("0\n1\n")
    ts = load_trigger_folder(tmp_path, (1, 16, 16), 2)
    assert ts.names == ("tall.png", "wide.png")
    tall_img, wide_img = ts.images[0, 0], ts.images[1, 0]
    # A squash would keep the black bands (a quarter on each side); the crop keeps the centre.
    assert bool((wide_img[:, 2:-2] == 200).all()) and int(wide_img.min()) > 100
    assert bool((tall_img[2:-2, :] == 100).all()) and int(tall_img.min()) > 50
    # Antialiased downscaling: a fine checkerboard averages to grey rather than aliasing.
    board = (np.indices((160, 160)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board, mode="L").save(pics / "wide.png")
    ts = load_trigger_folder(tmp_path, (1, 16, 16), 2)
    assert 110 <= int(ts.images[1].min()) and int(ts.images[1].max()) <= 145


def test_folder_labels_file_override(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.png": 1, "2.png": 2}, ["0", "1"], labels_name="a.txt")
    (folder / "b.txt").write_text("1\n0\n")
    with pytest.raises(TriggerSetError, match=r"more than one labels file \(a.txt, b.txt\)"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    ts = load_trigger_folder(folder, (1, 4, 4), 2, labels_file=folder / "b.txt")
    assert ts.labels.tolist() == [1, 0]
    other = tmp_path / "elsewhere.list"
    other.write_text("1\n1\n")
    assert load_trigger_folder(folder, (1, 4, 4), 2, labels_file=other).labels.tolist() == [1, 1]
    with pytest.raises(TriggerSetError, match="missing.txt does not exist"):
        load_trigger_folder(folder, (1, 4, 4), 2, labels_file=tmp_path / "missing.txt")


def test_folder_hidden_txt_is_not_a_labels_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.png": 1}, ["1"])
    (folder / ".notes.txt").write_text("hello\n")
    assert load_trigger_folder(folder, (1, 4, 4), 2).labels.tolist() == [1]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["0", "1"], "3 images but 2 labels in labels-cifar.txt"),
        (["0", "1", "2", "3"], "3 images but 4 labels"),
        ([], "3 images but 0 labels"),
        (["0", "six", "1"], r"line 2: not a number \(expected one integer label in \[0, 10\)"),
        (["0", "1", "nan"], "line 3: not a number"),
        (["0", "1", "inf"], "line 3: not a number"),
        (["0", "1_0", "1"], "line 2: not a number"),
        (["2.5", "1", "1"], "line 1: not an integer"),
        (["0", "1", "2.000000000000000001"], "line 3: not an integer"),
        (["0", "10", "1"], r"line 2: a label outside \[0, 10\)"),
        (["0", "-1", "1"], r"line 2: a label outside \[0, 10\)"),
        (["0", "1e999999", "1"], "line 2: a label outside"),
        (["0", "", "1"], "line 2: blank line"),
    ],
)
def test_folder_bad_labels(tmp_path: Path, labels: list[str], message: str) -> None:
    folder = make_folder(tmp_path, {"1.png": 1, "2.png": 2, "3.png": 3}, labels)
    with pytest.raises(TriggerSetError, match=message) as info:
        load_trigger_folder(folder, (1, 4, 4), 10)
    assert "\n" not in str(info.value)
    # The line is named by its number; what it holds is not echoed.
    assert all(f"'{label}'" not in str(info.value) for label in labels if label)


def test_folder_labels_file_with_crlf_and_bom(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.png": 1, "2.png": 2}, [])
    (folder / "labels-cifar.txt").write_bytes(b"\xef\xbb\xbf3.0e+00\r\n 7 \r\n\r\n\r\n")
    assert load_trigger_folder(folder, (1, 4, 4), 10).labels.tolist() == [3, 7]


def test_folder_structure_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TriggerSetError, match=f"trigger folder {missing} does not exist"):
        load_trigger_folder(missing, (1, 4, 4), 2)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TriggerSetError, match="is not a directory"):
        load_trigger_folder(a_file, (1, 4, 4), 2)
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "labels.txt").write_text("0\n")
    with pytest.raises(TriggerSetError, match="has no pics/ subfolder"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    (folder / "pics").mkdir()
    (folder / "pics" / ".hidden.png").write_bytes(b"")
    with pytest.raises(TriggerSetError, match="holds no image files"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    solid(folder / "pics" / "1.jpg", 5)
    (folder / "labels.txt").unlink()
    with pytest.raises(TriggerSetError, match="has no labels file"):
        load_trigger_folder(folder, (1, 4, 4), 2)


def test_folder_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.jpg": 10}, ["0", "1"])
    (folder / "pics" / "2.jpg").write_text("this is not an image")
    with pytest.raises(TriggerSetError, match=r"trigger image .*2\.jpg cannot be read"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    truncated = (folder / "pics" / "1.jpg").read_bytes()[:30]
    (folder / "pics" / "2.jpg").write_bytes(truncated)
    with pytest.raises(TriggerSetError, match=r"2\.jpg cannot be read"):
        load_trigger_folder(folder, (1, 4, 4), 2)


@pytest.mark.parametrize(
    ("shape", "classes", "order"),
    [((2, 4, 4), 2, "lexicographic"), ((1, 4, 4), 1, "lexicographic"), ((1, 4, 4), 2, "natural")],
)
def test_folder_bad_arguments(
    tmp_path: Path, shape: tuple[int, int, int], classes: int, order: str
) -> None:
    folder = make_folder(tmp_path, {"1.png": 1}, ["0"])
    with pytest.raises(ConfigError):
        load_trigger_folder(folder, shape, classes, order=order)


def test_folder_set_round_trips_and_commits(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {n: value_of(n) for n in NUMBERED}, FLOAT_LABELS)
    ts = load_trigger_folder(folder, (3, 8, 8), 10)
    back = roundtrip(ts)
    assert back == ts and back.names == tuple(LEX) and back.commitment() == ts.commitment()
    renumbered = load_trigger_folder(folder, (3, 8, 8), 10, order="numeric")
    assert renumbered.commitment() != ts.commitment()


# --- links out of the folder, and files named as labels --------------------------------------------


def test_folder_links_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    solid(outside / "secret.png", 7)
    folder = make_folder(tmp_path / "t", {"1.png": 1}, ["0", "1"])
    (folder / "pics" / "2.png").symlink_to(outside / "secret.png")
    with pytest.raises(TriggerSetError, match=r"2\.png is a link to a file outside .*; refused"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    # A link that stays inside the folder is an ordinary file of it.
    (folder / "pics" / "2.png").unlink()
    solid(folder / "spare.png", 9)
    (folder / "pics" / "2.png").symlink_to(folder / "spare.png")
    assert load_trigger_folder(folder, (1, 4, 4), 2).size == 2


def test_folder_linked_pics_and_labels_outside_are_refused(tmp_path: Path) -> None:
    outside = make_folder(tmp_path / "outside", {"1.png": 1}, ["0"])
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "pics").symlink_to(outside / "pics")
    (folder / "labels.txt").write_text("0\n")
    with pytest.raises(TriggerSetError, match="pics is a link to a folder outside"):
        load_trigger_folder(folder, (1, 4, 4), 2)
    (folder / "pics").unlink()
    (folder / "pics").mkdir()
    solid(folder / "pics" / "1.png", 1)
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").symlink_to(outside / "labels-cifar.txt")
    with pytest.raises(TriggerSetError, match="labels.txt is a link to a file outside"):
        load_trigger_folder(folder, (1, 4, 4), 2)


def test_a_labels_error_does_not_echo_the_named_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"1.png": 1}, ["0"])
    private = tmp_path / "private.conf"
    private.write_text("admin:password=hunter2\n")
    with pytest.raises(TriggerSetError) as info:
        load_trigger_folder(folder, (1, 4, 4), 2, labels_file=private)
    text = str(info.value)
    assert "line 1: not a number (expected one integer label in [0, 2) per line)" in text
    assert "hunter2" not in text and "admin" not in text and "\n" not in text


def test_folder_image_declaring_too_many_pixels_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_folder(tmp_path / "t", {"1.png": 10, "2.png": 20}, ["0", "1"])
    Image.new("L", (65, 64), 7).save(folder / "pics" / "2.png")
    monkeypatch.setattr(triggers_module, "MAX_SOURCE_PIXELS", 64 * 64)
    with pytest.raises(TriggerSetError, match=r"2\.png is 65x64: more than 4096 pixels"):
        load_trigger_folder(folder, (1, 8, 8), 10)
    monkeypatch.setattr(triggers_module, "MAX_SOURCE_PIXELS", 65 * 64)
    assert load_trigger_folder(folder, (1, 8, 8), 10).images.shape == (2, 1, 8, 8)
