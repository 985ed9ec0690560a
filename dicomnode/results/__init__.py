"""Results into the hospital (issue 14): the per-series SR (:mod:`.sr`), per-region KOS documents
(:mod:`.kos`), routing rules by anatomy (:mod:`.routing`), their job kinds (:mod:`.jobs`) and runner
(:mod:`.runner`). Light to import: config validation reads :mod:`.anatomy`."""

from __future__ import annotations

__all__ = ["configured", "enqueue_after_classification"]


def __getattr__(name: str):
    if name in __all__:
        from dicomnode.results import jobs

        return getattr(jobs, name)
    raise AttributeError(name)
