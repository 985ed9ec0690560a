"""End-to-end classification benchmark: one long 512x512 CT series through the worker's path.

For each size (default 652 and 2,000 slices) it builds a series from the real Siemens chest series of
``../shared/data/ct`` (``bench/make_series.py``: the 30 real slices repeated with new UIDs and consistent
geometry) in a temporary folder, stores it in a fresh SQLite index with ``dicomnode.receive.ingest.store_instance``
(not timed) and queues its job. Then a fresh child process (so that its peak RSS is the classification's
alone, imports and model included) loads the model once and runs the worker on that job exactly as
``dicomnode worker`` does: claim -> one read of each file (headers, and decode + preprocess in the
worker's reader processes, inferred as the batches arrive) -> order -> regions -> store results in one
transaction -> done.

Printed: end-to-end seconds and slices/s, per-stage seconds (read/decode and preprocess are summed over
the readers, so they overlap inference; ``wait`` is the time inference waited for decoded batches),
which stage dominates, the peak RSS of the child, and that of its reader processes. Runs on the CPU,
and on CUDA too when a GPU is present. Nothing is written outside the temporary folder (removed at the
end unless ``--keep``).

    python bench/classify.py [--sizes 652 2000] [--model FILE] [--batch-size 32] [--threads 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _config(workdir: Path, model: str, device: str, batch_size: int, threads: int):
    from dicomnode.config import load_config

    return load_config(None, {
        "data_dir": str(workdir / "node"), "model.path": model, "listener.fsync": False,
        "listener.min_free_space_mb": 1, "worker.device": device, "worker.batch_size": batch_size,
        "worker.threads": threads, "worker.min_slices": 5,
    })


def prepare(workdir: Path, count: int) -> float:
    """Write ``count`` slices, store them in a fresh index and queue the job; returns the data size in MiB."""
    from make_series import DEFAULT_SOURCE, make_series

    from dicomnode.db.models import utcnow
    from dicomnode.receive.ingest import SUCCESS, NodeContext, store_instance
    from dicomnode.db.session import open_index
    from dicomnode.queue.stability import mark_stable_series

    paths = make_series(DEFAULT_SOURCE, workdir / "series", count)
    cfg = _config(workdir, "", "cpu", 32, 0)
    engine, sessions = open_index(cfg)
    ctx = NodeContext(cfg, sessions)
    size = 0
    for p in paths:
        data = p.read_bytes()
        size += len(data)
        status = store_instance(ctx, data, "BENCH")
        if status != SUCCESS:
            raise RuntimeError(f"store_instance({p}) returned 0x{status:04X}")
        p.unlink()  # the stored copy is what the worker reads
    mark_stable_series(sessions, 1.0, now=utcnow() + dt.timedelta(hours=1))
    engine.dispose()
    return size / 2**20


def child(workdir: Path, model: str, device: str, batch_size: int, threads: int) -> dict:
    """Run one queued job through the worker (this process); return the figures."""
    import threading

    from sqlalchemy import update

    from dicomnode.queue import worker
    from dicomnode.db.models import Job
    from dicomnode.db.session import open_index

    cfg = _config(workdir, model, device, batch_size, threads)
    engine, sessions = open_index(cfg)
    with sessions.begin() as s:  # a previous device's run finished this job: queue it again
        s.execute(update(Job).values(state="queued", attempts=0, lease_owner="", error=""))
    state = worker.WorkerState(cfg, sessions, "bench", threading.Event())
    t0 = time.perf_counter()
    loaded = state.model()
    load_s = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    outcome = worker.process_next(state)
    wall = time.perf_counter() - t0
    if outcome != "done":
        raise RuntimeError(f"job ended {outcome!r}")
    r = state.last_result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    readers = _descendants_peak_rss_mib(os.getpid())  # the reader processes and their fork server
    state.close_reader_pool()
    engine.dispose()
    return {"slices": r.n_slices, "device": str(loaded.device), "model_version": loaded.version,
            "net_config": loaded.net_config, "input": f"{loaded.preprocess.channels}x{loaded.preprocess.size}^2 "
            f"at {loaded.preprocess.pixel_mm} mm", "threads": threads or os.cpu_count(),
            "batch_size": cfg.worker.batch_size, "model_load_s": load_s, "end_to_end_s": wall,
            "slices_per_s": r.n_slices / wall, "timings": r.timings.to_dict(), "dominant": r.timings.dominant(),
            "rss_before_job_mib": rss_before, "peak_rss_mib": peak, "reader_processes_peak_rss_mib": readers,
            "regions": [f"{g.region}[{g.first_position}-{g.last_position}]" for g in r.regions]}


def _descendants_peak_rss_mib(pid: int) -> list[float]:
    """Peak RSS (VmHWM) of every process below ``pid`` (Linux /proc; empty elsewhere)."""
    from dicomnode.lifetime import descendants

    out = []
    for child in descendants(pid):
        try:
            hwm = next(line for line in Path(f"/proc/{child}/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
        out.append(int(hwm.split()[1]) / 1024)
    return out


def default_model(workdir: Path) -> tuple[str, str]:
    """The shipped model, else an untrained net of the default architecture (same compute; flagged)."""
    from dicomnode.classification.model import DEFAULT_MODEL_DIR, CHECKPOINT_NAME, DEFAULT_NET_CONFIG, build_net, save_checkpoint
    from dicomnode.classification.imaging.preprocess import PreprocessParams

    if (DEFAULT_MODEL_DIR / CHECKPOINT_NAME).is_file():
        return "", "shipped default model"
    params = PreprocessParams()
    cfg = dict(DEFAULT_NET_CONFIG, in_channels=params.channels, input_size=params.size)
    path = save_checkpoint(workdir / "untrained-default-arch.pt", build_net(cfg), cfg, params,
                           "untrained-default-architecture")
    return str(path), "NO shipped model yet: untrained net of the default architecture (same compute)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[652, 2000], help="series lengths (default 652 2000)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0 = one per core)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.model or "", args.device, args.batch_size, args.threads)))
        return 0

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-classify-"))
    try:
        model, model_note = (args.model, "given") if args.model else default_model(root)
        print(f"model: {model or 'shipped default'} ({model_note}); {os.cpu_count()} CPU core(s); "
              f"load average {os.getloadavg()[0]:.2f} before the run")
        for n in args.sizes:
            workdir = root / f"n{n}"
            t0 = time.perf_counter()
            mib = prepare(workdir, n)
            print(f"\n{n} slices of 512x512 ({mib:.0f} MiB) generated and stored in {time.perf_counter() - t0:.1f} s "
                  "(not timed below)")
            for device in devices:
                cmd = [sys.executable, __file__, "--child", str(workdir), "--device", device,
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
                if model:
                    cmd += ["--model", model]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                f = json.loads(out.stdout.strip().splitlines()[-1])
                t = f["timings"]
                print(f"  [{f['device']}] {f['slices']} slices end-to-end {f['end_to_end_s']:.2f} s = "
                      f"{f['slices_per_s']:.1f} slices/s  (model load {f['model_load_s']:.2f} s, not per series)")
                print(f"    model {f['model_version']}, input {f['input']}, widths {f['net_config'].get('widths')}, "
                      f"threads {f['threads']}, batch {f['batch_size']}")
                print(f"    stages: one read of each file (headers + probabilities) {t['headers_s']:.2f} s | "
                      f"read+decode {t['read_decode_s']:.2f} s and "
                      f"preprocess {t['preprocess_s']:.2f} s (readers, overlapped) | infer {t['infer_s']:.2f} s "
                      f"| waiting for decode {t['wait_s']:.2f} s | regions {t['regions_s']:.3f} s | store "
                      f"{t['store_s']:.2f} s")
                readers = f["reader_processes_peak_rss_mib"]
                print(f"    dominant stage: {f['dominant']}; peak RSS {f['peak_rss_mib']:.0f} MiB "
                      f"(after imports + model load: {f['rss_before_job_mib']:.0f} MiB); {len(readers)} reader "
                      f"process(es) below it (readers, fork server, resource tracker): {sum(readers):.0f} MiB "
                      "peak in all")
                print(f"    regions: {' '.join(f['regions'])}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
