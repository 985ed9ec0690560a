"""``dicomnode serve``: run the node (DICOM listener processes, stability scheduler, workers).

Foreground; Ctrl-C or SIGTERM stops everything cleanly.
"""

from __future__ import annotations

import argparse
from typing import Any

from dicomnode.config import Config

HELP = "run the node: DICOM listener, stability scheduler, worker"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, help="TCP port (default 11112)")
    p.add_argument("--ae-title", help="the node's AE title (default DICOMNODE)")
    p.add_argument("--stable-age", type=float, metavar="SECONDS",
                   help="seconds without new instances before a series is stable")
    p.add_argument("--processes", type=int, help="listener processes sharing the port (default: two per core, at most 4)")
    p.add_argument("--no-worker", action="store_true", help="do not run the classification worker in the node")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"port": args.port, "ae_title": args.ae_title, "stable_age_s": args.stable_age,
            "listener.processes": args.processes, "worker.enabled": False if args.no_worker else None}


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.node import serve

    return serve(cfg)
