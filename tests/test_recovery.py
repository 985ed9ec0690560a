"""Start-up recovery removes what an interrupted C-STORE left, and nothing else."""

from __future__ import annotations

import os
import time

from conftest import CT_FIXTURES
from dicomnode.receive.ingest import SUCCESS, store_instance
from dicomnode.receive.recovery import START_MARKER, recover_at_start, recover_storage

SLICES = sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm"))


def test_partial_and_unindexed_files_are_removed(node_ctx):
    for path in SLICES:
        assert store_instance(node_ctx, path.read_bytes()) == SUCCESS
    stored = sorted(node_ctx.storage_dir.rglob("*.dcm"))
    folder = stored[0].parent
    (folder / ".incoming-abc.part").write_bytes(b"torn")
    (folder / "1.2.3.999.dcm").write_bytes(b"never indexed")
    report = recover_storage(node_ctx.storage_dir, node_ctx.sessions, since=None)
    assert (report.partial_files_removed, report.unindexed_files_removed) == (1, 1)
    assert sorted(node_ctx.storage_dir.rglob("*")) == sorted([*stored, folder, folder.parent])


def test_only_folders_written_since_the_last_start_are_scanned(node_ctx):
    cfg = node_ctx.config
    assert store_instance(node_ctx, SLICES[0].read_bytes()) == SUCCESS
    folder = next(node_ctx.storage_dir.rglob("*.dcm")).parent
    recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions)
    assert (cfg.resolved_data_dir / START_MARKER).exists()
    # A folder untouched since long before the last start is not scanned...
    stray = folder / "1.2.3.998.dcm"
    stray.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(folder, (old, old))
    assert recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions).folders_scanned == 0
    assert stray.exists()
    # ...one written after it is.
    os.utime(folder, None)
    report = recover_at_start(cfg.resolved_data_dir, node_ctx.storage_dir, node_ctx.sessions)
    assert report.unindexed_files_removed == 1 and not stray.exists()
