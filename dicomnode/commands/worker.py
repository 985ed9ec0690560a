"""``dicomnode worker``: run the classification worker as its own process (several may run at once)."""

from __future__ import annotations

import argparse
import signal
import threading

from dicomnode.cli import add_config_arguments, config_from_args
from dicomnode.logconfig import setup_logging


def cmd_worker(args: argparse.Namespace) -> int:
    overrides = {"worker.batch_size": args.batch_size, "worker.device": args.device, "model.path": args.model}
    cfg = config_from_args(args, **overrides)
    setup_logging(cfg.log_level)
    from dicomnode.queue import worker
    from dicomnode.db.session import open_index

    engine, _ = open_index(cfg)  # refuse to start on a schema not at head (SchemaError -> exit 3)
    engine.dispose()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(cfg, stop)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a classification worker process (claims jobs from the index's queue)")
    add_config_arguments(p)
    p.add_argument("--model", metavar="FILE", help="model checkpoint (overrides model.path; default: shipped model)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="slices per inference batch (overrides worker.batch_size)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (overrides worker.device)")
    p.set_defaults(func=cmd_worker)
