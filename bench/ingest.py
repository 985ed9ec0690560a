"""Ingest benchmark: DCMTK storescu sends a 600-slice CT series to dicomnode, DCMTK storescp and Orthanc.

Every receiver is started fresh (empty data folder, free port) for every measurement and receives the same
series over one association, then over four in parallel (the files split into four groups), in the same run.
The clock runs from the start of the first storescu to the exit of the last one: storescu exits after the
last C-STORE response, and dicomnode answers Success only once the file is fsynced, renamed and indexed.
After each send the receiver's count of stored instances is checked against the number sent.

    python bench/make_series.py               # once: bench/out/series600 (git-ignored)
    python bench/ingest.py [--repeats 3] [--json] [--receivers dicomnode,storescp,storescp-fork,orthanc]

Durability of each receiver as run here (their defaults):
- dicomnode: temp file + fsync + rename (+ folder fsync when a file is created), index row committed in
  SQLite (WAL, synchronous=NORMAL, as Orthanc) before Success; N listener processes accept from one socket.
- dicomnode-powersafe: the same with ``listener.power_loss_safe: true``: a folder fsync after each rename and
  SQLite synchronous=FULL (nothing acknowledged is lost even on power loss).
- storescp: writes each file, no fsync; ``--fork`` runs one process per association.
- Orthanc: SyncStorageArea=true (fsync of each file, default since 1.7.4), SQLite index, DicomThreadsCount=4.

storescu, storescp and Orthanc get ``TCP_NODELAY=1`` in their environment (DCMTK reads it; without it
Nagle's algorithm caps a DCMTK peer at ~20 images/s). Figures are medians over the repeats; the machine's load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = REPO / "bench" / "out" / "series600"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
RECEIVERS = ("dicomnode", "dicomnode-powersafe", "storescp", "storescp-fork", "orthanc")
# DCMTK (storescu, storescp, and Orthanc, built on DCMTK) read TCP_NODELAY from the environment.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


def echo_ok(port: int, aec: str) -> bool:
    return subprocess.run([ECHOSCU, "-aec", aec, "127.0.0.1", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=10).returncode == 0


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Receivers ------------------------------------------------------------------------------------------

@dataclass
class Receiver:
    """One started receiver: where to send, how to count what it stored, how to stop it."""

    name: str
    port: int
    ae_title: str
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)


class DicomNode(Receiver):
    def count(self) -> int:
        with sqlite3.connect(self.workdir / "data" / "index.sqlite") as db:
            return db.execute("SELECT count(*) FROM instances").fetchone()[0]


class StoreSCP(Receiver):
    def count(self) -> int:
        return sum(1 for p in (self.workdir / "out").iterdir() if p.is_file())


class Orthanc(Receiver):
    http_port: int = 0

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=10) as r:
            return int(json.load(r)["CountInstances"])


def start_dicomnode(workdir: Path, processes: int | None, power_loss_safe: bool = False) -> Receiver:
    port = free_port()
    log_path = workdir / "dicomnode.log"
    cmd = [sys.executable, "-m", "dicomnode.cli", "serve", "--data-dir", str(workdir / "data"), "--port", str(port),
           "--no-worker", "--log-level", "INFO"]
    if power_loss_safe:
        config = workdir / "dicomnode.yaml"
        config.write_text("listener:\n  power_loss_safe: true\n")
        cmd += ["--config", str(config)]
    if processes:
        cmd += ["--processes", str(processes)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    r = DicomNode("dicomnode", port, "DICOMNODE", workdir, [proc])
    # The parent logs "listening on" once every listener process is ready.
    wait_until(lambda: "listening on" in log_path.read_text(errors="replace"), 120, "dicomnode", proc)
    return r


def start_storescp(workdir: Path, fork: bool) -> Receiver:
    port = free_port()
    out = workdir / "out"
    out.mkdir()
    cmd = [STORESCP, "-aet", "STORESCP", "-od", str(out)] + (["--fork"] if fork else []) + [str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    r = StoreSCP("storescp-fork" if fork else "storescp", port, "STORESCP", workdir, [proc])
    wait_until(lambda: echo_ok(port, "STORESCP"), 30, "storescp", proc)
    return r


def start_orthanc(workdir: Path) -> Receiver:
    port, http_port = free_port(), free_port()
    storage = workdir / "storage"
    config = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http_port,
        "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
        "Plugins": [],
        # Everything else at Orthanc's defaults: SyncStorageArea true (fsync every file), SQLite index,
        # StorageCompression false, DicomThreadsCount 4, OverwriteInstances false.
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    with open(workdir / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([ORTHANC, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    r = Orthanc("orthanc", port, "ORTHANC", workdir, [proc])
    r.http_port = http_port
    wait_until(lambda: r.count() == 0, 60, "orthanc", proc)
    wait_until(lambda: echo_ok(port, "ORTHANC"), 30, "orthanc", proc)
    return r


def start_receiver(name: str, workdir: Path, processes: int | None) -> Receiver:
    if name in ("dicomnode", "dicomnode-powersafe"):
        return start_dicomnode(workdir, processes, power_loss_safe=name == "dicomnode-powersafe")
    if name in ("storescp", "storescp-fork"):
        return start_storescp(workdir, fork=name == "storescp-fork")
    if name == "orthanc":
        return start_orthanc(workdir)
    raise ValueError(f"unknown receiver {name!r}; choose from {', '.join(RECEIVERS)}")


# Sending ---------------------------------------------------------------------------------------------

def send(files: list[Path], receiver: Receiver, associations: int) -> float:
    """storescu over ``associations`` parallel associations; returns the seconds until all have finished."""
    groups = [files[i * len(files) // associations:(i + 1) * len(files) // associations] for i in range(associations)]
    env = DCMTK_ENV
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
                          *map(str, group)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for group in groups
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.name} exited with {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its descendants, including reaped children."""
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / _CLK_TCK  # utime stime cutime cstime
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


