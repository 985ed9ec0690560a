"""``dicomnode protect --study UID [--off]``: keep a study from retention's recycling (or allow it again)."""

from __future__ import annotations

import argparse
import sys

from dicomnode.config import Config

HELP = "protect a study from retention (--off: unprotect)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    p.add_argument("--off", action="store_true", help="remove the protection")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.db.session import checked_index
    from dicomnode.receive.retention import StudyNotDeletable, set_protected
    from dicomnode.receive.storage import InvalidUID

    try:
        with checked_index(cfg) as (_, sessions):
            set_protected(sessions, args.study, protected=not args.off)
    except (StudyNotDeletable, InvalidUID) as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.study} {'unprotected' if args.off else 'protected'}")
    return 0
