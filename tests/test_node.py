"""`dicomnode serve` as a real process: embedded defaults, stable series, clean stop, kill -9 recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, text

from conftest import CT_FIXTURES, SHARED_DATA, dcmtk, free_port, send_files, stop_node, wait_for_echo
from dicomnode.part10 import check_complete, dataset_offset

SERIES_3 = CT_FIXTURES / "series" / "dcmqi_ge_3slice"
BIG_SERIES = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"  # 30 slices, 16 MB


def start_node(data: Path, port: int, *extra: str) -> subprocess.Popen:
    log = open(data.parent / f"node-{port}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--data-dir", str(data), "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def status(data: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--data-dir", str(data), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def storescu(port: int, path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(path)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kw)


def sentinel_series(folder: Path) -> Path:
    """SERIES_3 as another series (new Series and SOP Instance UIDs), written to ``folder``."""
    from pydicom.uid import generate_uid

    folder.mkdir()
    series_uid = generate_uid()
    for f in sorted(SERIES_3.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f.name, enforce_file_format=True)
    return folder


def test_serve_on_embedded_defaults_receives_and_enqueues_once(tmp_path):
    data, port = tmp_path / "data", free_port()
    node = start_node(data, port, "--stable-age", "1", "--no-worker", "--processes", "2")
    try:
        wait_for_echo(port)
        result = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)], timeout=30)
        assert result.returncode == 0
        assert storescu(port, SERIES_3).wait(60) == 0
        deadline = time.monotonic() + 30
        while status(data)["jobs"]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        counts = status(data)
        assert (counts["studies"], counts["series"], counts["instances"]) == (1, 1, 3)
        assert counts["jobs"]["queued"] == 1
        assert counts["last_received_at"]
        # The same series again: no new rows, no second job. Then a sentinel series: once it is
        # queued, the stability checks have run after the resend, so any wrong re-open would show.
        assert storescu(port, SERIES_3).wait(60) == 0
        assert storescu(port, sentinel_series(tmp_path / "sentinel")).wait(60) == 0
        deadline = time.monotonic() + 60
        while status(data)["jobs"]["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        counts = status(data)
        assert counts["instances"] == 6 and counts["series"] == 2
        assert counts["jobs"]["queued"] == 2 and counts["jobs"]["cancelled"] == 0
    finally:
        assert stop_node(node) == 0  # Ctrl-C stops cleanly
    log = (tmp_path / f"node-{port}.log").read_text()
    assert "Traceback" not in log
    assert "stopped" in log


def indexed_paths(data: Path) -> dict[str, str]:
    engine = create_engine(f"sqlite:///{data / 'index.sqlite'}")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT sop_instance_uid, path FROM instances")).all())
    engine.dispose()
    return rows


def assert_consistent(data: Path) -> int:
    """Every file in storage is indexed and whole, and every indexed instance has its whole file."""
    storage = data / "storage"
    indexed = indexed_paths(data)
    files = {str(p.relative_to(storage)) for p in storage.rglob("*.dcm")}
    assert files == set(indexed.values())
    for rel in files:
        raw = (storage / rel).read_bytes()
        ds = pydicom.dcmread(storage / rel)
        check_complete(raw[dataset_offset(raw):], ds.file_meta.TransferSyntaxUID)
        _ = ds.pixel_array.shape
    return len(indexed)


@pytest.mark.skipif(not BIG_SERIES.exists(), reason="needs ../shared/data")
def test_kill_9_mid_transfer_leaves_only_complete_indexed_instances(tmp_path):
    data, port = tmp_path / "data", free_port()
    node = start_node(data, port, "--no-worker", "--processes", "1")
    try:
        wait_for_echo(port)
        sender = storescu(port, BIG_SERIES)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (data / "index.sqlite").exists() and len(indexed_paths(data)) >= 3:
                break
            time.sleep(0.02)
        os.killpg(node.pid, signal.SIGKILL)  # the node and its listener processes, mid-transfer
        node.wait(10)
        sender.wait(60)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    indexed_at_kill = len(indexed_paths(data))
    assert 3 <= indexed_at_kill < 30, f"{indexed_at_kill} instances: the transfer was not interrupted"

    node = start_node(data, port, "--no-worker", "--processes", "1")
    try:
        wait_for_echo(port)
        # After the restart's recovery: only complete, indexed instances, no partial files. Recovery also
        # publishes the one instance in flight at the kill when its temporary file was already complete
        # (storage is the source of truth), so there may be one more than were indexed at the kill.
        assert not list((data / "storage").rglob("*.part"))
        assert indexed_at_kill <= assert_consistent(data) <= indexed_at_kill + 1
        assert storescu(port, BIG_SERIES).wait(120) == 0  # re-sending completes the series
    finally:
        assert stop_node(node) == 0
    assert assert_consistent(data) == 30
    counts = status(data)
    assert (counts["series"], counts["instances"]) == (1, 30)


def test_node_on_postgresql(tmp_path):
    from conftest import POSTGRES_URL, make_postgres_database

    if not POSTGRES_URL:
        pytest.skip("DICOMNODE_TEST_POSTGRES_URL not set (.ci/run starts a PostgreSQL server and sets it)")
    url = make_postgres_database(POSTGRES_URL)
    config = tmp_path / "node.yaml"
    config.write_text(f"database_url: '{url}'\nstable_age_s: 1\nworker:\n  enabled: false\n")
    data, port = tmp_path / "data", free_port()
    cli = [sys.executable, "-m", "dicomnode.cli"]
    # A server database is never created implicitly: the node refuses until it is upgraded.
    refused = subprocess.run([*cli, "serve", "--config", str(config), "--data-dir", str(data), "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "dicomnode db upgrade" in refused.stderr
    upgraded = subprocess.run([*cli, "db", "upgrade", "--config", str(config)], capture_output=True, text=True,
                              timeout=60)
    assert upgraded.returncode == 0, upgraded.stderr
    node = start_node(data, port, "--config", str(config), "--processes", "2")
    try:
        wait_for_echo(port)
        # Two associations at once (DCMTK and pynetdicom), served by the two listener processes.
        dcmtk_sender = storescu(port, SERIES_3)
        j2k = sorted((CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k").glob("*.dcm"))
        assert send_files(port, j2k) == [0] * len(j2k)
        assert dcmtk_sender.wait(60) == 0, dcmtk_sender.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = subprocess.run([*cli, "status", "--config", str(config), "--json"], capture_output=True,
                                    text=True, timeout=60)
            counts = json.loads(result.stdout)
            if counts["jobs"]["queued"] == 2:
                break
            time.sleep(0.3)
        assert (counts["series"], counts["instances"], counts["jobs"]["queued"]) == (2, 13, 2)
    finally:
        assert stop_node(node) == 0
