"""The ``dicomnode`` command (dicomnode.cli): one pattern, the same common flags, clear missing-extra errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dicomnode import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    leaves = {}
    for name, p in _subparsers(cli.build_parser()).items():
        nested = _subparsers(p)
        if nested:
            leaves.update({f"{name} {sub}": sp for sub, sp in nested.items()})
        else:
            leaves[name] = p
    return leaves


def test_every_command_is_listed_once_and_has_the_pattern():
    assert len(set(cli.COMMANDS.values())) == len(cli.COMMANDS)
    for name, module_name in cli.COMMANDS.items():
        module = __import__(module_name, fromlist=["run"])
        assert isinstance(module.HELP, str) and module.HELP, name
        assert callable(module.add_arguments) and callable(module.run), name


@pytest.mark.parametrize("command", sorted(_leaf_parsers()))
def test_every_subcommand_takes_the_common_flags(command):
    parser = _leaf_parsers()[command]
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--config", "--data-dir", "--log-level"} <= options, command
    levels = next(a for a in parser._actions if "--log-level" in a.option_strings)
    assert levels.default is None  # the default comes from the config (log_level), the same for every command


def test_log_level_and_data_dir_reach_the_config(tmp_path):
    args = cli.build_parser().parse_args(["status", "--data-dir", str(tmp_path), "--log-level", "DEBUG"])
    cfg = cli.config_from_args(args)
    assert cfg.log_level == "DEBUG" and cfg.data_dir == str(tmp_path)
    cfg = cli.config_from_args(cli.build_parser().parse_args(["status"]))
    assert cfg.log_level == "INFO"


def _run_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``dicomnode ARGV`` in a fresh interpreter in which ``module`` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from dicomnode.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_evaluate_without_the_trainer_extra_names_it(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,region,patient,source\n")
    result = _run_without("sklearn", "evaluate", "--labels", str(labels))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["dicomnode: dicomnode evaluate needs the Python module 'sklearn', which is not installed: "
                     "pip install 'dicomnode[trainer]'"], result.stderr


def test_train_without_nibabel_names_the_extra(tmp_path):
    result = _run_without("nibabel", "train", "--labels", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "pip install 'dicomnode[trainer]'" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_extra_found_late_is_one_line_too(tmp_path):
    """A module of an extra imported deep inside a command (SQLAlchemy's PostgreSQL driver) is still reported
    in one line naming the extra, not as a traceback."""
    config = tmp_path / "node.yaml"
    config.write_text("database_url: postgresql+psycopg2://nobody@127.0.0.1:1/none\n")
    result = _run_without("psycopg2", "status", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "'psycopg2'" in result.stderr and "pip install 'dicomnode[postgres]'" in result.stderr
