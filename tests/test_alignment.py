"""Tests of channel alignment: permutations are undone exactly; excluded entries steer nothing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ticketguard.signatures.structure import ChannelStructure, structure_of
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.verify.alignment import align_masks, aligned_mask, mask_overlap

SETUPS = {
    "digits_cnn": ("digits_cnn", {"width": 8}, (1, 8, 8), 0.3),
    "resnet20": ("resnet20", {}, (3, 32, 32), 0.2),
}


@functools.cache
def _setup(name: str) -> tuple[ChannelStructure, dict[str, torch.Size]]:
    arch, kwargs, shape, _ = SETUPS[name]
    structure = structure_of(arch, 10, shape, kwargs)
    model = build_model(arch, 10, kwargs)
    state = model.state_dict()
    return structure, {n: state[n].shape for n in default_pruned_parameters(model)}


def _random_mask(shapes: dict[str, torch.Size], density: float, seed: int) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(s, generator=gen) < density for n, s in shapes.items()})


def _random_exclude(
    shapes: dict[str, torch.Size], fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """Per layer, a bool [out, in] matrix marking `fraction` of the channel connections."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s[0], s[1], generator=gen) < fraction for n, s in shapes.items()}


def _expand(exclude: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return exclude.view(*exclude.shape, *([1] * (like.dim() - 2))).expand_as(like)


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("with_exclude", [False, True], ids=["all entries", "with exclude"])
def test_alignment_undoes_a_random_permutation_exactly(name: str, with_exclude: bool) -> None:
    structure, shapes = _setup(name)
    density = SETUPS[name][3]
    names = list(shapes)
    reference = _random_mask(shapes, density, seed=0)
    perm = structure.random_permutation(np.random.default_rng(5))
    suspect = Mask(structure.permute_state(dict(reference), perm))
    # The permutation really scrambles the masks.
    assert mask_overlap(reference, suspect, names) < density + 0.1
    exclude = _random_exclude(shapes, 0.25, seed=1) if with_exclude else None
    alignment = align_masks(structure, reference, suspect, exclude=exclude)
    back = alignment.apply(structure, dict(suspect))
    for n in names:
        assert torch.equal(back[n], reference[n]), n
    assert mask_overlap(reference, back, names) == 1.0
    assert mask_overlap(reference, back, names, exclude) == 1.0
    assert aligned_mask(structure, suspect, alignment) == reference
    assert alignment.moved == int((alignment.perm != structure.identity()).sum())
    assert alignment.moved > 0
    assert 1 <= alignment.sweeps <= 6


def test_alignment_of_an_unpermuted_copy_moves_nothing() -> None:
    structure, shapes = _setup("digits_cnn")
    reference = _random_mask(shapes, 0.3, seed=0)
    alignment = align_masks(structure, reference, reference)
    np.testing.assert_array_equal(alignment.perm, structure.identity())
    assert alignment.moved == 0
    assert alignment.sweeps == 1  # one sweep finds nothing to change


def test_alignment_survives_some_noise() -> None:
    """A permuted copy with 5% of its entries flipped is still put back in place."""
    structure, shapes = _setup("digits_cnn")
    reference = _random_mask(shapes, 0.3, seed=0)
    gen = torch.Generator().manual_seed(9)
    noisy = {n: m ^ (torch.rand(m.shape, generator=gen) < 0.05) for n, m in reference.items()}
    perm = structure.random_permutation(np.random.default_rng(2))
    suspect = structure.permute_state(noisy, perm)
    alignment = align_masks(structure, reference, suspect)
    back = alignment.apply(structure, suspect)
    for n in shapes:
        assert torch.equal(back[n], noisy[n]), n


@pytest.mark.parametrize("name", list(SETUPS))
def test_independent_random_masks_align_well_below_one(name: str) -> None:
    structure, shapes = _setup(name)
    density = SETUPS[name][3]
    names = list(shapes)
    reference = _random_mask(shapes, density, seed=0)
    other = _random_mask(shapes, density, seed=1)
    before = mask_overlap(reference, other, names)
    alignment = align_masks(structure, reference, other)
    after = mask_overlap(reference, alignment.apply(structure, dict(other)), names)
    # Chance overlap of independent masks is about the density; alignment raises it a bit.
    assert before == pytest.approx(density, abs=0.02)
    assert before <= after < 0.6


def test_excluded_reference_entries_do_not_steer_the_alignment() -> None:
    """Replacing every excluded entry of the reference leaves the alignment exactly as it was.

    The replacement is chosen to be a strong, wrong hint (the suspect's arrangement under another
    permutation); without the exclusion it changes the alignment, so this test can fail.
    """
    structure, shapes = _setup("digits_cnn")
    names = list(shapes)
    mask = _random_mask(shapes, 0.3, seed=0)
    suspect = structure.permute_state(
        dict(mask), structure.random_permutation(np.random.default_rng(1))
    )
    decoy = structure.permute_state(
        dict(mask), structure.random_permutation(np.random.default_rng(2))
    )
    exclude = _random_exclude(shapes, 0.6, seed=3)
    ref_a = Mask(mask)
    ref_b = Mask({n: torch.where(_expand(exclude[n], mask[n]), decoy[n], mask[n]) for n in names})
    assert ref_a != ref_b

    a = align_masks(structure, ref_a, suspect, exclude=exclude)
    b = align_masks(structure, ref_b, suspect, exclude=exclude)
    np.testing.assert_array_equal(a.perm, b.perm)
    assert (a.sweeps, a.moved) == (b.sweeps, b.moved)
    # The decoy is a real hint: without the exclusion the two references align differently.
    plain_a = align_masks(structure, ref_a, suspect)
    plain_b = align_masks(structure, ref_b, suspect)
    assert not np.array_equal(plain_a.perm, plain_b.perm)
    # And the overlap with exclusion ignores the excluded entries on both sides.
    assert mask_overlap(ref_a, suspect, names, exclude) == mask_overlap(
        ref_b, suspect, names, exclude
    )


def test_changing_excluded_suspect_entries_keeps_the_recovered_permutation() -> None:
    """Flip the suspect's entries at the (moved) excluded positions: same permutation found."""
    structure, shapes = _setup("digits_cnn")
    names = list(shapes)
    mask = _random_mask(shapes, 0.3, seed=0)
    exclude = _random_exclude(shapes, 0.25, seed=4)
    perm = structure.random_permutation(np.random.default_rng(6))
    gen = torch.Generator().manual_seed(7)
    changed = {
        n: torch.where(
            _expand(exclude[n], mask[n]), torch.rand(mask[n].shape, generator=gen) < 0.5, mask[n]
        )
        for n in names
    }
    suspect = structure.permute_state(dict(mask), perm)
    suspect_changed = structure.permute_state(changed, perm)
    assert any(not torch.equal(suspect[n], suspect_changed[n]) for n in names)
    a = align_masks(structure, mask, suspect, exclude=exclude)
    b = align_masks(structure, mask, suspect_changed, exclude=exclude)
    np.testing.assert_array_equal(a.perm, b.perm)
    back = b.apply(structure, suspect_changed)
    for n in names:
        assert torch.equal(back[n], changed[n]), n
    # Outside the excluded entries the aligned suspect equals the reference exactly.
    assert mask_overlap(mask, back, names, exclude) == 1.0
    assert mask_overlap(mask, back, names) < 1.0


def test_mask_overlap_is_ochiai() -> None:
    r = {"a": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)}
    s = {"a": torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)}
    assert mask_overlap(r, s, ["a"]) == pytest.approx(1 / np.sqrt(2 * 3))
    assert mask_overlap(r, r, ["a"]) == 1.0
    empty = {"a": torch.zeros(1, 4, dtype=torch.bool)}
    assert mask_overlap(r, empty, ["a"]) == 0.0
    exclude = {"a": torch.tensor([[False, False, True, True]])}
    # Without columns 2 and 3: R = {0, 1}, S = {0}.
    assert mask_overlap(r, s, ["a"], exclude) == pytest.approx(1 / np.sqrt(2))
    # Conv-shaped masks: the [out, in] exclusion covers whole kernels.
    rc = {"c": torch.ones(2, 2, 3, 3, dtype=torch.bool)}
    ec = {"c": torch.tensor([[True, False], [False, False]])}
    sc = {"c": rc["c"].clone()}
    sc["c"][0, 0] = False
    assert mask_overlap(rc, sc, ["c"], ec) == 1.0
    assert mask_overlap(rc, sc, ["c"]) < 1.0


