"""``dicomnode worker``: run a classification worker as its own process (several may run at once,
on PostgreSQL on several machines); it claims jobs from the index's queue."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from dicomnode.config import Config

HELP = "run a classification worker process (claims jobs from the index's queue)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="FILE", help="model checkpoint (overrides model.path; default: shipped model)")
    p.add_argument("--batch-size", type=int, metavar="N", help="slices per inference batch (overrides worker.batch_size)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (overrides worker.device)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"worker.batch_size": args.batch_size, "worker.device": args.device, "model.path": args.model}


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.db.session import open_index
    from dicomnode.http import metrics
    from dicomnode.queue import worker

    metrics.setup(cfg.resolved_data_dir)  # its job counts add up with the node's in /metrics (same data_dir)
    engine, _ = open_index(cfg)  # refuse to start on a schema not at head (SchemaError -> exit 3)
    engine.dispose()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(cfg, stop)
    return 0
