"""Routing rules by anatomy: which slices of a classified series a rule sends.

A rule (``routing.rules`` in the config) fires for a series containing its region with at least
``min_slices`` slices (over all ranges of that region); it then sends every slice of those ranges plus
``margin_slices`` more on each side (in anatomical order, clipped to the series).
"""

from __future__ import annotations

from dicomnode.config import RoutingRule
from dicomnode.results.content import SeriesResults, SliceRef


def rule_fires(rule: RoutingRule, results: SeriesResults) -> bool:
    """True when ``results`` has ``rule.region`` with at least ``rule.min_slices`` slices."""
    ranges = results.region(rule.region)
    return bool(ranges) and sum(r.n_slices for r in ranges) >= max(1, rule.min_slices)


def routed_slices(rule: RoutingRule, results: SeriesResults) -> list[SliceRef]:
    """The slices ``rule`` sends from ``results``, in anatomical order; empty when the rule does not fire."""
    if not rule_fires(rule, results):
        return []
    margin = max(0, rule.margin_slices)
    wanted: set[int] = set()
    for r in results.region(rule.region):
        if r.slices:
            wanted.update(range(r.slices[0].position - margin, r.slices[-1].position + margin + 1))
    return [s for s in results.slices if s.position in wanted]
