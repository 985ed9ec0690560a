"""What the metrics cost: the C-STORE hook per call and a /metrics scrape, against anchors of the same run.

    python bench/metrics_overhead.py [--calls 100000] [--processes 4]

- hook: ``metrics.cstore(0x0000)`` (multiprocess mode, memory-mapped file) per call, against the receive
  path's own header read of a real CT file (``read_header``) in the same run;
- scrape: ``/metrics`` exposition with the files of ``--processes`` processes that each recorded every
  metric, against a ``dicomnode status`` count query on the same (empty) index.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.http import collectors, metrics  # noqa: E402

FIXTURE = sorted((REPO / "tests" / "fixtures" / "ct").rglob("*.dcm"))[0]


def _per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _record_everything() -> None:
    for code in (0x0000, 0xA700, 0xC210, 0xC220):
        metrics.cstore(code)
    metrics.association_accepted()
    metrics.job_finished("classify", "done", time.monotonic())
    metrics.classified(3.0, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        from dicomnode.config import load_config
        from dicomnode.db.index import counts
        from dicomnode.db.session import open_index
        from dicomnode.receive.headers import read_header

        cfg = load_config(None, {"data_dir": tmp})
        engine, sessions = open_index(cfg)
        folder = metrics.setup(tmp, fresh=True)
        encoded = FIXTURE.read_bytes()
        header_s = _per_call(lambda: read_header(encoded), max(1000, args.calls // 20))
        hook_s = _per_call(lambda: metrics.cstore(0x0000), args.calls)
        print(f"C-STORE hook       {hook_s * 1e6:8.2f} us/call   header read (anchor) {header_s * 1e6:8.2f} us"
              f"   hook / header read {hook_s / header_s:.3f}")

        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=_record_everything) for _ in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()

        def count_query() -> None:
            with sessions() as s:
                counts(s)

        status_s = _per_call(count_query, 50)
        scrape_s = _per_call(lambda: collectors.exposition(folder, sessions), 50)
        print(f"/metrics scrape    {scrape_s * 1e3:8.2f} ms ({args.processes + 1} processes' files)   "
              f"status counts (anchor) {status_s * 1e3:8.2f} ms   scrape / status {scrape_s / status_s:.2f}")
        metrics.reset()
        engine.dispose()


if __name__ == "__main__":
    main()
