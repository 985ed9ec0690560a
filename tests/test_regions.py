"""Ordered decoding of per-slice probabilities into region ranges (dicomnode.classification.regions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dicomnode.classification.regions import CLASS_ORDER, DecodeParams, decode_regions, viterbi_ordered

HEAD, NECK, LUNGS, LIVER, PELVIS, LEGS = range(6)
K = len(CLASS_ORDER)


def confident(labels, p=0.9, k=K):
    probs = np.full((len(labels), k), (1 - p) / (k - 1))
    probs[np.arange(len(labels)), labels] = p
    return probs


def spans(decoded):
    return [(s.region, s.first, s.last) for s in decoded.spans]


def test_clean_sequence_gives_ordered_ranges():
    d = decode_regions(confident([NECK] * 4 + [LUNGS] * 10 + [LIVER] * 6 + [PELVIS] * 5 + [LEGS] * 3))
    assert spans(d) == [("neck", 0, 3), ("lungs", 4, 13), ("liver", 14, 19), ("pelvis", 20, 24), ("legs", 25, 27)]
    assert all(s.mean_probability == pytest.approx(0.9) for s in d.spans)
    assert d.spans[1].n_slices == 10


def test_isolated_mislabelled_slice_creates_no_range():
    labels = [LUNGS] * 8 + [PELVIS] + [LUNGS] * 3 + [LIVER] * 6 + [NECK] + [LIVER] * 2
    probs = confident(labels, p=0.97)
    assert set(np.argmax(probs, axis=1)) == {NECK, LUNGS, LIVER, PELVIS}
    d = decode_regions(probs)
    assert spans(d) == [("lungs", 0, 11), ("liver", 12, 20)]
    assert d.members[8] == ("lungs",) and d.members[18] == ("liver",)


def test_switch_penalty_decides_about_a_lone_slice_at_the_end():
    # 0.9 against 0.02 is 3.8 nats, more than the default switch penalty (2): a lone slice of the next region
    # at the end of a series is a (short) range, as the top neck slice of a chest scan is.
    probs = confident([LUNGS] * 10 + [LIVER], p=0.9)
    assert spans(decode_regions(probs)) == [("lungs", 0, 9), ("liver", 10, 10)]
    assert spans(decode_regions(probs, DecodeParams(switch_penalty=4.0))) == [("lungs", 0, 10)]
    assert spans(decode_regions(confident([NECK] + [LUNGS] * 10, p=0.9)))[0] == ("neck", 0, 0)
    # Weak evidence (0.6 against 0.4: 0.4 nats) is absorbed.
    weak = confident([LUNGS] * 11, p=0.9)
    weak[10] = [0, 0, 0.4, 0.6, 0, 0]
    assert spans(decode_regions(weak)) == [("lungs", 0, 10)]


def test_a_far_region_needs_more_evidence_than_a_neighbouring_one():
    # legs right after lungs skips liver and pelvis: 2 + 2 * 2 = 6 nats; one slice at 3.8 nats is absorbed...
    probs = confident([LUNGS] * 10 + [LEGS], p=0.9)
    assert spans(decode_regions(probs)) == [("lungs", 0, 10)]
    # ...two are not (7.6 nats): a scan with a gap still decodes.
    assert spans(decode_regions(confident([LUNGS] * 10 + [LEGS] * 2, p=0.9))) == [("lungs", 0, 9), ("legs", 10, 11)]
    # without the skip penalty the lone slice would open a legs range
    assert spans(decode_regions(probs, DecodeParams(skip_penalty=0.0)))[-1] == ("legs", 10, 10)


def test_regions_never_go_back_up_the_body():
    # A scan listed bottom-to-top by mistake cannot produce a valid ascending chain: it collapses.
    d = decode_regions(confident([LIVER] * 6 + [LUNGS] * 6))
    assert len(d.spans) == 1
    assert all(b >= a for a, b in zip(d.path, d.path[1:]))


def test_transition_slices_belong_to_both_regions():
    probs = confident([LUNGS] * 10 + [LIVER] * 10)
    probs[8] = [0, 0, 0.60, 0.35, 0.05, 0]  # liver more than half as likely as lungs: shared
    probs[9] = [0, 0, 0.50, 0.45, 0.05, 0]
    probs[10] = [0, 0, 0.42, 0.55, 0.03, 0]
    probs[11] = [0, 0, 0.10, 0.85, 0.05, 0]  # clearly liver only
    d = decode_regions(probs)
    assert d.path[9] == LUNGS and d.path[10] == LIVER
    assert d.members[7] == ("lungs",)
    assert d.members[8] == d.members[9] == d.members[10] == ("lungs", "liver")
    assert d.members[11] == ("liver",)
    assert spans(d) == [("lungs", 0, 10), ("liver", 8, 19)]


def test_sharing_is_bounded_and_configurable():
    probs = confident([LUNGS] * 10 + [LIVER] * 10)
    probs[4:10] = [0, 0, 0.55, 0.45, 0, 0]  # a long ambiguous zone, the boundary in its middle
    probs[10:16] = [0, 0, 0.45, 0.55, 0, 0]
    d = decode_regions(probs, DecodeParams(max_shared=2))
    shared = [i for i, m in enumerate(d.members) if len(m) == 2]
    assert len(shared) == 4
    d = decode_regions(probs, DecodeParams(share_ratio=1.01))
    assert all(len(m) == 1 for m in d.members)


def test_viterbi_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n, k, pen, skip = 6, 5, float(rng.uniform(0, 3)), float(rng.uniform(0, 3))
        logp = np.log(rng.dirichlet(np.ones(k) * 0.5, size=n) + 1e-9)

        def score(path):
            return (sum(logp[t, s] for t, s in enumerate(path))
                    - sum(pen + skip * (b - a - 1) for a, b in zip(path, path[1:]) if b != a))

        best = max((p for p in itertools.product(range(k), repeat=n) if all(b >= a for a, b in zip(p, p[1:]))),
                   key=score)
        assert score(viterbi_ordered(logp, pen, skip)) == pytest.approx(score(best))


def test_edge_cases_and_bad_input():
    assert decode_regions(np.zeros((0, K))).spans == []
    d = decode_regions(confident([PELVIS]))
    assert spans(d) == [("pelvis", 0, 0)]
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        decode_regions(np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        decode_regions(np.full((3, K), np.nan))


def test_default_chain_is_the_shipped_class_list_in_anatomical_order():
    from dicomnode.classification.model import ANATOMICAL_ORDER, CLASSES, check_class_order

    assert CLASS_ORDER == CLASSES == ("head", "neck", "lungs", "liver", "pelvis", "legs")
    assert check_class_order(CLASSES) == CLASSES
    assert [ANATOMICAL_ORDER.index(c) for c in CLASSES] == sorted(ANATOMICAL_ORDER.index(c) for c in CLASSES)
    with pytest.raises(ValueError, match="anatomical order"):
        check_class_order(("neck", "head", "lungs"))
    with pytest.raises(ValueError, match="unknown class"):
        check_class_order(("neck", "arm"))


def test_head_ct_decodes_head_then_neck_and_never_back():
    # A head-and-neck scan: brain slices, one uncertain slice that looks like neck amid head, then neck.
    probs = confident([HEAD] * 8 + [NECK] + [HEAD] * 3 + [NECK] * 6)
    d = decode_regions(probs)
    assert spans(d) == [("head", 0, 11), ("neck", 12, 17)]
    assert all(d.path[i] <= d.path[i + 1] for i in range(len(d.path) - 1))


def test_five_class_chain_of_an_older_model_still_decodes():
    from dicomnode.classification.model import FIVE_CLASSES

    probs = confident([0] * 3 + [1] * 4 + [2] * 2, k=5)
    d = decode_regions(probs, classes=FIVE_CLASSES)
    assert spans(d) == [("neck", 0, 2), ("lungs", 3, 6), ("liver", 7, 8)]
