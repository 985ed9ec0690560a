"""The ``dicomnode`` command: one pattern for every subcommand.

Each subcommand is a module listed in :data:`COMMANDS` (the one place to find it) that defines

- ``HELP``: the one-line help shown by ``dicomnode --help``;
- ``add_arguments(parser)``: its own arguments (the common ``--config``, ``--data-dir`` and
  ``--log-level`` are added here, the same way for every command);
- optionally ``config_overrides(args) -> dict``: dotted config keys its flags override (``None`` = keep);
- ``run(args, cfg) -> int``: the command, given the loaded :class:`~dicomnode.config.Config` with the
  overrides applied and logging set up; its exit status.

A command with subcommands of its own (``db``) sets ``NESTED = True`` and calls :func:`add_common_arguments`
on each of them. Heavy imports (torch, the trainer) happen inside ``run`` only, so ``dicomnode --help`` is
fast. A command that needs an optional extra calls :func:`require_extra` first; a missing module of an extra
that is only found later is still reported in one line (exit 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType
from typing import Any

from dicomnode import __version__
from dicomnode.config import Config, ConfigError, load_config
from dicomnode.logconfig import setup_logging

log = logging.getLogger("dicomnode.cli")

#: Subcommand name -> the module that implements it.
COMMANDS: dict[str, str] = {
    "serve": "dicomnode.cli.serve",
    "worker": "dicomnode.cli.worker",
    "status": "dicomnode.cli.status",
    "db": "dicomnode.cli.db",
    "delete": "dicomnode.cli.delete",
    "protect": "dicomnode.cli.protect",
    "classify": "dicomnode.cli.classify",
    "mine": "trainer.cli.mine",
    "train": "trainer.cli.train",
    "evaluate": "trainer.cli.evaluate",
    "promote": "trainer.cli.promote",
    "retrain": "trainer.cli.retrain",
}

#: Importable module -> the pip extra of this package that installs it.
EXTRAS: dict[str, str] = {
    "sklearn": "trainer",
    "nibabel": "trainer",
    "PIL": "trainer",
    "psycopg2": "postgres",
}

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class MissingExtra(RuntimeError):
    """A command needs a module of an optional extra that is not installed."""

    def __init__(self, module: str, command: str = "") -> None:
        extra = EXTRAS.get(module.split(".")[0], "")
        what = f"dicomnode {command}" if command else "this command"
        hint = f"pip install 'dicomnode[{extra}]'" if extra else f"pip install {module}"
        super().__init__(f"{what} needs the Python module '{module}', which is not installed: {hint}")


def require_extra(command: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` (naming the extra to install) unless every module can be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == module.split(".")[0]:
                raise MissingExtra(module, command) from None
            raise


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--data-dir`` and ``--log-level``: the same on every subcommand."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: embedded defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (index and storage); overrides data_dir")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="log level on stderr; overrides log_level (default INFO)")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Config:
    """Load the config named by ``--config`` and apply ``--data-dir``, ``--log-level`` and ``overrides``."""
    base: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None), "log_level": getattr(args, "log_level", None)}
    base.update(overrides)
    return load_config(getattr(args, "config", None), base)


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM node that classifies CT slices by region")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or "").strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if not getattr(module, "NESTED", False):
            add_common_arguments(p)
        module.add_arguments(p)
        p.set_defaults(command_module=module)
    return parser


def run_command(module: ModuleType, args: argparse.Namespace) -> int:
    """Load the config with the command's overrides, set up logging, run the command."""
    overrides_of = getattr(module, "config_overrides", None)
    overrides = overrides_of(args) if overrides_of else {}
    cfg = config_from_args(args, **overrides)
    setup_logging(cfg.log_level)
    return int(module.run(args, cfg))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module: ModuleType | None = getattr(args, "command_module", None)
    if module is None or (getattr(module, "NESTED", False) and not hasattr(args, "config")):
        parser.parse_args([args.command, "--help"] if module is not None else ["--help"])
        return 2
    try:
        return run_command(module, args)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except MissingExtra as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in EXTRAS:
            print(f"dicomnode: {MissingExtra(exc.name, args.command)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from dicomnode.db.session import SchemaError

        if isinstance(exc, SchemaError):
            print(f"dicomnode: {exc}", file=sys.stderr)
            return 3
        raise
