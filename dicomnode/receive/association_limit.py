"""The node-wide association limit (``listener.max_associations``), shared by the listener processes.

Each listener process counts its own associations in its slot of a shared array of integers that
the main process creates (one writer per slot, so no cross-process lock that a killed process could
leave held; a restarted process starts from 0). An association is admitted when, after counting it,
the sum over all slots is within the limit; otherwise it is uncounted again and rejected. Two
processes admitting at the very same instant at the limit may both reject (never both admit): the
limit is never exceeded.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any


def shared_counts(processes: int, context: Any = mp) -> Any:
    """The array of per-process association counts, created by the main process before the listeners."""
    return context.RawArray("i", processes)


class AssociationSlots:
    """Admission against the node-wide limit for the associations of one process (slot ``index``)."""

    def __init__(self, limit: int, counts: Any | None = None, index: int = 0) -> None:
        self.limit = limit
        self.counts = counts if counts is not None else shared_counts(1)
        self.index = index
        self._lock = threading.Lock()  # the association threads of this process share the slot

    def acquire(self) -> bool:
        """Count one more association; False (and nothing counted) when the node is at its limit."""
        with self._lock:
            self.counts[self.index] += 1
            if sum(self.counts) <= self.limit:
                return True
            self.counts[self.index] -= 1
            return False

    def release(self) -> None:
        with self._lock:
            self.counts[self.index] -= 1

    def active(self) -> int:
        """Associations counted on the whole node."""
        return sum(self.counts)
