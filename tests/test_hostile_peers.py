"""A hostile or broken peer cannot exhaust the node: lying PDU headers, stalled PDU bodies, mutated datasets.

Real peers on loopback: raw TCP sockets for the PDU-level attacks (against a `dicomnode serve` process,
whose listener's memory is read from /proc), pynetdicom for the mutated C-STORE requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import CT_FIXTURES, free_port, stop_node, wait_for, wait_for_echo
from dicomnode.receive.listener import start_listener

SLICES = CT_FIXTURES / "slices"
SERIES_3 = CT_FIXTURES / "series" / "dcmqi_ge_3slice"
FOUR_GB = 0xFFFFFFF0
MAX = 64 << 20  # the largest listener.max_pdu_bytes allowed


# Helpers ----------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listener_pids(node_pid: int) -> list[int]:
    pids = []
    for pid in children(node_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def read_until_closed(sock: socket.socket, timeout: float = 90.0) -> bytes:
    """Everything the node sends on ``sock`` until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@contextlib.contextmanager
def serving(tmp_path: Path, *settings: str, processes: int = 1):
    """`dicomnode serve` as a process with ``settings`` (YAML lines under listener:); yields (proc, port, log)."""
    port = free_port()
    config = tmp_path / "node.yaml"
    listener = "listener:\n" + "".join(f"  {line}\n" for line in settings) if settings else ""
    config.write_text(listener + "worker:\n  enabled: false\n")
    log_path = tmp_path / f"node-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config), "--data-dir",
             str(tmp_path / "data"), "--port", str(port), "--processes", str(processes)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_echo(port, timeout=120)
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            stop_node(proc)


# 1. Lying PDU headers ---------------------------------------------------------------------------

def test_pdu_headers_claiming_4_gb_are_aborted_without_allocating(tmp_path):
    with serving(tmp_path, f"max_pdu_bytes: {MAX}") as (proc, port, log_path):
        (listener,) = wait_for(lambda: listener_pids(proc.pid), what="the listener process")
        before = rss_bytes(listener)
        replies = []
        for pdu_type in [0x01] * 10 + [0x04] * 10:  # A-ASSOCIATE-RQ and P-DATA-TF headers claiming ~4 GB
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(struct.pack(">BBL", pdu_type, 0, FOUR_GB))
                replies.append(read_until_closed(sock))
        # Each connection was aborted (A-ABORT PDU, then closed), none allocated what it claimed.
        assert all(reply[:1] == b"\x07" for reply in replies), replies
        # P-DATA-TF headers within listener.max_pdu_bytes (64 MiB here) whose bodies never come: the
        # buffer grows only with what arrives (20 x 64 MiB if it were allocated as announced).
        held = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(struct.pack(">BBL", 0x04, 0, MAX) + b"\x00" * 10)
            held.append(sock)
        wait_for_echo(port)  # the node still answers while they are held (and has read their headers)
        grown = rss_bytes(listener) - before
        for sock in held:
            sock.close()
        assert grown < 64 << 20, f"listener RSS grew by {grown >> 20} MiB"
        assert alive(listener)
    log = log_path.read_text()
    assert f"announces {FOUR_GB} bytes, more than the {256 * 1024} accepted" in log
    assert f"announces {FOUR_GB} bytes, more than the {MAX} accepted (listener.max_pdu_bytes)" in log


def test_advertised_maximum_pdu_length_is_finite_and_enforced(node_config, index):
    from dicomnode.receive.ingest import NodeContext

    node_config.listener.max_pdu_bytes = 16384
    server = start_listener(NodeContext(node_config, index[1]))
    first = sorted(SERIES_3.glob("*.dcm"))[0]
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, [pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", node_config.port, ae_title="DICOMNODE")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384
        # pynetdicom keeps to it: a 512x512 slice in many PDUs, stored with Success.
        chunked_before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            status = assoc.send_c_store(first)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked_before
        assert status.Status == 0x0000
        # A P-DATA-TF one byte over the limit: the node aborts the association.
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 0x04, 0, 16385) + b"\x00" * 16385)
        wait_for(lambda: not assoc.is_alive(), what="the association's end")
        assert not assoc.is_established
    finally:
        server.shutdown()
        server.server_close()


# 2. A stalled PDU body ----------------------------------------------------------------------------

