"""``dicomnode retrain --config FILE``: scheduled retraining (``retrain`` in the config): mine, train,
evaluate the candidate and the current model on a fixed held-out manifest, promote only when not worse."""

from __future__ import annotations

import argparse
import json
import sys

from dicomnode.config import Config

HELP = "scheduled retraining: mine, train, evaluate, promote if not worse"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run the scheduled retraining (``retrain`` in the config), or one run now with ``--once``."""
    if not args.config:
        print("dicomnode retrain: --config is required (the node's YAML configuration)", file=sys.stderr)
        return 2
    from dicomnode.cli import require_extra

    require_extra("retrain", "sklearn", "nibabel", "PIL")
    from trainer import retrain

    if args.once:
        result = retrain.retrain_once(cfg, args.config)
        print(json.dumps(result, indent=2))
        return 0
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return retrain.run_scheduler(cfg, args.config, stop)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="one run now (ignores retrain.enabled and the cron)")
