"""``dicomnode mine``: build a labelled dataset from a PACS (see :mod:`trainer.mine`).

Find CT studies by StudyDescription keywords, take their key images (KOS) or a sample of slices, label
them by the label map and write a dataset folder with labels.csv.

::

    dicomnode mine --config config.yaml --keywords liver --keywords "lung*" --since 2020-01-01 --out ./dataset
    dicomnode mine --pacs ORTHANC@127.0.0.1:4242 --keywords neck --out ./dataset --dry-run

Exit status: 0 done, 1 the PACS refused / failed / timed out (the manifest keeps every whole study
retrieved before), 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from dicomnode.config import Config

HELP = "build a labelled CT dataset from a PACS (C-FIND by keywords, C-MOVE/C-GET)"


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _remote(text: str, flag: str) -> dict:
    from trainer.mine import parse_remote

    try:
        return vars(parse_remote(text, flag))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"mining.use_c_get": True if args.use_c_get else None,
            "mining.pacs": args.pacs, "mining.move_destination": args.move_dest}


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run the miner with the config file and the command line's overrides."""
    from trainer.mine import MineOptions, MiningError, mine, summary

    if args.since and args.until and args.since > args.until:
        print(f"dicomnode mine: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return 2
    options = MineOptions(keywords=args.keywords, out_dir=args.out, since=args.since, until=args.until,
                          dry_run=args.dry_run, seed=args.seed, progress=not args.no_progress)
    try:
        result = mine(cfg, options)
    except MiningError as exc:
        print(f"dicomnode mine: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"dicomnode mine: {exc}", file=sys.stderr)
        return 2
    print(summary(result, args.dry_run))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keywords", "-k", action="append", required=True, metavar="WORD",
                   help="StudyDescription keyword, wildcards * and ? allowed, case and accents ignored; repeat")
    p.add_argument("--since", type=_date, metavar="YYYY-MM-DD", help="first StudyDate")
    p.add_argument("--until", type=_date, metavar="YYYY-MM-DD", help="last StudyDate")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (images/, labels.csv, excluded.csv)")
    p.add_argument("--dry-run", action="store_true", help="query and print what would be retrieved; transfer nothing")
    p.add_argument("--pacs", metavar="AE@HOST:PORT", type=lambda t: _remote(t, "--pacs"),
                   help="the PACS (overrides mining.pacs)")
    p.add_argument("--move-dest", metavar="AE@HOST:PORT", type=lambda t: _remote(t, "--move-dest"),
                   help="our storage AE as the PACS knows it (overrides mining.move_destination)")
    p.add_argument("--use-c-get", action="store_true", help="retrieve with C-GET instead of C-MOVE")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level 80/20 split (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
