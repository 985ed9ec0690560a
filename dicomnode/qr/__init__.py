"""Query/Retrieve SCP: C-FIND matching over the index and the C-MOVE / C-GET handlers.

Placeholder until the Query/Retrieve issue lands: the listener asks this package for its presentation
contexts and event handlers; for now it offers none.
"""

from __future__ import annotations

from typing import Any


def supported_contexts(cfg) -> list[Any]:
    """Presentation contexts of the Q/R SOP classes the listener should accept."""
    return []


def event_handlers(ctx) -> list[Any]:
    """(event, handler[, args]) tuples for C-FIND / C-MOVE / C-GET."""
    return []
