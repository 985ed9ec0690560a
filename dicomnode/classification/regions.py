"""Per-slice probabilities -> contiguous anatomical ranges in the order neck > lungs > liver > pelvis > legs.

Decoding (Viterbi over the ordered chain). The slices are ordered top (head) to bottom. The hidden state
of a slice is its region; along the slices the state may stay or move *down* the chain (neck -> lungs ->
liver -> pelvis -> legs; skipping a region is allowed, e.g. a scan with a gap), never back up. The score
of a path is the sum of the slices' log-probabilities of their states (floored at ``prob_floor``) minus
``switch_penalty`` (nats) for every change of state. The best path is the Viterbi path. Because the chain
never goes back, an isolated mislabelled slice in the middle of a region cannot create a range; one at the
top or bottom end of the series would create a one-slice range only if its evidence outweighs
``switch_penalty`` (default 4 nats: a single slice at p = 0.97 against 0.03 gives 3.5 nats and is absorbed;
two slices at 0.9 against 0.1 give 4.4 nats and make a range, as the top two neck slices of a chest scan
should).

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

CLASS_ORDER = ("neck", "lungs", "liver", "pelvis", "legs")


@dataclass(frozen=True)
class DecodeParams:
    """Parameters of :func:`decode_regions` (see the module docstring)."""

    switch_penalty: float = 4.0
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


def viterbi_ordered(log_probs: np.ndarray, switch_penalty: float) -> list[int]:
    """Best non-decreasing state path for ``log_probs`` (N, K) with ``switch_penalty`` per state change."""
    n, k = log_probs.shape
    if n == 0:
        return []
    score = log_probs[0].copy()
    back = np.zeros((n, k), dtype=np.int64)
    for t in range(1, n):
        # Best predecessor j <= i: either stay (i) or the best earlier state minus the penalty.
        best_prev = np.empty(k)
        arg_prev = np.empty(k, dtype=np.int64)
        run_best, run_arg = -np.inf, 0
        for i in range(k):
            if i > 0 and score[i - 1] > run_best:
                run_best, run_arg = score[i - 1], i - 1
            switch = run_best - switch_penalty
            if score[i] >= switch:
                best_prev[i], arg_prev[i] = score[i], i
            else:
                best_prev[i], arg_prev[i] = switch, run_arg
        score = best_prev + log_probs[t]
        back[t] = arg_prev
    state = int(np.argmax(score))
    path = [state]
    for t in range(n - 1, 0, -1):
        state = int(back[t, state])
        path.append(state)
    return path[::-1]


def decode_regions(probs: np.ndarray, params: DecodeParams | None = None,
                   classes: tuple[str, ...] = CLASS_ORDER) -> DecodedRegions:
    """Decode ``probs`` (N, 5), rows ordered top -> bottom, columns in ``classes`` order, into ranges."""
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
    path = viterbi_ordered(log_p, params.switch_penalty)

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
