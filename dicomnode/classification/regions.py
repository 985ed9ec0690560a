"""Per-slice probabilities -> contiguous anatomical ranges in the model's class order (head > neck > lungs >
liver > pelvis > legs for the shipped model; a model's classes are a subsequence of
:data:`dicomnode.classification.model.ANATOMICAL_ORDER`, which also places ``abdomen`` between liver and
pelvis, checked when the model loads).

Decoding (Viterbi over the ordered chain). The slices are ordered top (head) to bottom. The hidden state
of a slice is its region; along the slices the state may stay or move *down* the chain (head -> neck ->
lungs -> liver -> pelvis -> legs; skipping a region is allowed, e.g. a scan with a gap), never back up. The score
of a path is the sum of the slices' log-probabilities of their states (floored at ``prob_floor``) minus
``switch_penalty`` (nats) for every change of state, and ``skip_penalty`` more for every region of the
chain that a change skips (a scan with a gap is rare; a slice of a far-away region is a mistake). The best
path is the Viterbi path. Because the chain never goes back, an isolated mislabelled slice in the middle of a
region cannot create a range; a slice at the top or bottom end of the series creates a range of the
*neighbouring* region when its evidence outweighs ``switch_penalty`` (default 2 nats: p = 0.78 against
0.13 at the top of a chest scan is 1.8 nats and is absorbed, two such neck slices make a range, as they
should), and of a region k steps away only past ``switch_penalty + (k - 1) * skip_penalty``.
Measured with the shipped six-class model (2026-12-02): the five labelled real DICOM series of
``ct/series`` (63 scored slices) decoded with 0 errors at 1.5-2.5 nats and 1 error at 3-4 nats (the top
neck slices of the Siemens chest series absorbed into lungs); 20 OpenKBP and 2 TotalSegmentator volumes
(2,118 slices): identical slice errors and boundary errors at 2.5 and 4 nats.

Transitions (shared slices). Where the decoded path moves from region A to region B, the slices on
either side of that boundary whose probabilities for A and B are *close* belong to both. Starting at the
boundary and walking outwards, a slice decoded as A is also counted in B while
``p_B >= share_ratio * p_A`` (default 0.5: B at least half as likely as A), and symmetrically for the
slices decoded as B; the walk stops at the first slice that fails, and never goes past
``max_shared`` slices on each side. These slices extend the ranges of both regions, so the lungs range
and the liver range overlap at the diaphragm, as the paper's lung/liver transition slices do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicomnode.classification.model.classes import CLASSES

#: The default chain: the classes of the shipped model (callers pass the loaded model's classes).
CLASS_ORDER: tuple[str, ...] = CLASSES


@dataclass(frozen=True)
class DecodeParams:
    """Parameters of :func:`decode_regions` (see the module docstring)."""

    switch_penalty: float = 2.0
    skip_penalty: float = 2.0
    prob_floor: float = 1e-4
    share_ratio: float = 0.5
    max_shared: int = 3


@dataclass(frozen=True)
class RegionSpan:
    """One contiguous range of slice positions (0 = top), inclusive at both ends."""

    region: str
    first: int
    last: int
    mean_probability: float

    @property
    def n_slices(self) -> int:
        return self.last - self.first + 1


@dataclass
class DecodedRegions:
    """The result of :func:`decode_regions`."""

    path: list[int]  # decoded class index per slice
    members: list[tuple[str, ...]]  # regions each slice belongs to (two at a shared transition)
    spans: list[RegionSpan] = field(default_factory=list)  # in anatomical order

    def primary(self, i: int, classes: tuple[str, ...] = CLASS_ORDER) -> str:
        return classes[self.path[i]]


def viterbi_ordered(log_probs: np.ndarray, switch_penalty: float, skip_penalty: float = 0.0) -> list[int]:
    """Best non-decreasing state path for ``log_probs`` (N, K): ``switch_penalty`` per state change, plus
    ``skip_penalty`` for every state of the chain that a change skips over."""
    n, k = log_probs.shape
    if n == 0:
        return []
    # cost[j, i]: moving from state j to state i (i >= j); -inf below the diagonal (never back up the chain)
    j_idx, i_idx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    cost = np.where(i_idx > j_idx, switch_penalty + skip_penalty * np.maximum(i_idx - j_idx - 1, 0), 0.0)
    cost = np.where(i_idx >= j_idx, -cost, -np.inf)
    score = log_probs[0].copy()
    back = np.zeros((n, k), dtype=np.int64)
    for t in range(1, n):
        candidates = score[:, None] + cost  # [from j, to i]
        # prefer staying on a tie (argmax takes the first maximum: put the diagonal first)
        best_from = np.argmax(candidates, axis=0)
        stay = candidates[np.arange(k), np.arange(k)] >= candidates[best_from, np.arange(k)]
        best_from = np.where(stay, np.arange(k), best_from)
        score = candidates[best_from, np.arange(k)] + log_probs[t]
        back[t] = best_from
    state = int(np.argmax(score))
    path = [state]
    for t in range(n - 1, 0, -1):
        state = int(back[t, state])
        path.append(state)
    return path[::-1]


def decode_regions(probs: np.ndarray, params: DecodeParams | None = None,
                   classes: tuple[str, ...] = CLASS_ORDER) -> DecodedRegions:
    """Decode ``probs`` (N, K), rows ordered top -> bottom, columns in ``classes`` order, into ranges."""
    params = params or DecodeParams()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"decode_regions: probabilities must be (N, {len(classes)}), got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("decode_regions: probabilities contain NaN or infinity")
    n = probs.shape[0]
    if n == 0:
        return DecodedRegions([], [], [])
    log_p = np.log(np.clip(probs, params.prob_floor, 1.0))
    path = viterbi_ordered(log_p, params.switch_penalty, params.skip_penalty)

    members: list[set[int]] = [{s} for s in path]
    boundaries = [t for t in range(1, n) if path[t] != path[t - 1]]
    for t in boundaries:
        a, b = path[t - 1], path[t]
        for step in range(params.max_shared):  # slices above the boundary (decoded a) that also show b
            i = t - 1 - step
            if i < 0 or path[i] != a or probs[i, b] < params.share_ratio * probs[i, a]:
                break
            members[i].add(b)
        for step in range(params.max_shared):  # slices below the boundary (decoded b) that also show a
            i = t + step
            if i >= n or path[i] != b or probs[i, a] < params.share_ratio * probs[i, b]:
                break
            members[i].add(a)

    spans = []
    for c in sorted(set(path)):
        idx = [i for i in range(n) if c in members[i]]
        first, last = idx[0], idx[-1]
        spans.append(RegionSpan(classes[c], first, last, float(probs[first:last + 1, c].mean())))
    return DecodedRegions(path, [tuple(classes[c] for c in sorted(m)) for m in members], spans)
