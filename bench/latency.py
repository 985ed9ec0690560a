"""Time to result: from the last C-STORE of a 652-slice CT series to the first C-FIND that returns its regions.

Builds a series of N (default 652) real 512x512 slices cycling the real series of
``../shared/data/ct/series`` (Philips neck-chest, Philips upper abdomen, Siemens chest, GE 3-slice: several
regions, not one slice repeated; the J2K copy and the tilted head series are left out, the one would be
the same pixels again, the other another geometry), with new UIDs per run, consistent geometry
(ImagePositionPatient stepping down) and the pixel data untouched. A node on the **default configuration**
(``dicomnode serve``, embedded defaults, its own data folder and a free port; the only changes: the
benchmark's C-FIND AE is allowed, and the idle HTTP server is off) receives it from DCMTK
``/usr/bin/storescu`` in one association; then a C-FIND at SERIES level asks, every 50 ms, for the series'
BodyPartExamined until the classifier's regions come back.

Printed, with the load average:

- latency: storescu's exit (its last C-STORE response and the release) -> the first C-FIND answer with
  the regions; median of ``--runs`` (3) series;
- ingest rate (images/s, storescu's wall time) with the worker and on a second node with ``--no-worker``,
  the sends interleaved, each pair in alternating order, each send after ``os.sync()`` (so that no send
  pays for the previous one's writeback);
- the node's CPU seconds per series (all its processes, from the send to the regions), with the worker
  and without: their difference is what classification costs the machine, a steadier figure than the
  ingest ratio where the sends are not CPU-bound;
- the regions equal those of ``dicomnode classify`` (a whole-series classification) of the same files;
- the pydicom floor: one process reading and decoding (``pixel_array``) every file, single-threaded;
- the worker's early path (:func:`dicomnode.classification.pipeline.classify_files`, batches of 32)
  in slices/s and as a ratio to the floor, in this process;
- ``dicomnode classify`` of the series as a whole process (median of 3) against 3x the floor.

    python bench/latency.py [--count 652] [--runs 3] [--keep] [--worker-config '{"early": false}']

``--worker-config``: keys of the node's ``worker`` section to try instead of the defaults (the node
without worker keeps the defaults); the ingest line prints the ratio of every send pair too, since the
rates drift between sends more than between the two nodes of one pair.

Everything is written under a temporary folder, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED_SERIES = REPO.parent / "shared" / "data" / "ct" / "series"
SOURCES = ["lungpetctdx_a0001_philips_neck_chest", "lungpetctdx_a0001_philips_upper_abdomen_kernelB",
           "lungpetctdx_a0002_siemens_chest", "dcmqi_ge_3slice"]
STORESCU = "/usr/bin/storescu"


def load(msg: str) -> str:
    return f"{msg} [load {' '.join(f'{v:.2f}' for v in os.getloadavg())}]"


def source_slices() -> list[pydicom.Dataset]:
    """The real slices, series after series, each series top to bottom."""
    out = []
    for name in SOURCES:
        files = sorted((SHARED_SERIES / name).glob("*.dcm"))
        if not files:
            raise SystemExit(f"missing shared data: {SHARED_SERIES / name}")
        series = [pydicom.dcmread(f) for f in files]
        series.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
        out += series
    return out


def make_series(slices: list[pydicom.Dataset], out: Path, count: int, spacing: float = 2.0) -> str:
    """Write ``count`` slices cycling ``slices`` as one new series in ``out``; return its UID."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    z0 = 0.0
    for i in range(count):
        ds = slices[i % len(slices)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber, ds.InstanceNumber, ds.Modality = 900, i + 1, "CT"
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, round(z0 - i * spacing, 3)]
        ds.SliceLocation = round(z0 - i * spacing, 3)
        ds.BodyPartExamined = ""  # what comes back must be the classifier's
        ds.save_as(out / f"{i + 1:04d}.dcm", enforce_file_format=True)
    return series_uid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_ok(port: int) -> bool:
    return subprocess.run(["/usr/bin/echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode == 0


def start_node(workdir: Path, worker: bool, worker_config: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = workdir / "config.yaml"
    # The defaults, plus the one permission the benchmark needs (its C-FIND AE), and no HTTP server
    # (idle either way; it would want port 8042); ``worker_config``: keys of ``worker`` to try instead.
    config.write_text(json.dumps({"qr": {"allowed_peers": [{"ae_title": "BENCHFIND", "host": "127.0.0.1"}]},
                                  "http": {"enabled": False}, "worker": worker_config or {}}))
    args = [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config), "--data-dir",
            str(workdir / "node"), "--port", str(port)]
    if not worker:
        args.append("--no-worker")
    log = open(workdir / f"node-{'worker' if worker else 'noworker'}.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not echo_ok(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.flush()  # the folder is removed on the way out (unless --keep): show the log's end here
            tail = Path(log.name).read_text(errors="replace").splitlines()[-20:]
            raise SystemExit("the node did not start; the end of its log:\n" + "\n".join(tail))
        time.sleep(0.5)
    if worker:  # let the worker process import torch and load the model before timing
        deadline = time.monotonic() + 120
        while "loaded model" not in Path(log.name).read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    return proc, port


def stop_node(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def send(folder: Path, port: int) -> float:
    """storescu the folder in one association; seconds until storescu exited (last response + release)."""
    t0 = time.perf_counter()
    sent = subprocess.run([STORESCU, "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(folder)],
                          capture_output=True, timeout=600)
    if sent.returncode != 0:
        raise SystemExit(f"storescu failed: {sent.stderr.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - t0


def find_body_parts(ae, port: int, series_uid: str) -> str:
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.SeriesInstanceUID = series_uid
    q.BodyPartExamined = ""
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return ""
    found = ""
    try:
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            if status is not None and status.Status in (0xFF00, 0xFF01) and ident is not None:
                value = ident.get("BodyPartExamined", "")
                found = "\\".join(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else str(value or "")
    finally:
        assoc.release()
    return found


def wait_for_regions(port: int, series_uid: str, timeout: float = 300.0) -> tuple[float, str]:
    """Seconds until a C-FIND returns BodyPartExamined for the series, and the value."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = find_body_parts(ae, port, series_uid)
        if value:
            return time.perf_counter() - t0, value
        time.sleep(0.05)
    raise SystemExit(f"no regions for {series_uid} after {timeout:.0f} s")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` and every process below it have used so far."""
    from dicomnode.lifetime import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)
    return total / os.sysconf("SC_CLK_TCK")


def pydicom_floor(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        _ = pydicom.dcmread(f).pixel_array
    return time.perf_counter() - t0


def early_path(files: list[Path], batch: int = 32) -> float:
    """Seconds the worker's early path takes for ``files`` (model loaded before timing, as a worker does)."""
    from dicomnode.classification.model import load_inference_model
    from dicomnode.classification.pipeline import classify_files

    model = load_inference_model(None, "cpu")
    classify_files(files[:batch], model)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        classify_files(files[i:i + batch], model)
    return time.perf_counter() - t0


def classify_process(folder: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "classify", "--json", "--no-slices", str(folder)],
                         capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"dicomnode classify failed: {out.stderr.decode(errors='replace')[-2000:]}")
    return wall, json.loads(out.stdout)["series"][0]


def node_regions(workdir: Path, series_uid: str) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(workdir / "node" / "index.sqlite")
    try:
        return db.execute(
            "SELECT r.region, r.first_position, r.last_position FROM region_ranges r JOIN series s ON s.id = r.series_fk "
            "WHERE s.series_instance_uid = ? ORDER BY r.ordinal", (series_uid,)).fetchall()
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=652)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--worker-config", type=json.loads, default={}, metavar="JSON",
                        help='keys of the worker section to try instead of the defaults, e.g. \'{"early": false}\'')
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-latency-"))
    try:
        slices = source_slices()
        print(load(f"{args.count}-slice series cycling {len(slices)} real slices of {len(SOURCES)} series; "
                   f"{os.cpu_count()} CPU core(s); node on the default configuration"))
        folders = []
        for run in range(args.runs * 2):
            folder = root / f"series{run}"
            folders.append((folder, make_series(slices, folder, args.count)))
        files = sorted(folders[0][0].glob("*.dcm"))
        mib = sum(f.stat().st_size for f in files) / 2**20

        with_worker, without, latencies, values, cpu_with, cpu_without = [], [], [], [], [], []
        (root / "nw").mkdir()
        node, port = start_node(root, worker=True, worker_config=args.worker_config)
        bare, bare_port = start_node(root / "nw", worker=False)

        def send_with_worker(run: int) -> None:
            folder, uid = folders[run]
            cpu0 = tree_cpu_s(node.pid)
            t_send = send(folder, port)
            latency, value = wait_for_regions(port, uid)
            cpu_with.append(tree_cpu_s(node.pid) - cpu0)
            with_worker.append(args.count / t_send)
            latencies.append(latency)
            values.append(value)
            print(load(f"run {run + 1}: sent in {t_send:.2f} s ({args.count / t_send:.0f} images/s), "
                       f"regions {value} {latency:.2f} s after storescu's last response"))

        def send_without_worker(run: int) -> None:
            cpu0 = tree_cpu_s(bare.pid)
            t_send = send(folders[args.runs + run][0], bare_port)
            cpu_without.append(tree_cpu_s(bare.pid) - cpu0)
            without.append(args.count / t_send)
            print(load(f"run {run + 1}, node without worker: {args.count / t_send:.0f} images/s"))

        try:  # interleaved, so that the shared machine's load falls on both alike
            for run in range(args.runs):
                # Each pair alternates which node goes first, and every send starts with the page cache
                # written back (os.sync), so that the second send of a pair does not pay for the first's
                # 328 MiB of writeback.
                for send_one in ((send_with_worker, send_without_worker) if run % 2 == 0
                                 else (send_without_worker, send_with_worker)):
                    os.sync()
                    send_one(run)
                time.sleep(2)  # the next series starts from a quiet node
        finally:
            stop_node(node)
            stop_node(bare)
        floor = pydicom_floor(files)
        classify_runs = [classify_process(folders[0][0]) for _ in range(3)]
        classify_s = statistics.median(t for t, _ in classify_runs)
        whole = classify_runs[0][1]
        whole_regions = [(r["region"], r["first_position"], r["last_position"]) for r in whole["regions"]]
        equal = all(node_regions(root, uid) == whole_regions for _, uid in folders[:args.runs])
        equal_bp = all(v == "\\".join(whole["body_parts"]) for v in values)
        early = early_path(files)

        med_with, med_without = statistics.median(with_worker), statistics.median(without)
        print()
        print(load(f"latency, last C-STORE response -> C-FIND with regions: median {statistics.median(latencies):.2f} s "
                   f"(runs {', '.join(f'{v:.2f}' for v in latencies)}; goal < 5 s)"))
        pairs = [w / wo for w, wo in zip(with_worker, without)]
        print(load(f"ingest {mib:.0f} MiB: {med_with:.0f} images/s with the worker, {med_without:.0f} without "
                   f"(ratio {med_with / med_without:.2f}; per send pair {', '.join(f'{r:.2f}' for r in pairs)}, "
                   f"median {statistics.median(pairs):.2f}; goal >= 0.90)"))
        print(load(f"node CPU per series (all its processes, send + classification): {statistics.median(cpu_with):.2f} s "
                   f"with the worker, {statistics.median(cpu_without):.2f} s without (medians; classification "
                   f"{statistics.median(cpu_with) - statistics.median(cpu_without):.2f} s)"))
        print(f"regions equal to `dicomnode classify` of the same files: {equal and equal_bp} "
              f"({whole['body_parts']})")
        print(load(f"pydicom floor (read + decode {args.count} files, one thread): {floor:.2f} s "
                   f"({args.count / floor:.0f} slices/s)"))
        print(load(f"worker early path (read once + decode + preprocess + infer, batches of 32): {early:.2f} s "
                   f"({args.count / early:.0f} slices/s, {early / floor:.2f}x the floor)"))
        print(load(f"`dicomnode classify` whole process: median {classify_s:.2f} s "
                   f"({classify_s / floor:.2f}x the floor; goal < 3x = {3 * floor:.2f} s)"))
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
