"""Storage is the source of truth: recovery re-indexes complete files, removes only torn ones, reports
rows without their file; the index check compares everything."""

from __future__ import annotations

import os
import time
from io import BytesIO

import pydicom
from pydicom.filewriter import dcmwrite
from sqlalchemy import delete, select

from conftest import CT_FIXTURES
from dicomnode.db.models import Instance
from dicomnode.receive.ingest import SUCCESS, store_instance
from dicomnode.receive.recovery import START_MARKER, check_storage, recover_at_start, recover_storage

SLICES = sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm"))


def indexed(ctx) -> dict[str, str]:
    with ctx.sessions() as s:
        return dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())


def store_all(ctx) -> list:
    for path in SLICES:
        assert store_instance(ctx, path.read_bytes()) == SUCCESS
    return sorted(ctx.storage_dir.rglob("*.dcm"))


def forget_rows(ctx) -> None:
    """What a power loss with SQLite synchronous=NORMAL can do: the last commits are gone, the files stay."""
    with ctx.sessions.begin() as s:
        s.execute(delete(Instance))


def test_complete_files_whose_rows_were_lost_are_reindexed_at_start(node_ctx):
    cfg = node_ctx.config
    stored = store_all(node_ctx)
    before = {p: p.read_bytes() for p in stored}
    rows = indexed(node_ctx)
    forget_rows(node_ctx)
    report = recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions)
    assert report.files_reindexed == 3
    assert indexed(node_ctx) == rows  # same UIDs at the same paths
    assert {p: p.read_bytes() for p in sorted(node_ctx.storage_dir.rglob("*.dcm"))} == before


def test_complete_partial_file_is_published_and_torn_ones_removed(node_ctx):
    stored = store_all(node_ctx)
    folder = stored[0].parent
    ds = pydicom.dcmread(SLICES[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242"  # fsynced, then the node died before the rename
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    complete = buf.getvalue()
    (folder / ".incoming-complete.part").write_bytes(complete)
    (folder / ".incoming-torn.part").write_bytes(complete[:-5000])
    (folder / "1.2.3.999.dcm").write_bytes(b"not an instance")
    report = recover_storage(node_ctx.storage_dir, node_ctx.sessions, since=None)
    assert (report.partial_files_reindexed, report.partial_files_removed) == (1, 1)
    assert report.files_not_indexable == [f"{folder.parent.name}/{folder.name}/1.2.3.999.dcm"]
    published = folder / "1.2.826.0.1.3680043.8.498.4242.dcm"
    assert published.read_bytes() == complete
    assert "1.2.826.0.1.3680043.8.498.4242" in indexed(node_ctx)
    assert not list(folder.glob(".incoming-*"))
    assert (folder / "1.2.3.999.dcm").exists()  # not ours to delete; reported


def test_rows_without_their_file_are_reported_not_deleted(node_ctx, caplog):
    stored = store_all(node_ctx)
    gone = pydicom.dcmread(stored[1], stop_before_pixels=True).SOPInstanceUID
    stored[1].unlink()
    caplog.set_level("ERROR")
    report = recover_storage(node_ctx.storage_dir, node_ctx.sessions, since=None)
    assert report.missing_files == [gone]
    assert gone in indexed(node_ctx)
    assert gone in caplog.text and "dicomnode db check" in caplog.text


def test_only_folders_written_since_the_last_start_are_scanned(node_ctx):
    cfg = node_ctx.config
    stored = store_all(node_ctx)
    folder = stored[0].parent
    recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions)
    assert (cfg.resolved_data_dir / START_MARKER).exists()
    forget_rows(node_ctx)
    # A folder untouched since long before the last start is not scanned (dicomnode db check finds it)...
    old = time.time() - 3600
    os.utime(folder, (old, old))
    assert recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions).folders_scanned == 0
    assert len(check_storage(node_ctx.storage_dir, node_ctx.sessions).unindexed_files) == 3
    # ...one written after it is.
    os.utime(folder, None)
    report = recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions)
    assert report.files_reindexed == 3 and len(indexed(node_ctx)) == 3


def test_check_storage_compares_index_and_files_and_changes_nothing(node_ctx):
    stored = store_all(node_ctx)
    report = check_storage(node_ctx.storage_dir, node_ctx.sessions)
    assert report.consistent and (report.instances_indexed, report.files_found) == (3, 3)
    stored[0].unlink()
    (stored[1].parent / "1.2.3.998.dcm").write_bytes(b"x")
    (stored[1].parent / ".incoming-x.part").write_bytes(b"x")
    report = check_storage(node_ctx.storage_dir, node_ctx.sessions)
    folder = f"{stored[1].parent.parent.name}/{stored[1].parent.name}"
    assert not report.consistent
    assert report.missing_files == [f"{folder}/{stored[0].name}"]
    assert report.unindexed_files == [f"{folder}/1.2.3.998.dcm"]
    assert report.partial_files == [f"{folder}/.incoming-x.part"]
    assert (stored[1].parent / ".incoming-x.part").exists() and len(indexed(node_ctx)) == 3
