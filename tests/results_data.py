"""Test setup of the results tests: the Q/R fixtures stored through ingest and classified as the worker
writes it (tests/qr_data.py: Philips series lungs 55-61, liver 59-64; GE 3-slice series unclassified),
plus the ``classified_at`` the worker sets, and helpers to run dciodvfy and a DCMTK storescp."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
from sqlalchemy import select

from conftest import dcmtk, free_port
from dicomnode.db.models import Series, utcnow
from dicomnode.receive.ingest import NodeContext
from qr_data import Stored, populate

DCIODVFY = Path("/usr/bin/dciodvfy")


def classified(ctx: NodeContext) -> tuple[Stored, int]:
    """Store and classify the fixtures; returns the UIDs and the Philips series' row id."""
    stored = populate(ctx)
    with ctx.sessions.begin() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == stored.philips_series))
        series.classified_at = utcnow()
        return stored, series.id


def series_id(ctx: NodeContext, series_uid: str) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(Series.id).where(Series.series_instance_uid == series_uid))


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for the file at ``path`` (empty: valid)."""
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    assert any(line.strip() for line in lines), "dciodvfy printed nothing"
    return [line for line in lines if line.startswith("Error")]


@contextlib.contextmanager
def storescp(out_dir: Path, ae_title: str = "LIVERCAD") -> Iterator[int]:
    """A DCMTK storescp writing what it receives to ``out_dir``; yields its port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", ae_title, "-od", str(out_dir), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_for_echo

        wait_for_echo(port, called=ae_title)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def received_sops(out_dir: Path) -> list[str]:
    """SOP Instance UIDs of the files a storescp wrote to ``out_dir``."""
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in out_dir.iterdir() if p.is_file())


def classify_as(ctx: NodeContext, series_uid: str, regions: list[tuple[str, int, int]],
                model_version: str = "test-1") -> int:
    """Write a classification of the series ``series_uid`` as the worker does: its instances in instance
    number order are positions 0..n-1; ``regions`` are (region, first position, last position). Returns
    the series' row id."""
    from dicomnode.classification.model import BODY_PARTS
    from dicomnode.db.models import Instance, RegionRange, SliceResult

    with ctx.sessions.begin() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        instances = s.scalars(select(Instance).where(Instance.series_fk == series.id)
                              .order_by(Instance.instance_number)).all()
        for position, inst in enumerate(instances):
            here = [r for r, a, b in regions if a <= position <= b]
            s.add(SliceResult(instance_fk=inst.id, series_fk=series.id, model_version=model_version,
                              position=position, predicted=here[0] if here else "",
                              body_parts="\\".join(BODY_PARTS[r] for r in here)))
        for ordinal, (region, first, last) in enumerate(regions):
            s.add(RegionRange(series_fk=series.id, ordinal=ordinal, region=region, body_part=BODY_PARTS[region],
                              first_instance_number=instances[first].instance_number,
                              last_instance_number=instances[last].instance_number,
                              first_sop_instance_uid=instances[first].sop_instance_uid,
                              last_sop_instance_uid=instances[last].sop_instance_uid,
                              first_position=first, last_position=last, n_slices=last - first + 1,
                              mean_probability=0.9, model_version=model_version))
        series.classification_state, series.model_version, series.classified_at = "done", model_version, utcnow()
        return series.id


def store_series(ctx: NodeContext, folder: Path) -> tuple[str, str, list[Path]]:
    """Store the files of ``folder`` through ingest; returns (study UID, series UID, files)."""
    from qr_data import _store

    files = sorted(folder.glob("*.dcm"))
    for path in files:
        _store(ctx, path.read_bytes())
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files
