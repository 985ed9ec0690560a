"""``dicomnode delete --study UID``: delete a study's files and index rows (an administrator's command).

A protected study, or one whose classification is not finished (queued, running, still receiving),
is refused unless ``--force``. The node may keep running; an instance of the study that arrives later
starts the study again.
"""

from __future__ import annotations

import argparse
import sys

from dicomnode.config import Config

HELP = "delete a study (files and index rows)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID of the study to delete")
    p.add_argument("--force", action="store_true", help="also a protected or not yet classified study")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.db.session import checked_index
    from dicomnode.receive.retention import StudyNotDeletable, delete_study
    from dicomnode.receive.storage import InvalidUID

    try:
        with checked_index(cfg) as (_, sessions):
            usage = delete_study(sessions, cfg.resolved_storage_dir, args.study,
                                 "dicomnode delete" + (" --force" if args.force else ""), force=args.force)
    except (StudyNotDeletable, InvalidUID) as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return 1
    print(f"deleted study {usage.study_uid}: {usage.instances} instance(s), {usage.size_bytes} bytes")
    return 0