def test_stalled_pdu_body_is_closed_after_the_network_timeout(node_config, index, caplog):
    from dicomnode.receive.ingest import NodeContext

    node_config.listener.network_timeout_s = 1.0
    server = start_listener(NodeContext(node_config, index[1]))
    try:
        ae = AE(ae_title="SCU")
        ae.network_timeout = None  # this peer never gives up by itself
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node_config.port, ae_title="DICOMNODE")
        assert assoc.is_established
        with caplog.at_level(logging.WARNING, logger="dicomnode"):
            assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 5000) + b"\x00" * 10)
            wait_for(lambda: not assoc.is_alive(), what="the node closing the stalled association")
        assert "only 10 of 5000 bytes of a PDU arrived" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


# 3. Mutated C-STORE requests: every request gets a response, or an abort and a log line ------------

FUZZ_SOURCES = ["pydicom_ct_small.dcm", "ctimage_deflated.dcm", "ctimage_rle.dcm", "ctimage_jpegls_lossless_80.dcm"]


def _split(path: Path) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a Part 10 file."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return raw[:fh.tell()], raw[fh.tell():]


def _implicit_copy(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(SLICES / "pydicom_ct_small.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return path


def head_with_uid(path: Path, uid: str) -> bytes:
    """Preamble and file meta of ``path`` with another MediaStorageSOPInstanceUID (the request's UID)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta.MediaStorageSOPInstanceUID = uid
    del meta.FileMetaInformationGroupLength  # written as is: readers walk group 0002 without it
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=False)
    return buf.getvalue()


def mutate(dataset: bytes, rng: random.Random) -> bytes:
    """One of: flipped bytes, a truncation, inserted or deleted bytes, a length field overwritten."""
    data = bytearray(dataset)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(1, len(data)):]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        at = rng.randrange(len(data))
        del data[at:at + rng.randint(1, 64)]
    else:  # a 16- or 32-bit length-sized field, early in the dataset where the element headers are
        at = rng.randrange(min(len(data) - 4, 2048))
        data[at:at + 4] = struct.pack("<L", rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    return bytes(data)


def test_every_mutated_c_store_gets_a_status_or_a_logged_abort(running_node, tmp_path, caplog):
    n = int(os.environ.get("DICOMNODE_FUZZ_N", "240"))
    rng = random.Random(11)
    sources = [SLICES / name for name in FUZZ_SOURCES] + [_implicit_copy(tmp_path)]
    parts = [(path, *_split(path)) for path in sources]
    metas = [pydicom.dcmread(path, stop_before_pixels=True).file_meta for path in sources]
    ae = AE(ae_title="FUZZ")
    ae.dimse_timeout = 30
    # What the node answered, as this peer's DIMSE layer decoded it. pynetdicom's requestor can lose a
    # very quick response to its own reactor thread ("Received unexpected C-STORE service message",
    # then a DIMSE timeout): the node did answer, so answers are counted here, not from send_c_store.
    responses: list = []
    handlers = [(evt.EVT_DIMSE_RECV, lambda event: responses.append(event.message)
                 if type(event.message).__name__ == "C_STORE_RSP" else None)]
    for meta in metas:
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    unanswered = []
    assoc = None
    sent = 0
    chunked_before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            for i in range(n):
                path, head, dataset = parts[i % len(parts)]
                mutated = tmp_path / f"m{i}.dcm"
                if i % 10 == 9:  # the request's own UID mutated (pynetdicom drops an empty one unanswered)
                    head = head_with_uid(path, rng.choice(["", " ", "1.2..3", "1.2.3.\x004", "x"]))
                mutated.write_bytes(head + mutate(dataset, rng))
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", running_node.config.port, ae_title="DICOMNODE",
                                         evt_handlers=handlers)
                    assert assoc.is_established
                caplog.clear()
                answered = len(responses)
                try:
                    assoc.send_c_store(mutated)
                except ValueError:  # pynetdicom refused to send it (a UID it cannot encode): not a request
                    continue
                sent += 1
                if len(responses) == answered:
                    unanswered.append((i, path.name, assoc.is_aborted, caplog.text))
                mutated.unlink()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked_before
        if assoc is not None and assoc.is_established:
            assoc.release()
    # A request without a status is acceptable only where the node aborted the association and said why.
    assert sent > n * 0.8
    silent = [(i, name) for i, name, aborted, text in unanswered if not (aborted and "abort" in text)]
    assert not silent, "\n\n".join(f"{i} {name}: {text}" for i, name, _, text in unanswered[:3])
