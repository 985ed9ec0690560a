"""A real Orthanc (Debian's ``/usr/sbin/Orthanc``) for tests: started on free loopback ports, stopped after.

Usage, in a test module::

    from tests.orthanc import orthanc_server

    @pytest.fixture(scope="module")
    def pacs(tmp_path_factory):
        with orthanc_server(tmp_path_factory.mktemp("orthanc"), modalities={"miner": ("MINER", "127.0.0.1", port)}) as o:
            o.store([...paths or pydicom datasets...])   # over C-STORE
            yield o

Orthanc gets a temporary storage folder and a JSON config naming the given modalities (AE title, host,
port); C-FIND, C-MOVE and C-GET are allowed only for those, as at a hospital. ``add_modality`` registers
one more over the REST API while it runs. The HTTP port serves the REST API for checks in tests
(instance counts, deletion), never for loading data: data goes in over C-STORE like a modality's would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from tests.conftest import free_port

ORTHANC = Path("/usr/sbin/Orthanc")


@dataclass
class Orthanc:
    """A running Orthanc: where it listens and a few helpers to load and inspect it."""

    ae_title: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen
    host: str = "127.0.0.1"
    log_path: Path = field(default_factory=Path)

    @property
    def address(self) -> str:
        """``AE@host:port``, the form ``dicomnode mine --pacs`` takes."""
        return f"{self.ae_title}@{self.host}:{self.dicom_port}"

    # REST --------------------------------------------------------------------------------------------
    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        """Call the REST API with ``body`` as JSON (or ``raw`` bytes); return the decoded JSON answer."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Register a DICOM modality (a C-MOVE destination and an allowed caller) while Orthanc runs."""
        self.rest("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port})

    def remove_modality(self, name: str) -> None:
        self.rest("DELETE", f"/modalities/{name}")

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def clear(self) -> None:
        """Delete every patient (and so everything) stored."""
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    # DICOM -------------------------------------------------------------------------------------------
    def store(self, items: Iterable[Any], calling_ae_title: str = "LOADER") -> int:
        """C-STORE files (paths) or pydicom datasets to Orthanc in one association; return how many."""
        return c_store(self.host, self.dicom_port, self.ae_title, items, calling_ae_title)


def c_store(host: str, port: int, called_ae_title: str, items: Iterable[Any], calling_ae_title: str = "LOADER") -> int:
    """C-STORE files (paths) or pydicom datasets to any SCP in one association; return how many.

    Raises ``RuntimeError`` naming the instance when the SCP refuses one.
    """
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(str(item)) if isinstance(item, (str, os.PathLike)) else item for item in items]
    if not datasets:
        return 0
    ae = AE(ae_title=calling_ae_title)
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    if len(pairs) > 128:
        raise ValueError("too many SOP class / transfer syntax pairs for one association")
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=called_ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"{called_ae_title}@{host}:{port} refused the association for C-STORE")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                raise RuntimeError(f"{called_ae_title} refused C-STORE of {ds.SOPInstanceUID}: status {code}")
    finally:
        assoc.release()
    return len(datasets)


def _wait_until_up(orthanc: Orthanc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.process.poll() is not None:
            log = orthanc.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Orthanc exited with code {orthanc.process.returncode} on start:\n{log}")
        try:
            orthanc.rest("GET", "/system")
            with socket.create_connection((orthanc.host, orthanc.dicom_port), timeout=0.5):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise TimeoutError(f"Orthanc did not come up on ports {orthanc.dicom_port}/{orthanc.http_port} in {timeout} s")


def orthanc_config(workdir: Path, ae_title: str, dicom_port: int, http_port: int,
                   modalities: dict[str, tuple[str, str, int]] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config: loopback only, temporary storage, no plugins, the given modalities."""
    config: dict[str, Any] = {
        "Name": "dicomnode-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": False,
        "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in (modalities or {}).items()},
        "DicomScuTimeout": 10,
        "DicomAssociationCloseDelay": 0,
        "UnknownSopClassAccepted": False,
        "StorageCompression": False,
        "SyncStorageArea": False,
        "SaveJobs": False,
        "OverwriteInstances": True,
        "StableAge": 3600,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 4,
        "MetricsEnabled": False,
        "DeidentifyLogs": True,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "StorageAccessOnFind": "Always",
    }
    config.update(extra or {})
    return config


def start_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                  ae_title: str = "ORTHANC", extra_config: dict[str, Any] | None = None,
                  timeout: float = 60.0) -> Orthanc:
    """Start Orthanc in ``workdir`` on free loopback ports and wait until DICOM and HTTP answer."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(orthanc_config(workdir, ae_title, dicom_port, http_port, modalities,
                                                     extra_config), indent=2))
    log_path = workdir / "orthanc.log"
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen([str(ORTHANC), str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=workdir, start_new_session=True)
    finally:
        log.close()
    orthanc = Orthanc(ae_title, dicom_port, http_port, workdir, process, log_path=log_path)
    try:
        _wait_until_up(orthanc, timeout)
    except BaseException:
        stop_orthanc(orthanc)
        raise
    return orthanc


def stop_orthanc(orthanc: Orthanc, timeout: float = 20.0) -> None:
    """Stop Orthanc (SIGTERM, then SIGKILL) and wait for it."""
    process = orthanc.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def orthanc_server(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                   ae_title: str = "ORTHANC", extra_config: dict[str, Any] | None = None,
                   keep_files: bool = False) -> Iterator[Orthanc]:
    """Context manager: a running :class:`Orthanc`, stopped (and its storage removed) on exit."""
    orthanc = start_orthanc(workdir, modalities, ae_title, extra_config)
    try:
        yield orthanc
    finally:
        stop_orthanc(orthanc)
        if not keep_files:
            shutil.rmtree(Path(workdir) / "storage", ignore_errors=True)
            shutil.rmtree(Path(workdir) / "index", ignore_errors=True)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """A module-scoped, empty Orthanc with no modalities (``add_modality`` registers one); import it into a
    test module (``from tests.orthanc import orthanc``) to use it."""
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as o:
        yield o
