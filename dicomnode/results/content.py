"""What the result documents of one classified series are made from, read from the index and the stored files.

:func:`load_series_results` gathers a series' region ranges, the slices of each range (in anatomical
order, from the slice results) and the headers of those slices (pixel data not read): the SR, the KOS
documents and the routing rules all work from it. Result UIDs are derived from the source series UID
and the result version (:func:`result_uid`), so a retried job sends the very same instances again
(a PACS keeps one copy) while a re-classification, with a new version, makes new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import Instance, RegionRange, Series, SliceResult


@dataclass
class SliceRef:
    """One classified slice: its position in anatomical order and where its file is."""

    position: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the storage folder


@dataclass
class RegionSlices:
    """One region range of a series with its slices."""

    ordinal: int
    region: str
    n_slices: int
    mean_probability: float
    slices: list[SliceRef]


@dataclass
class SeriesResults:
    """A classified series as the result documents see it."""

    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    series_number: int | None
    model_version: str
    version: int
    slices: list[SliceRef]  # every classified slice, in anatomical order
    regions: list[RegionSlices]
    headers: dict[str, Dataset] = field(default_factory=dict)  # SOP Instance UID -> header (no pixels)

    def region(self, name: str) -> list[RegionSlices]:
        """The ranges of region ``name`` (a region may occur in more than one range)."""
        return [r for r in self.regions if r.region == name]


def result_uid(*parts: object) -> str:
    """A UID derived from ``parts`` (the same parts give the same UID, under pydicom's UID root)."""
    return generate_uid(entropy_srcs=["dicomnode-results", *map(str, parts)])


def load_series_results(session: Session, series_id: int, storage_dir: Path | None = None) -> SeriesResults | None:
    """The series' classification as stored in the index; None when the series is gone or unclassified.

    With ``storage_dir`` the headers of all classified slices are read too (``ValueError`` naming a file
    that cannot be read).
    """
    series = session.get(Series, series_id)
    if series is None or series.classified_at is None:
        return None
    rows = session.execute(
        select(SliceResult.position, Instance.sop_class_uid, Instance.sop_instance_uid, Instance.transfer_syntax_uid,
               Instance.path)
        .join(Instance, Instance.id == SliceResult.instance_fk)
        .where(SliceResult.series_fk == series_id).order_by(SliceResult.position)).all()
    slices = [SliceRef(*row) for row in rows]
    by_position = {s.position: s for s in slices}
    ranges = session.scalars(select(RegionRange).where(RegionRange.series_fk == series_id)
                             .order_by(RegionRange.ordinal)).all()
    regions = [RegionSlices(r.ordinal, r.region, r.n_slices, r.mean_probability,
                            [by_position[p] for p in range(r.first_position, r.last_position + 1) if p in by_position])
               for r in ranges]
    result = SeriesResults(series.id, series.series_instance_uid, series.study.study_instance_uid, series.series_number,
                           series.model_version, series.results_version, slices, regions)
    if storage_dir is not None:
        for s in slices:
            try:
                result.headers[s.sop_instance_uid] = dcmread(Path(storage_dir) / s.path, stop_before_pixels=True)
            except Exception as exc:
                raise ValueError(f"stored file of instance {s.sop_instance_uid} cannot be read: {exc}") from exc
    return result


def drop_incomplete_study_references(ds: Dataset) -> Dataset:
    """Remove a Referenced Study Sequence (Type 3) copied from a source image whose items lack their
    Referenced SOP Class UID (some modalities write only the instance UID), which would make the
    document invalid; returns ``ds``."""
    items = ds.get("ReferencedStudySequence")
    if items is not None and any("ReferencedSOPClassUID" not in item for item in items):
        del ds.ReferencedStudySequence
    return ds


def quiet(build):
    """Decorator: run a document builder with Python warnings off (highdicom's quote patient names,
    which must never reach the log)."""
    import functools
    import warnings

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build(*args, **kwargs)

    return wrapper
