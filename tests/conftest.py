"""Shared fixtures: real peers on loopback, real SQLite files, a PostgreSQL server when CI starts one.

- ``FIXTURES``: small real CT copied into the repo; ``SHARED_DATA``: ../shared/data (CI has it too).
- ``dcmtk(name)``: the path of a DCMTK tool from Debian's package (not pynetdicom's same-named apps).
- ``node_config``: a Config on a free port with a fresh data dir; ``db_url`` parametrises SQLite and,
  when ``DICOMNODE_TEST_POSTGRES_URL`` is set, PostgreSQL.
- ``running_node``: the listener started in-process (threads) on that config.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from dicomnode.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CT_FIXTURES = FIXTURES / "ct"
SHARED_DATA = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
POSTGRES_URL = os.environ.get("DICOMNODE_TEST_POSTGRES_URL", "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(name: str) -> str:
    """Path of DCMTK's ``name`` (``/usr/bin``); skips the test where DCMTK is not installed."""
    path = Path("/usr/bin") / name
    if not path.exists():
        pytest.skip(f"DCMTK {name} not installed (apt-get install dcmtk)")
    return str(path)


def wait_for(condition, what: str = "condition", timeout: float = 90.0, interval: float = 0.1):
    """Poll ``condition`` until it returns a true value (which is returned); the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_ended(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not ours (Linux /proc)."""
    fields = _proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def parent_pid(pid: int) -> int | None:
    """The parent of a running process (Linux /proc), None if it is gone."""
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[1])


def wait_for_echo(port: int, timeout: float = 60.0, called: str = "DICOMNODE", host: str = "127.0.0.1") -> None:
    """Wait until a C-ECHO to ``called`` at host:port succeeds (a node started as a process is ready)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate(host, port, ae_title=called)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no C-ECHO answer from {called} at {host}:{port} after {timeout} s")


def send_files(port: int, files: list[Path], calling: str = "SCU", called: str = "DICOMNODE") -> list[int]:
    """C-STORE ``files`` over one pynetdicom association, each as its bytes are (no decode/re-encode)."""
    import pydicom
    from pynetdicom import AE

    metas = [pydicom.dcmread(p, stop_before_pixels=True).file_meta for p in files]
    ae = AE(ae_title=calling)
    for sop_class, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called} at port {port} failed")
    from pynetdicom import _config

    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return [assoc.send_c_store(p).Status for p in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()


def make_postgres_database(base_url: str) -> str:
    """Create a fresh database on the server of ``base_url``; return its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, and a PostgreSQL database when a server is configured."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    if not POSTGRES_URL:
        pytest.skip("DICOMNODE_TEST_POSTGRES_URL not set (.ci/run starts a PostgreSQL server and sets it)")
    return make_postgres_database(POSTGRES_URL)


@pytest.fixture
def node_config(tmp_path) -> Config:
    """Embedded defaults on a free port, data under tmp_path, StableAge 1 s, worker off."""
    return load_config(None, {
        "data_dir": str(tmp_path / "node"),
        "port": free_port(),
        "stable_age_s": 1.0,
        "stability_check_interval_s": 0.2,
        "listener.min_free_space_mb": 1,
        "worker.enabled": False,
    })


@pytest.fixture
def index(node_config):
    """(engine, session factory) of node_config's index at head."""
    from dicomnode.db.session import open_index

    engine, sessions = open_index(node_config)
    yield engine, sessions
    engine.dispose()


@pytest.fixture
def node_ctx(node_config, index):
    from dicomnode.receive.ingest import NodeContext

    return NodeContext(node_config, index[1])


@pytest.fixture
def running_node(node_ctx):
    """The listener of node_ctx, serving on 127.0.0.1:<node_config.port> in this process."""
    from dicomnode.receive.listener import start_listener

    server = start_listener(node_ctx)  # bound and listening when this returns
    yield node_ctx
    server.shutdown()
    server.server_close()


def stop_node(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Stop a node started in its own session as Ctrl-C does (SIGINT); kill its process group if it hangs.
    Returns its exit code."""
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def shared_ct(rel: str) -> Path:
    """A file or folder of ../shared/data/ct; skips the test where the shared data is absent."""
    path = SHARED_DATA / "ct" / rel
    if not path.exists():
        pytest.skip(f"shared data {path} not present")
    return path
