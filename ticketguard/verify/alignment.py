"""Align a suspect's channels to a reference ticket before comparing masks.

Hidden channels can be permuted without changing what a network computes, which moves every
position-based signature. The alignment recovers the permutation from the masks alone: one linear
assignment (Hungarian, scipy's `linear_sum_assignment`) per permutation type of the traced channel
structure, so channels tied by a residual stream move together. Sweeps maximise the overlap of
surviving entries with every other dimension aligned by the current solution, until nothing
changes, from two starts: a match of permutation-invariant degree profiles, and the channels as
they are; the end with the larger overlap is kept, and a channel that gains nothing by moving
stays where it is. Embedded signature positions are left out of the cost, in both masks, so the
alignment can neither inflate the match it is used to read nor be paid for moving the written
connections off their positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ticketguard.signatures.structure import ChannelStructure, Layer
from ticketguard.tickets.mask import Mask

#: What leaving a channel in place is worth in the overlap the sweeps maximise (entries shared).
STAY_BONUS = 0.5


@dataclass(frozen=True)
class Alignment:
    """A node permutation placing suspect channels onto reference channels, and how it was found."""

    perm: np.ndarray
    sweeps: int
    moved: int

    def apply(self, structure: ChannelStructure, state: Mapping[str, torch.Tensor]) -> dict:
        """Reorder a suspect's tensors (masks or weights) into the reference's channel order."""
        return structure.permute_state(state, self.perm)


@dataclass(frozen=True)
class _Term:
    """One layer's contribution to one permutation type's cost: as producer rows or consumer cols."""

    layer: Layer
    role: str
    index: np.ndarray


def _terms(structure: ChannelStructure, members: np.ndarray, names: list[str]) -> list[_Term]:
    terms = []
    n = structure.num_nodes
    for name in names:
        layer = structure.layers[name]
        row_of = np.full(n, -1)
        row_of[layer.out_nodes] = np.arange(layer.out_channels)
        rows = row_of[members]
        keep = (rows >= 0).all(axis=0)
        if keep.any():
            terms.append(_Term(layer, "rows", rows[:, keep]))
        if layer.groups != 1:
            continue
        col_of = np.full(n, -1)
        valid = layer.in_nodes >= 0
        col_of[layer.in_nodes[valid]] = np.flatnonzero(valid)
        cols = col_of[members]
        keep = (cols >= 0).all(axis=0)
        if keep.any():
            terms.append(_Term(layer, "cols", cols[:, keep]))
    return terms


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return m if m.dim() > 2 else m.unsqueeze(-1)


def _features(term: _Term, m: torch.Tensor, gather: np.ndarray | None) -> torch.Tensor:
    """Return per-class vectors of a layer's float mask `[out, in, k]` along the type's dimension.

    With `gather` (the other dimension's alignment) the vectors are the raw entries; without it,
    the entries are summed over the other dimension (a permutation-invariant degree profile).
    """
    if term.role == "rows":
        if gather is None:
            block = m.sum(dim=1)[term.index]
        else:
            block = m[:, torch.as_tensor(gather)][term.index]
    else:
        mt = m.transpose(0, 1)
        if gather is None:
            block = mt.sum(dim=1)[term.index]
        else:
            block = mt[:, torch.as_tensor(gather)][term.index]
    return block.reshape(block.shape[0], -1)


def align_masks(
    structure: ChannelStructure,
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    *,
    exclude: Mapping[str, torch.Tensor] | None = None,
    max_sweeps: int = 6,
) -> Alignment:
    """Find the channel permutation that best maps the suspect's masks onto the reference's.

    `exclude` holds, per layer, a bool channel matrix `[out, in]` of entries left out of the
    cost, in the reference and in the suspect alike: the embedded signature positions.
    """
    names = [n for n in structure.layers if n in reference and n in suspect]

    def without_excluded(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = {}
        for n in names:
            m = masks[n].bool().cpu()
            if exclude is not None and n in exclude:
                drop = exclude[n].cpu()
                m = m & ~(drop.view(*drop.shape, *([1] * (m.dim() - 2))))
            kept[n] = _as_float(m).flatten(2)
        return kept

    # The positions are left out of the suspect too, in its own frame: an unpermuted copy keeps
    # its written connections (strong, so they outlast pruning) exactly there, and counting them
    # would pay the alignment for moving them off the positions. For a permuted copy this drops
    # entries at keyed positions, independent of its content.
    ref, sus = without_excluded(reference), without_excluded(suspect)
    types = structure.permutation_types()
    plan = [(members, _terms(structure, members, names)) for members in types]
    fixed_features = {
        id(term): _features(term, ref[term.layer.name], np.arange(_other_size(term)))
        for _, terms in plan
        for term in terms
    }

    def other_gather(term: _Term, perm: np.ndarray) -> np.ndarray:
        layer = term.layer
        nodes = layer.in_nodes if term.role == "rows" else layer.out_nodes
        return structure.gather_index(nodes, perm)

    def sweep(perm: np.ndarray) -> int:
        """Improve `perm` in place, one assignment per permutation type, until it settles."""
        sweeps, changed = 0, True
        while changed and sweeps < max_sweeps:
            sweeps += 1
            changed = False
            for members, terms in plan:
                if not terms:
                    continue
                # Half a shared entry for leaving a channel where it is: ties (channels with
                # no entries left, interchangeable ones) stay put instead of moving at random.
                cost = np.eye(len(members)) * STAY_BONUS
                for term in terms:
                    a = fixed_features[id(term)]
                    b = _features(term, sus[term.layer.name], other_gather(term, perm))
                    cost += (a @ b.T).double().numpy()
                changed |= _assign(perm, members, cost, maximize=True)
        return sweeps

    def overlap(perm: np.ndarray) -> float:
        moved = structure.permute_state(sus, perm)
        return float(sum((ref[n] * moved[n]).sum() for n in names))

    # Start 1: degree profiles, which no permutation of the other dimension changes.
    profiled = structure.identity()
    for members, terms in plan:
        if not terms:
            continue
        cost = np.zeros((len(members), len(members)))
        for term in terms:
            a = _features(term, ref[term.layer.name], None)
            b = _features(term, sus[term.layer.name], None)
            cost += torch.cdist(a, b, p=1).double().numpy()
        _assign(profiled, members, cost, maximize=False)
    profiled_sweeps = sweep(profiled)
    # Start 2: the channels as they are. The sweeps only climb, so a suspect whose degree
    # profiles an attack has blurred (overwritten connections) could settle far from where it
    # started; the better of the two ends is kept, the unmoved one on a tie.
    unmoved = structure.identity()
    unmoved_sweeps = sweep(unmoved)
    if overlap(profiled) > overlap(unmoved):
        perm, sweeps = profiled, profiled_sweeps
    else:
        perm, sweeps = unmoved, unmoved_sweeps
    moved = int((perm != structure.identity()).sum())
    return Alignment(perm, sweeps, moved)


def _other_size(term: _Term) -> int:
    layer = term.layer
    return layer.in_channels if term.role == "rows" else layer.out_channels


def _assign(perm: np.ndarray, members: np.ndarray, cost: np.ndarray, *, maximize: bool) -> bool:
    """Solve one assignment and write it into `perm`; return whether anything changed."""
    ref_rows, sus_rows = linear_sum_assignment(cost, maximize=maximize)
    new = np.empty(len(members), dtype=np.int64)
    new[ref_rows] = sus_rows
    before = perm[members.ravel()].copy()
    perm[members.ravel()] = members[new].ravel()
    return not np.array_equal(before, perm[members.ravel()])


def aligned_mask(structure: ChannelStructure, mask: Mask, alignment: Alignment) -> Mask:
    """Return the suspect's mask reordered into the reference's channel order."""
    return Mask(alignment.apply(structure, dict(mask)))


def mask_overlap(
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    names: list[str],
    exclude: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Return the Ochiai overlap of surviving entries: |R and S| / sqrt(|R| |S|), over `names`."""
    both = r_total = s_total = 0
    for n in names:
        r = reference[n].bool().cpu()
        s = suspect[n].bool().cpu()
        if exclude is not None and n in exclude:
            keep = ~exclude[n].cpu().view(*exclude[n].shape, *([1] * (r.dim() - 2)))
            r = r & keep
            s = s & keep
        both += int((r & s).sum())
        r_total += int(r.sum())
        s_total += int(s.sum())
    if r_total == 0 or s_total == 0:
        return 0.0
    return both / float(np.sqrt(r_total * s_total))
