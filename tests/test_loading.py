"""Tests of reading model files: tickets, state dicts, prune checkpoints, wrappers, safetensors.

Every file is built here, in the format the tool meets in the wild, and read back through
`load_checkpoint`; unsafe and corrupt files must be refused with the library's own errors.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils import prune

from ticketguard.errors import (
    ArchitectureError,
    MaskError,
    MaskShapeError,
    TicketFormatError,
    UnsafeFileError,
)
from ticketguard.tickets.loading import fit_to_model, load_checkpoint, load_model, observed_mask
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import DigitsCNN

WIDTH = 4
WEIGHTS = ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc.weight")


# --- helpers -------------------------------------------------------------------------------------


def _model(seed: int = 0, num_classes: int = 10) -> DigitsCNN:
    """A DigitsCNN(width=4) whose conv/linear weights are all non-zero (in [0.1, 1.1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsCNN(num_classes=num_classes, width=WIDTH)
    with torch.no_grad():
        for name in WEIGHTS:
            w = model.get_parameter(name)
            w.copy_(torch.rand(w.shape, generator=gen) + 0.1)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zero_first(state: dict[str, torch.Tensor], name: str, count: int) -> None:
    """Zero the first `count` entries (in flat order) of state[name]."""
    flat = state[name].view(-1)
    flat[:count] = 0


def _pruned_model(seed: int = 0) -> tuple[DigitsCNN, dict[str, float]]:
    """A model with torch.nn.utils.prune applied to conv2 (L1, 30%) and fc1 (random, 50%)."""
    model = _model(seed)
    amounts = {"conv2.weight": 0.3, "fc1.weight": 0.5}
    prune.l1_unstructured(model.conv2, "weight", amount=amounts["conv2.weight"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        prune.random_unstructured(model.fc1, "weight", amount=amounts["fc1.weight"])
    return model, amounts


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted: order carries no meaning
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _rewrite_safetensors(path: Path, tensors=None, metadata=None) -> None:
    """Rewrite a safetensors file after the given functions changed its tensors or metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if tensors is not None:
        tensors(data)
    if metadata is not None:
        metadata(meta)
    save_file({k: v.contiguous() for k, v in data.items()}, str(path), metadata=meta)


class _Touch:
    """An object whose unpickling creates a file: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


# --- tickets -------------------------------------------------------------------------------------


def test_ticket_round_trip(tmp_path, make_ticket):
    ticket = make_ticket(seed=3, width=WIDTH)
    # The builder pruned something: the test is about a real mask, not a dense one.
    assert 0 < ticket.mask.num_surviving < ticket.mask.num_weights
    path = tmp_path / "t.ticket"
    ticket.save(path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "ticket"
    assert loaded.path == path
    assert loaded.mask == ticket.mask
    assert loaded.ticket is not None
    assert loaded.ticket.fingerprint == ticket.fingerprint
    assert loaded.mask.fingerprint() == ticket.fingerprint
    assert loaded.metadata["fingerprint"] == ticket.fingerprint
    assert loaded.architecture == "digits_cnn"
    _assert_same_tensors(loaded.state, ticket.trained)
    _assert_same_tensors(loaded.rewind, ticket.rewind)
    for stats in loaded.mask.layer_stats():
        assert stats.surviving == round(0.5 * stats.total)
    assert loaded.notes == []

    mask, source = observed_mask(loaded)
    assert source == "explicit" and mask == ticket.mask

    model = load_model(loaded)  # architecture, kwargs and classes come from the metadata
    assert model.conv1.out_channels == WIDTH
    assert model.fc.out_features == 10
    _assert_same_tensors(dict(model.state_dict()), ticket.trained)


def test_ticket_with_flipped_mask_bit_is_refused(tmp_path, make_ticket):
    """Pruning one more weight (and zeroing it) without re-signing the fingerprint is detected."""
    path = tmp_path / "t.ticket"
    make_ticket().save(path)

    def prune_one_more(data):
        m = data["mask::conv2.weight"].clone().view(-1)
        i = int(m.nonzero()[0])
        m[i] = False
        data["mask::conv2.weight"] = m.view(data["mask::conv2.weight"].shape)
        w = data["trained::conv2.weight"].clone().view(-1)
        w[i] = 0
        data["trained::conv2.weight"] = w.view(data["trained::conv2.weight"].shape)

    _rewrite_safetensors(path, tensors=prune_one_more)
    with pytest.raises(TicketFormatError, match="fingerprint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_ticket_with_tampered_fingerprint_is_refused(tmp_path, make_ticket):
    path = tmp_path / "t.ticket"
    ticket = make_ticket()
    ticket.save(path)

    def tamper(meta):
        doc = json.loads(meta["ticketguard"])
        assert doc["fingerprint"] == ticket.fingerprint
        doc["fingerprint"] = "0" * 64
        meta["ticketguard"] = json.dumps(doc)

    _rewrite_safetensors(path, metadata=tamper)
    with pytest.raises(TicketFormatError, match="fingerprint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_ticket_mask_shape_mismatch_is_refused(tmp_path, make_ticket):
    path = tmp_path / "t.ticket"
    make_ticket().save(path)

    def reshape(data):
        data["mask::fc1.weight"] = data["mask::fc1.weight"][:, :-1].contiguous()

    _rewrite_safetensors(path, tensors=reshape)
    with pytest.raises(MaskShapeError, match="fc1.weight"):
        load_checkpoint(path)


# --- plain state dicts ---------------------------------------------------------------------------


def test_plain_state_dict_zero_pattern_and_class_inference(tmp_path):
    state = _state(_model(num_classes=7))
    _zero_first(state, "conv2.weight", 100)
    _zero_first(state, "fc1.weight", 1024)
    path = tmp_path / "plain.pt"
    torch.save(state, path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "pytorch"
    assert loaded.mask is None and loaded.rewind is None and loaded.ticket is None
    assert loaded.architecture is None
    assert loaded.notes == []
    _assert_same_tensors(loaded.state, state)

    mask, source = observed_mask(loaded, ["conv2.weight", "fc1.weight", "conv3.weight"])
    assert source == "zero pattern"
    surviving = {s.name: (s.surviving, s.total) for s in mask.layer_stats()}
    assert surviving == {
        "conv2.weight": (2 * WIDTH * WIDTH * 9 - 100, 2 * WIDTH * WIDTH * 9),
        "fc1.weight": (128 * 8 * WIDTH - 1024, 128 * 8 * WIDTH),
        "conv3.weight": (4 * WIDTH * WIDTH * 9, 4 * WIDTH * WIDTH * 9),
    }
    assert mask["fc1.weight"].sum() == 128 * 8 * WIDTH - 1024

    # Without names, every floating tensor with 2-5 dimensions counts: exactly the weights.
    everything, _ = observed_mask(loaded)
    assert sorted(everything) == sorted(WEIGHTS)
    assert everything.num_weights - everything.num_surviving == 1124

    with pytest.raises(ArchitectureError, match="no tensor 'nope.weight'"):
        observed_mask(loaded, ["nope.weight"])

    # The number of classes is read off the classifier: 7, not the default 10.
    model = load_model(loaded, "digits_cnn", arch_kwargs={"width": WIDTH})
    assert model.fc.out_features == 7
    _assert_same_tensors(dict(model.state_dict()), state)
    assert load_model(loaded, "digits_cnn", arch_kwargs={"width": WIDTH}, num_classes=7)


def test_load_model_needs_an_architecture(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_state(_model()), path)
    with pytest.raises(ArchitectureError, match="--arch"):
        load_model(load_checkpoint(path))


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("resnet20", None, "missing"),  # other layer names
        ("digits_cnn", None, r"'conv1.weight' has shape \(4, 1, 3, 3\)"),  # width 32 expected
        ("digits_cnn", {"width": 8}, "has shape"),
        ("nosuchnet", None, "unknown architecture 'nosuchnet'"),
    ],
)
def test_load_model_wrong_architecture(tmp_path, arch, kwargs, match):
    path = tmp_path / "plain.pt"
    torch.save(_state(_model()), path)
    with pytest.raises(ArchitectureError, match=match):
        load_model(load_checkpoint(path), arch, arch_kwargs=kwargs)


def test_fit_to_model_keeps_only_model_tensors(tmp_path):
    state = _state(_model())
    state["extra.buffer"] = torch.ones(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    fitted = fit_to_model(loaded, DigitsCNN(width=WIDTH))
    assert "extra.buffer" not in fitted
    assert list(fitted) == list(DigitsCNN(width=WIDTH).state_dict())
    assert any("extra.buffer" in note and "ignored" in note for note in loaded.notes)

    del loaded.state["fc.bias"]
    with pytest.raises(ArchitectureError, match="1 tensors missing.*'fc.bias'"):
        fit_to_model(loaded, DigitsCNN(width=WIDTH))


# --- torch.nn.utils.prune checkpoints ------------------------------------------------------------


def _check_prune_load(loaded, model, amounts, extra=()) -> None:
    raw = model.state_dict()
    assert set(loaded.mask) == set(amounts)
    for name, amount in amounts.items():
        base = name.removesuffix(".weight")
        m = loaded.mask[name]
        assert m.dtype == torch.bool
        assert torch.equal(m, raw[f"{base}.weight_mask"].bool())
        numel = m.numel()
        assert int(m.sum()) == numel - round(amount * numel)  # torch.nn.utils.prune's count
        expected = raw[f"{base}.weight_orig"] * raw[f"{base}.weight_mask"]
        assert torch.equal(loaded.state[name], expected)
        # The module's own (hook-computed) weight is the same thing.
        assert torch.equal(loaded.state[name], model.get_submodule(base).weight.detach())
    assert not any(k.endswith(("_orig", "_mask")) for k in loaded.state)
    assert set(loaded.state) == set(DigitsCNN(width=WIDTH).state_dict()) | set(extra)


def test_prune_checkpoint(tmp_path):
    model, amounts = _pruned_model()
    sd = model.state_dict()
    assert "conv2.weight_orig" in sd and "conv2.weight_mask" in sd and "conv2.weight" not in sd
    path = tmp_path / "pruned.pth"
    torch.save(sd, path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "pytorch (torch.nn.utils.prune)"
    _check_prune_load(loaded, model, amounts)

    mask, source = observed_mask(loaded)
    assert source == "explicit" and set(mask) == set(amounts)
    # Names beyond the explicit mask fall back to the zero pattern.
    mask, source = observed_mask(loaded, ["conv1.weight", "conv2.weight"])
    assert source == "zero pattern"
    assert torch.equal(mask["conv2.weight"], loaded.mask["conv2.weight"])
    assert bool(mask["conv1.weight"].all())

    built = load_model(loaded, "digits_cnn", arch_kwargs={"width": WIDTH})
    assert torch.equal(built.conv2.weight, model.conv2.weight)
    assert torch.equal(built.fc1.weight, model.fc1.weight)


def test_paper_style_wrapper_with_rewind_weights_and_normalize(tmp_path):
    """The layout of public LTH code: {'state_dict': pruned sd, 'init_weight': rewind sd}."""
    rewind = _state(_model(seed=1))
    model, amounts = _pruned_model(seed=2)
    sd = dict(model.state_dict())
    norm = {"normalize.mean": torch.tensor([0.5]), "normalize.std": torch.tensor([0.25])}
    sd.update(norm)
    rewind.update(norm)
    path = tmp_path / "paper.pth.tar"
    torch.save({"state_dict": sd, "init_weight": rewind, "epoch": 160, "best_acc": 93.1}, path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "pytorch (torch.nn.utils.prune)"
    _check_prune_load(loaded, model, amounts, extra=norm)
    _assert_same_tensors({k: loaded.state[k] for k in norm}, norm)
    _assert_same_tensors(loaded.rewind, rewind)
    assert "state dict taken from 'state_dict'; rewind weights from 'init_weight'" in loaded.notes
    assert "ignored checkpoint entries: best_acc, epoch" in loaded.notes

    built = load_model(loaded, "digits_cnn", arch_kwargs={"width": WIDTH})
    assert torch.equal(built.fc1.weight, model.fc1.weight)
    ignored = [n for n in loaded.notes if n.startswith("ignored tensors")]
    assert len(ignored) == 1
    assert "normalize.mean" in ignored[0] and "normalize.std" in ignored[0]


def test_rewind_weights_stored_as_prune_pairs_are_merged(tmp_path):
    """Some code saves `init_weight` from a model that already carries prune hooks."""
    model, _ = _pruned_model(seed=5)
    init, _ = _pruned_model(seed=6)
    init_sd = dict(init.state_dict())
    path = tmp_path / "both_pruned.pt"
    torch.save({"state_dict": model.state_dict(), "init_weight": init_sd}, path)

    loaded = load_checkpoint(path)
    assert set(loaded.rewind) == set(loaded.state)
    expected = init_sd["fc1.weight_orig"] * init_sd["fc1.weight_mask"]
    assert torch.equal(loaded.rewind["fc1.weight"], expected)
    assert not any(k.endswith(("_orig", "_mask")) for k in loaded.rewind)


# --- checkpoint wrappers -------------------------------------------------------------------------


def _optimizer_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 1, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("key", ["state_dict", "model", "init_weight"])
def test_checkpoint_wrappers(tmp_path, key):
    model = _model()
    state = _state(model)
    path = tmp_path / "ckpt.pt"
    torch.save({key: state, "epoch": 12, "optimizer": _optimizer_state(model)}, path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "pytorch"
    _assert_same_tensors(loaded.state, state)
    assert loaded.rewind is None  # init_weight alone is the state, not a rewind point
    assert loaded.notes == [
        f"state dict taken from '{key}'",
        "ignored checkpoint entries: epoch, optimizer",
    ]


def test_top_level_state_dict_with_non_tensor_entries(tmp_path):
    state = _state(_model())
    path = tmp_path / "mixed.pt"
    torch.save({**state, "epoch": 3, "arch": "digits_cnn"}, path)
    loaded = load_checkpoint(path)
    _assert_same_tensors(loaded.state, state)
    assert loaded.notes == ["ignored non-tensor entries: arch, epoch"]


@pytest.mark.parametrize("wrapped", [False, True])
def test_dataparallel_prefix_is_stripped(tmp_path, wrapped):
    state = _state(_model())
    prefixed = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "dp.pt"
    torch.save({"state_dict": prefixed} if wrapped else prefixed, path)
    loaded = load_checkpoint(path)
    _assert_same_tensors(loaded.state, state)
    assert "removed the DataParallel 'module.' prefix" in loaded.notes
    model = load_model(loaded, "digits_cnn", arch_kwargs={"width": WIDTH})
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_partial_module_prefix_is_kept(tmp_path):
    state = _state(_model())
    state = {("module." + k if k.startswith("conv") else k): v for k, v in state.items()}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert "module.conv1.weight" in loaded.state
    assert not any("module." in n for n in loaded.notes)


# --- safetensors -------------------------------------------------------------------------------


def test_plain_safetensors(tmp_path):
    state = _state(_model())
    _zero_first(state, "conv3.weight", 50)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = load_checkpoint(path)
    assert loaded.source_format == "safetensors"
    assert loaded.mask is None and loaded.ticket is None
    _assert_same_tensors(loaded.state, state)
    mask, source = observed_mask(loaded, ["conv3.weight"])
    assert source == "zero pattern"
    assert mask.num_weights - mask.num_surviving == 50


def test_safetensors_with_prune_pairs(tmp_path):
    model, amounts = _pruned_model(seed=4)
    path = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.source_format == "safetensors (torch.nn.utils.prune)"
    _check_prune_load(loaded, model, amounts)


# --- unsafe files --------------------------------------------------------------------------------


def _save_torch_zip(obj, path):
    torch.save(obj, path)


def _save_torch_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_raw_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _run_with_torch(path):
    torch.load(path, weights_only=False)


def _run_with_pickle(path):
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301 (the point of the test)


@pytest.mark.parametrize(
    ("save", "run"),
    [
        (_save_torch_zip, _run_with_torch),
        (_save_torch_legacy, _run_with_torch),
        (_save_raw_pickle, _run_with_pickle),
    ],
    ids=["torch-zip", "torch-legacy", "raw-pickle"],
)
def test_malicious_pickle_is_refused_without_running(tmp_path, save, run):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # No tensors: a raw pickle of one would be refused for the tensor's own reducer already.
    save({"epoch": 3, "hook": _Touch(marker), "history": [0.5, 0.25]}, path)
    assert not marker.exists()

    with pytest.raises(UnsafeFileError, match="refused") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()

    # Control: the payload is live, so the refusal above is what kept the file from appearing.
    run(path)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_default_protocol_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.ones(2), "hook": _Touch(marker)}, f)
    with pytest.raises(UnsafeFileError, match="refused") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()


# --- corrupt files -------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0.5, 40, 8])
def test_truncated_ticket(tmp_path, make_ticket, cut):
    full = tmp_path / "full.ticket"
    make_ticket().save(full)
    data = full.read_bytes()
    path = tmp_path / "cut.ticket"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(TicketFormatError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(random.Random(0).randbytes(4096), id="random-bytes"),
        pytest.param(random.Random(1).randbytes(64), id="random-bytes-short"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(64), id="png"),
        pytest.param(
            b"hello world\nthis is text\n",
            id="text",
        ),
        pytest.param(
            b"a,b,c\n1,2,3\n",
            id="csv",
        ),
    ],
)
def test_corrupt_file_is_a_format_error(tmp_path, content):
    path = tmp_path / "corrupt.bin"
    path.write_bytes(content)
    with pytest.raises(TicketFormatError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [random.Random(0).randbytes(4096), b"\x89PNG\r\n\x1a\n" + bytes(64), b"# Title\n\nText.\n"],
    ids=["random-bytes", "png", "markdown"],
)
def test_garbage_is_not_reported_as_code(tmp_path, content):
    path = tmp_path / "garbage.bin"
    path.write_bytes(content)
    with pytest.raises(TicketFormatError) as info:
        load_checkpoint(path)
    assert not isinstance(info.value, UnsafeFileError)
    assert "execute code" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TicketFormatError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(TicketFormatError, match="not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (torch.ones(3), "holds a Tensor"),
        ({}, "no state dict found"),
        ({"epoch": 3, "state_dict": {"w": torch.ones(1), "note": "x"}}, "no state dict found"),
    ],
    ids=["bare-tensor", "empty-dict", "no-tensors"],
)
def test_torch_file_without_state_dict(tmp_path, obj, match):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(TicketFormatError, match=match):
        load_checkpoint(path)


def test_empty_safetensors_is_a_format_error(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(TicketFormatError):
        load_checkpoint(path)


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_prune_orig_without_mask(tmp_path, writer):
    model, _ = _pruned_model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "fc1.weight_mask"}
    path = tmp_path / "broken"
    if writer == "torch":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    match = "'fc1.weight_orig' has no matching 'fc1.weight_mask'"
    with pytest.raises(TicketFormatError, match=match):
        load_checkpoint(path)


def test_prune_mask_with_wrong_shape(tmp_path):
    model, _ = _pruned_model()
    sd = dict(model.state_dict())
    sd["conv2.weight_mask"] = sd["conv2.weight_mask"][:, :-1].contiguous()
    path = tmp_path / "badmask.pt"
    torch.save(sd, path)
    with pytest.raises(MaskShapeError, match="conv2.weight_mask") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_prune_mask_with_non_binary_values(tmp_path):
    model, _ = _pruned_model()
    sd = dict(model.state_dict())
    sd["fc1.weight_mask"] = sd["fc1.weight_mask"] * 0.5
    path = tmp_path / "halfmask.pt"
    torch.save(sd, path)
    with pytest.raises(MaskError, match="values other than 0 and 1"):
        load_checkpoint(path)


def test_prune_mask_fingerprints_like_the_mask_itself(tmp_path):
    """A mask read from a prune checkpoint fingerprints like the same Mask built directly."""
    model, _ = _pruned_model()
    path = tmp_path / "p.pt"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path)
    direct = Mask({n: model.get_buffer(n + "_mask") for n in ("conv2.weight", "fc1.weight")})
    assert loaded.mask.fingerprint() == direct.fingerprint()


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_protocol_5_pickle_is_refused_in_one_line_without_torch_advice(tmp_path, capfd):
    path = tmp_path / "evil5.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.ones(2)}, "x": _Shell()}, f, protocol=5)
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused") and "system" in message
    assert "\n" not in message and "weights_only" not in message
    assert "pwned" not in capfd.readouterr().out


def test_numpy_scalars_in_a_checkpoint_are_accepted_but_other_objects_are_not(tmp_path):
    import argparse

    import numpy as np

    path = tmp_path / "ckpt.pth.tar"
    sd = {"fc.weight": torch.ones(2, 3)}
    torch.save({"state_dict": sd, "best_acc": np.float64(91.2), "curve": np.zeros(3)}, path)
    loaded = load_checkpoint(path)
    assert list(loaded.state) == ["fc.weight"]
    assert any("best_acc" in note for note in loaded.notes)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (None, ["not", "an", "object"]),
        ("architecture", "digits_cnn"),
        ("num_classes", "ten"),
        ("input_shape", [1, 8]),
        ("dataset", "digits"),
        ("accuracy", {"test": "high"}),
    ],
)
def test_ticket_with_malformed_metadata_is_a_format_error(tmp_path, make_ticket, field, value):
    path = tmp_path / "t.ticket"
    make_ticket().save(path)

    def corrupt(meta):
        doc = json.loads(meta["ticketguard"])
        if field is None:
            doc = value
        else:
            doc[field] = value
        meta["ticketguard"] = json.dumps(doc)

    _rewrite_safetensors(path, metadata=corrupt)
    with pytest.raises(TicketFormatError, match="metadata") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_integer_keys_are_not_a_state_dict(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({1: torch.ones(2), 2: torch.ones(3)}, path)
    with pytest.raises(TicketFormatError, match="no state dict found"):
        load_checkpoint(path)