@pytest.mark.parametrize("name", list(SETUPS))
def test_invariant_statistics_ignore_permutations_and_see_differences(name: str) -> None:
    from ticketguard.verify.verification import invariant_statistics

    structure, shapes = _setup(name)
    density = SETUPS[name][3]
    names = list(shapes)
    reference = _random_mask(shapes, density, seed=0)
    permuted = Mask(
        structure.permute_state(
            dict(reference), structure.random_permutation(np.random.default_rng(2))
        )
    )
    same = invariant_statistics(structure, reference, permuted, names)
    for layer in same["layers"].values():
        assert layer["out_degree_distance"] == 0.0
        assert layer["in_degree_distance"] == 0.0
    assert same["log10_paths"]["suspect"] == pytest.approx(
        same["log10_paths"]["reference"], abs=1e-9
    )
    # Halving one layer's connections shows up in that layer's degrees and in the path count.
    first = names[0]
    thinner = dict(reference)
    thinner[first] = reference[first] & (
        torch.rand(shapes[first], generator=torch.Generator().manual_seed(3)) < 0.5
    )
    other = invariant_statistics(structure, reference, Mask(thinner), names)
    assert other["layers"][first]["out_degree_distance"] > 0.05
    assert other["log10_paths"]["suspect"] < other["log10_paths"]["reference"] - 0.05
    for n in names[1:]:
        assert other["layers"][n]["out_degree_distance"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_never_ends_worse_than_the_channels_as_they_are(seed: int) -> None:
    """An unpermuted copy whose connections were heavily overwritten (its degree profiles
    blurred) must not be moved to a worse overlap than it has unmoved."""
    structure, shapes = _setup("digits_cnn")
    # A sparse mask with 12% of its entries flipped: the degree-profile start alone settled on a
    # worse overlap than the unmoved channels for every seed here.
    reference = _random_mask(shapes, 0.03, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    blurred = {n: m ^ (torch.rand(m.shape, generator=gen) < 0.12) for n, m in reference.items()}
    names = list(reference)
    alignment = align_masks(structure, reference, blurred)
    aligned = alignment.apply(structure, blurred)
    assert mask_overlap(reference, aligned, names) >= mask_overlap(reference, blurred, names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_pruned_copy_whose_written_connections_survive_is_not_moved(seed: int) -> None:
    """Pruning keeps the strong written connections (at the excluded positions) and removes
    most other entries: the copy is a subset of the reference and must stay where it is. Counting
    its written connections for the suspect alone would pay the alignment for moving them off
    the positions, and channels left with nothing would be shuffled at random."""
    structure, shapes = _setup("digits_cnn")
    reference = _random_mask(shapes, 0.1, seed=seed)
    exclude = _random_exclude(shapes, 0.2, seed=10 + seed)
    gen = torch.Generator().manual_seed(20 + seed)
    pruned = {
        n: m & (_expand(exclude[n], m) | (torch.rand(m.shape, generator=gen) < 0.3))
        for n, m in reference.items()
    }
    alignment = align_masks(structure, reference, pruned, exclude=exclude)
    assert alignment.moved == 0