def measure(name: str, files: list[Path], associations: int, processes: int | None, keep: bool) -> tuple[float, float]:
    """(images per second, receiver CPU milliseconds per image) of one send to a fresh receiver."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    receiver = None
    try:
        receiver = start_receiver(name, workdir, processes)
        cpu0 = sum(tree_cpu_seconds(p.pid) for p in receiver.procs)
        seconds = send(files, receiver, associations)
        cpu = sum(tree_cpu_seconds(p.pid) for p in receiver.procs) - cpu0
        stored = receiver.count()
        if stored != len(files):
            raise RuntimeError(f"{name} stored {stored} of {len(files)} instances ({workdir})")
        return len(files) / seconds, cpu * 1000 / len(files)
    finally:
        if receiver is not None:
            receiver.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="C-STORE ingest benchmark: dicomnode vs DCMTK storescp vs Orthanc")
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="folder of the series (bench/make_series.py)")
    parser.add_argument("--receivers", default="dicomnode,dicomnode-powersafe,storescp,storescp-fork,orthanc",
                        help=f"comma-separated, from {', '.join(RECEIVERS)}")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell; the median is reported")
    parser.add_argument("--processes", type=int, help="dicomnode listener processes (default: the node's own)")
    parser.add_argument("--keep", action="store_true", help="keep the receivers' folders (printed on failure)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    for tool in (STORESCU, STORESCP, ECHOSCU, ORTHANC):
        if not Path(tool).exists():
            parser.error(f"{tool} not found (apt-get install dcmtk orthanc)")
    if not args.series.is_dir():
        sys.path.insert(0, str(REPO / "bench"))
        from make_series import make_series, DEFAULT_SOURCE

        print(f"{args.series} missing: generating it", file=sys.stderr)
        make_series(DEFAULT_SOURCE, args.series, 600)
    files = sorted(args.series.glob("*.dcm"))
    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    assocs = [int(a) for a in args.associations.split(",")]
    for r in receivers:
        if r not in RECEIVERS:
            parser.error(f"unknown receiver {r!r}")

    rates: dict[tuple[str, int], list[float]] = {(r, a): [] for r in receivers for a in assocs}
    cpus: dict[tuple[str, int], list[float]] = {(r, a): [] for r in receivers for a in assocs}
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        for a in assocs:
            for r in receivers:  # interleaved, so that load changes hit every receiver alike
                rate, cpu_ms = measure(r, files, a, args.processes, args.keep)
                rates[(r, a)].append(rate)
                cpus[(r, a)].append(cpu_ms)
                print(f"  run {rep + 1}/{args.repeats}: {r:14s} {a} assoc: {rate:7.0f} img/s, "
                      f"{cpu_ms:5.2f} CPU ms/img, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "images": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "images_per_s": {r: {str(a): round(med[(r, a)], 1) for a in assocs} for r in receivers},
        "runs": {r: {str(a): [round(x, 1) for x in rates[(r, a)]] for a in assocs} for r in receivers},
        "cpu_ms_per_image": {r: {str(a): round(statistics.median(cpus[(r, a)]), 3) for a in assocs} for r in receivers},
        "dicomnode_ratio": {
            r: {str(a): round(med[("dicomnode", a)] / med[(r, a)], 3) for a in assocs}
            for r in receivers if r != "dicomnode" and "dicomnode" in receivers
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(files)} images ({result['bytes'] / 2**20:.0f} MiB), median of {args.repeats}, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after")
    header = "receiver            " + "".join(f"{a} assoc img/s   " for a in assocs) + "".join(
        f"CPU ms/img ({a})  " for a in assocs)
    if "dicomnode" in receivers:
        header += "".join(f"dicomnode/this ({a})  " for a in assocs)
    print(header)
    for r in receivers:
        line = f"{r:20s}" + "".join(f"{med[(r, a)]:13.0f}     " for a in assocs) + "".join(
            f"{statistics.median(cpus[(r, a)]):14.2f}   " for a in assocs)
        if "dicomnode" in receivers:
            line += "".join(f"{med[('dicomnode', a)] / med[(r, a)]:17.2f}    " for a in assocs)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
