"""Recent refusals (rejected associations, refused C-STOREs) that the status page lists.

Each process keeps its last :data:`KEEP` events in memory and writes them, atomically (temporary file +
rename), to ``<metrics folder>/events-<pid>.json``; :func:`recent` merges the files of all processes.
An event names the peer by AE title and address and an instance by UID: never a patient.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

#: Events kept per process.
KEEP = 100

_lock = threading.Lock()
_recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP)


def record(folder: Path, kind: str, **fields: Any) -> None:
    """Add an event of ``kind`` (``association_rejected``, ``cstore_refused``) with ``fields``."""
    item = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "kind": kind, **fields}
    path = folder / f"events-{os.getpid()}.json"
    with _lock:
        _recent.append(item)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(list(_recent)), encoding="utf-8")
        os.replace(tmp, path)


def recent(folder: Path, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` events of every process (of ``kind`` when given), newest first."""
    items: list[dict[str, Any]] = []
    for path in folder.glob("events-*.json"):
        try:
            items.extend(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):  # being replaced right now, or removed: skip it this time
            continue
    if kind is not None:
        items = [e for e in items if e.get("kind") == kind]
    items.sort(key=lambda e: e.get("time", ""), reverse=True)
    return items[:limit]
