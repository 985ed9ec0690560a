"""The probability profile of a classified series for the page: the picture of ``dicomnode classify --plot``
(:func:`dicomnode.classification.plot.plot_profile`), drawn from the index's per-slice results and the
stored slices' coronal reformat.

A picture is drawn once per classification (the file name holds the model version and the time it was
classified) under ``<data_dir>/http/profiles/`` and served from there afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("dicomnode.http.profile")

_draw_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe; the HTTP server is threaded


def as_classification(detail: dict[str, Any]):
    """A :class:`~dicomnode.classification.pipeline.SeriesClassification` from :func:`queries.series_detail`."""
    from dicomnode.classification.pipeline import RegionOutcome, SeriesClassification, SliceOutcome

    slices = [SliceOutcome(position=s["position"], sop_instance_uid=s["sop_instance_uid"],
                           instance_number=s["instance_number"], z_mm=s["z_mm"], probabilities=s["probabilities"],
                           predicted=s["predicted"], region=s["predicted"], regions=tuple(s["body_parts"]))
              for s in detail["slices"]]
    regions = [RegionOutcome(region=r["region"], body_part=r["body_part"], first_position=r["first_position"],
                             last_position=r["last_position"], first_instance=r["first_instance"],
                             last_instance=r["last_instance"], first_sop_instance_uid=r["first_sop_instance_uid"],
                             last_sop_instance_uid=r["last_sop_instance_uid"], z_start_mm=r["z_start_mm"],
                             z_end_mm=r["z_end_mm"], n_slices=r["n_slices"], mean_probability=r["mean_probability"])
               for r in detail["regions"]]
    return SeriesClassification(series_instance_uid=detail["series_instance_uid"], status="classified",
                                model_version=detail["model_version"], n_slices=len(slices), regions=regions,
                                slices=slices)


#: Most slices read for the page's coronal reformat: a longer series is sampled evenly (the picture has
#: about 500 pixels of height for it), so that the first view of a 2,000-slice series does not decode it all.
MAX_CORONAL_ROWS = 256


def coronal_reformat(paths: list[Path], max_rows: int = MAX_CORONAL_ROWS):
    """The coronal reformat of slices in anatomical order, as ``classify --plot`` draws it, from at most
    ``max_rows`` evenly spaced slices (None when a slice cannot be read: the profile is drawn without it,
    and the reason is logged)."""
    import numpy as np

    from dicomnode.classification.imaging.series import read_headers
    from dicomnode.classification.pipeline import _coronal_line, _read_slice

    if len(paths) > max_rows:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_rows).round().astype(int)]
    try:
        lines = []
        for path in paths:
            header = read_headers(path)[0]
            hu, _ = _read_slice(header)
            lines.append(_coronal_line(hu))
        return np.stack(lines) if lines else None
    except Exception as exc:
        log.warning("coronal reformat not drawn (%s: %s)", type(exc).__name__, exc)
        return None


def profile_png(detail: dict[str, Any], paths: list[Path], cache_dir: Path) -> Path:
    """The profile picture of a classified series (``detail`` from :func:`queries.series_detail`, ``paths``
    its slice files in anatomical order), drawn on the first request of this classification."""
    from dicomnode.classification.plot import plot_profile

    key = hashlib.sha1(f"{detail['model_version']}|{detail['classified_at']}|{len(detail['slices'])}"
                       .encode()).hexdigest()[:16]
    path = cache_dir / f"{detail['series_instance_uid']}-{key}.png"
    if path.is_file():
        return path
    result = as_classification(detail)
    result.coronal = coronal_reformat(paths)
    with _draw_lock:
        if not path.is_file():
            tmp = path.with_name(f".{path.stem}.tmp.png")
            plot_profile(result, tmp)
            tmp.replace(path)
            for old in cache_dir.glob(f"{detail['series_instance_uid']}-*.png"):  # earlier classifications
                if old != path:
                    old.unlink(missing_ok=True)
    return path
