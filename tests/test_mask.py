"""The Mask type: validation, statistics, fingerprint, persistence."""

from __future__ import annotations

import pytest
import torch

from ticketguard.errors import MaskError, MaskShapeError, MaskViolationError, TicketFormatError
from ticketguard.tickets.mask import Mask


def _mask() -> Mask:
    a = torch.zeros(4, 3, dtype=torch.bool)
    a[0, :] = True  # 3 of 12 survive
    b = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    b[1] = False  # 18 of 36 survive
    return Mask({"fc.weight": a, "conv.weight": b})


def test_counts_and_densities() -> None:
    mask = _mask()
    assert mask.num_weights == 48
    assert mask.num_surviving == 21
    assert mask.density == pytest.approx(21 / 48)
    assert mask.sparsity == pytest.approx(27 / 48)
    stats = {s.name: s for s in mask.layer_stats()}
    assert stats["fc.weight"].density == pytest.approx(0.25)
    assert stats["conv.weight"].sparsity == pytest.approx(0.5)
    report = mask.report()
    assert [layer["name"] for layer in report["layers"]] == ["fc.weight", "conv.weight"]


def test_float_zero_one_masks_become_bool_and_other_values_are_rejected() -> None:
    m = Mask({"w": torch.tensor([[0.0, 1.0], [1.0, 1.0]])})
    assert m["w"].dtype == torch.bool
    assert m.num_surviving == 3
    with pytest.raises(MaskError, match="other than 0 and 1"):
        Mask({"w": torch.tensor([0.5, 1.0])})
    with pytest.raises(MaskError):
        Mask({"": torch.ones(2, dtype=torch.bool)})


def test_fingerprint_depends_on_bits_names_and_shapes_not_order() -> None:
    mask = _mask()
    reordered = Mask({"conv.weight": mask["conv.weight"], "fc.weight": mask["fc.weight"]})
    assert mask.fingerprint() == reordered.fingerprint()
    flipped = {n: t.clone() for n, t in mask.items()}
    flipped["fc.weight"][3, 2] = True
    assert Mask(flipped).fingerprint() != mask.fingerprint()
    renamed = Mask({"fc2.weight": mask["fc.weight"], "conv.weight": mask["conv.weight"]})
    assert renamed.fingerprint() != mask.fingerprint()
    reshaped = Mask(
        {"fc.weight": mask["fc.weight"].reshape(3, 4), "conv.weight": mask["conv.weight"]}
    )
    assert reshaped.fingerprint() != mask.fingerprint()
    assert len(mask.fingerprint()) == 64


def test_checks_against_weights() -> None:
    mask = _mask()
    weights = {n: torch.randn(m.shape) * m for n, m in mask.items()}
    mask.check_zeros(weights)
    with pytest.raises(MaskShapeError, match="fc.weight"):
        mask.check_shapes({**weights, "fc.weight": torch.zeros(3, 4)})
    with pytest.raises(MaskShapeError, match="not among the weights"):
        mask.check_shapes({"conv.weight": weights["conv.weight"]})
    dirty = {n: w.clone() for n, w in weights.items()}
    dirty["conv.weight"][1, 0, 0, 0] = 1.0
    with pytest.raises(MaskViolationError, match="1 non-zero"):
        mask.check_zeros(dirty)


def test_apply_zeroes_in_place_and_subset_relation() -> None:
    mask = _mask()
    weights = {n: torch.randn(m.shape) for n, m in mask.items()}
    mask.apply_(weights)
    assert all(bool((weights[n][~m] == 0).all()) for n, m in mask.items())
    assert Mask.from_weights(weights, list(mask)).is_subset_of(mask)
    dense = Mask.ones_like(weights, list(mask))
    assert mask.is_subset_of(dense)
    assert not dense.is_subset_of(mask)


def test_save_load_roundtrip(tmp_path) -> None:
    mask = _mask()
    mask.save(tmp_path / "m.safetensors")
    assert Mask.load(tmp_path / "m.safetensors") == mask
    (tmp_path / "bad").write_bytes(b"not a mask")
    with pytest.raises(TicketFormatError):
        Mask.load(tmp_path / "bad")
