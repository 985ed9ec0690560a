"""``dicomnode db COMMAND``: the index database (schema upgrade, current revision).

Each database command is a ``run_<name>(args, cfg) -> int`` function listed in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
from typing import Callable

from dicomnode.config import Config

HELP = "index database commands (schema upgrade, current revision)"
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


#: name -> (help, add_arguments or None, run)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None,
                             Callable[[argparse.Namespace, Config], int]]] = {
    "upgrade": ("upgrade the index schema (Alembic); backs up a SQLite file first", add_upgrade_arguments, run_upgrade),
    "current": ("print the schema revision; exit 1 if not at head", None, run_current),
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
