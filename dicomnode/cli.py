"""The ``dicomnode`` command.

Subcommands of the node live here (serve, worker, db, status); the others register themselves from
their own modules (see ``_EXTERNAL``) and import their heavy dependencies only when run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Callable

from dicomnode import __version__
from dicomnode.config import Config, ConfigError, load_config
from dicomnode.logconfig import setup_logging

log = logging.getLogger("dicomnode.cli")

#: Modules that add subcommands: each has ``register(subparsers)`` and sets ``func`` on its parsers.
_EXTERNAL = [
    "dicomnode.commands.classify",
    "dicomnode.commands.worker",
    "trainer.commands",
    "trainer.mine_cli",
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --data-dir, shared by every command that opens the node's index."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: embedded defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (index and storage); overrides data_dir")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides log_level")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Config:
    """Load the config named by ``--config`` and apply ``--data-dir``/``--log-level`` and ``overrides``."""
    base = {"data_dir": getattr(args, "data_dir", None), "log_level": getattr(args, "log_level", None)}
    base.update(overrides)
    return load_config(getattr(args, "config", None), base)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, port=args.port, ae_title=args.ae_title, stable_age_s=args.stable_age,
                           **{"listener.processes": args.processes,
                              "worker.enabled": False if args.no_worker else None})
    setup_logging(cfg.log_level)
    from dicomnode.node import serve

    return serve(cfg)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    setup_logging(cfg.log_level)
    from dicomnode.db.session import head_revision, upgrade

    backup = upgrade(cfg.resolved_database_url, args.revision)
    if backup:
        print(f"backed up the SQLite index to {backup}")
    print(f"index at revision {head_revision() if args.revision == 'head' else args.revision}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from dicomnode.db.session import current_revision, head_revision, make_engine

    engine = make_engine(cfg.resolved_database_url)
    current = current_revision(engine)
    print(f"current: {current or '(empty)'}  head: {head_revision()}")
    return 0 if current == head_revision() else 1


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from dicomnode.db.index import counts
    from dicomnode.db.session import check_schema, make_engine, make_sessionmaker

    engine = make_engine(cfg.resolved_database_url)
    check_schema(engine)
    with make_sessionmaker(engine)() as session:
        result = counts(session)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"index       {engine.url.render_as_string(hide_password=True)}")
    for key in ("patients", "studies", "series", "instances"):
        print(f"{key:<12}{result[key]}")
    print("jobs        " + ", ".join(f"{k} {v}" for k, v in result["jobs"].items()))
    print(f"last received {result['last_received_at'] or 'never'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM node that classifies CT slices by region")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node: DICOM listener, stability scheduler, worker")
    add_config_arguments(p)
    p.add_argument("--port", type=int, help="TCP port (default 11112)")
    p.add_argument("--ae-title", help="the node's AE title (default DICOMNODE)")
    p.add_argument("--stable-age", type=float, metavar="SECONDS", help="seconds without new instances before a series is stable")
    p.add_argument("--processes", type=int, help="listener processes sharing the port (default: two per core, at most 4)")
    p.add_argument("--no-worker", action="store_true", help="do not run the classification worker in the node")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("db", help="database schema commands")
    dbsub = p.add_subparsers(dest="db_command", metavar="DBCOMMAND", required=True)
    u = dbsub.add_parser("upgrade", help="upgrade the index schema (Alembic); backs up a SQLite file first")
    add_config_arguments(u)
    u.add_argument("--revision", default="head", help="target revision (default head)")
    u.set_defaults(func=cmd_db_upgrade)
    c = dbsub.add_parser("current", help="print the schema revision; exit 1 if not at head")
    add_config_arguments(c)
    c.set_defaults(func=cmd_db_current)

    p = sub.add_parser("status", help="counts of studies, series, instances and jobs")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    for name in _EXTERNAL:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from dicomnode.db.session import SchemaError

        if isinstance(exc, SchemaError):
            print(f"dicomnode: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
