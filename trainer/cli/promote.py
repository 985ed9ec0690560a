"""``dicomnode promote MODEL --config FILE``: install a trained model atomically where the node's
configuration points (``model.path``), keeping the previous one."""

from __future__ import annotations

import argparse
import json
import sys

from dicomnode.config import Config

HELP = "install a trained model for the node (where model.path points)"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Install a model where the node's config points (``model.path``)."""
    if not args.config:
        print("dicomnode promote: --config is required (the node's YAML configuration, whose model.path is set)",
              file=sys.stderr)
        return 2
    from trainer.promote import promote

    try:
        record = promote(args.model, args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dicomnode promote: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        prev = record["previous_version"] or "none (the shipped default)"
        print(f"promoted {record['version']} to {record['target']} (previous: {prev})")
        if record["config_updated"]:
            print(f"set model.path in {args.config} to {record['target']}; restart a running node to read it")
        else:
            print("the node uses it from its next job on")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint file or run directory")
    p.add_argument("--json", action="store_true", help="print the promotion record as JSON")
