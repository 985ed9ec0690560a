"""``dicomnode db COMMAND``: the index database (schema upgrade, current revision; check it against
storage, the source of truth, and rebuild it from storage).

Each database command is a ``run_<name>(args, cfg) -> int`` function listed in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
from typing import Callable

from dicomnode.config import Config

HELP = "index database commands (schema upgrade, current revision, check and rebuild against storage)"
NESTED = True


def run_upgrade(args: argparse.Namespace, cfg: Config) -> int:
    """Upgrade the schema (Alembic); a SQLite file is backed up first."""
    from dicomnode.db.session import head_revision, upgrade

    backup = upgrade(cfg.resolved_database_url, args.revision)
    if backup:
        print(f"backed up the SQLite index to {backup}")
    print(f"index at revision {head_revision() if args.revision == 'head' else args.revision}")
    return 0


def add_upgrade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default="head", help="target revision (default head)")


def run_current(args: argparse.Namespace, cfg: Config) -> int:
    """Print the schema revision; exit 1 when it is not the head."""
    from dicomnode.db.session import current_revision, head_revision, make_engine

    engine = make_engine(cfg.resolved_database_url)
    current = current_revision(engine)
    print(f"current: {current or '(empty)'}  head: {head_revision()}")
    return 0 if current == head_revision() else 1


def run_check(args: argparse.Namespace, cfg: Config) -> int:
    """Compare the index with storage (read-only); exit 1 when they differ."""
    from dicomnode.receive.recovery import check_storage

    from dicomnode.db.session import checked_index

    with checked_index(cfg) as (_, sessions):
        report = check_storage(cfg.resolved_storage_dir, sessions)
    print(f"index      {report.instances_indexed} instance(s)")
    print(f"storage    {report.files_found} instance file(s) in {cfg.resolved_storage_dir}")
    for title, paths in (("files not in the index (dicomnode db rebuild, or a restart re-indexes recent ones)",
                          report.unindexed_files),
                         ("index rows whose file is missing", report.missing_files),
                         ("temporary files (interrupted C-STOREs; the next start handles them)", report.partial_files),
                         ("interrupted study deletions (finished at the next start)", report.pending_deletions)):
        if paths:
            print(f"{len(paths)} {title}:")
            for path in paths[: args.limit or None]:
                print(f"  {path}")
            if args.limit and len(paths) > args.limit:
                print(f"  ... and {len(paths) - args.limit} more")
    print("consistent" if report.consistent else "index and storage differ")
    return 0 if report.consistent else 1


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=50, help="paths listed per kind (0 = all; default 50)")


def run_rebuild(args: argparse.Namespace, cfg: Config) -> int:
    """Re-index every instance file of storage into an empty index (schema at head)."""
    import os

    from sqlalchemy import func, select
    from tqdm import tqdm

    from dicomnode.db.models import Instance
    from dicomnode.db.session import checked_index, ensure_embedded_schema
    from dicomnode.receive.recovery import recover_storage, series_folders

    ensure_embedded_schema(cfg.resolved_database_url)
    with checked_index(cfg) as (_, sessions):
        with sessions() as session:
            present = session.scalar(select(func.count()).select_from(Instance))
        if present:
            print(f"dicomnode: the index already holds {present} instance(s); rebuild needs an empty index "
                  "(a new database_url or data folder); 'dicomnode db check' compares the two")
            return 2
        storage_dir = cfg.resolved_storage_dir
        total = sum(sum(1 for _ in os.scandir(f.path)) for f in series_folders(storage_dir))
        with tqdm(total=total, unit="file", desc="re-indexing", disable=args.no_progress) as bar:
            report = recover_storage(storage_dir, sessions, None, cfg.listener.duplicate_policy, progress=bar.update)
    print(f"re-indexed {report.files_reindexed + report.partial_files_reindexed} instance(s) from "
          f"{report.folders_scanned} series folder(s); {len(report.files_not_indexable)} file(s) left alone "
          f"(not instances of their folder), {report.partial_files_removed} torn temporary file(s) removed")
    return 0


def add_rebuild_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


#: name -> (help, add_arguments or None, run)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None,
                             Callable[[argparse.Namespace, Config], int]]] = {
    "upgrade": ("upgrade the index schema (Alembic); backs up a SQLite file first", add_upgrade_arguments, run_upgrade),
    "current": ("print the schema revision; exit 1 if not at head", None, run_current),
    "check": ("compare the index with storage (read-only); exit 1 when they differ", add_check_arguments, run_check),
    "rebuild": ("re-index a whole storage folder into an empty index", add_rebuild_arguments, run_rebuild),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dicomnode.cli import add_common_arguments

    sub = p.add_subparsers(dest="db_command", metavar="DBCOMMAND", required=True)
    for name, (help_text, add, _) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        add_common_arguments(sp)
        if add is not None:
            add(sp)


def run(args: argparse.Namespace, cfg: Config) -> int:
    return SUBCOMMANDS[args.db_command][2](args, cfg)
