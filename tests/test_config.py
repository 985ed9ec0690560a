"""Configuration: typed loading, key paths in errors, the documented example."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from dicomnode.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_embedded_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg.ae_title == "DICOMNODE"
    assert cfg.port == 11112
    assert cfg.resolved_database_url.startswith("sqlite:///")
    assert cfg.resolved_database_url.endswith("index.sqlite")
    assert cfg.resolved_storage_dir == cfg.resolved_data_dir / "storage"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: 4100\nlistener:\n  max_associations: 3\nsecurity:\n  allowed_peers:\n"
                    "    - {ae_title: PACS, host: 127.0.0.1}\n")
    cfg = load_config(path, {"port": 4200, "data_dir": str(tmp_path)})
    assert cfg.port == 4200  # command line wins over the file
    assert cfg.listener.max_associations == 3
    assert cfg.security.allowed_peers[0].ae_title == "PACS"
    assert cfg.resolved_data_dir == tmp_path.resolve()


@pytest.mark.parametrize("text, key", [
    ("prot: 11112\n", "prot"),
    ("listener:\n  max_assocations: 4\n", "listener.max_assocations"),
    ("listener:\n  max_associations: many\n", "listener.max_associations"),
    ("security:\n  allowed_peers:\n    - {ae_title: A, hots: x}\n", "security.allowed_peers[0].hots"),
    ("listener:\n  duplicate_policy: overwrite\n", "listener.duplicate_policy"),
    ("worker:\n  enabled: yes please\n", "worker.enabled"),
    ("ae_title: 'MUCH TOO LONG AE TITLE'\n", "ae_title"),
    ("port: 70000\n", "port"),
    ("worker:\n  batch_size: 0\n", "worker.batch_size"),
])
def test_bad_keys_are_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _key_paths(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        yield path, f.name
        if dataclasses.is_dataclass(tp):
            yield from _key_paths(tp, path + ".")


def test_example_config_loads_and_documents_every_key():
    example = REPO / "config.example.yaml"
    cfg = load_config(example)
    assert isinstance(cfg, Config)
    text = example.read_text()
    missing = [path for path, name in _key_paths(Config) if f"{name}:" not in text]
    assert not missing, f"config.example.yaml does not document: {missing}"


def test_cli_reports_config_errors(tmp_path):
    from dicomnode.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("listener:\n  port: 1\n")
    assert main(["status", "--config", str(path)]) == 2


def test_the_embedded_configuration_does_not_load_pydicoms_code_dictionary():
    """Validating routing rules needs pydicom's SR code dictionary (~0.4 s to import); a configuration
    without rules must not pay for it: every command, `dicomnode classify` included, loads the config
    before anything else."""
    import subprocess
    import sys

    code = ("import sys; from dicomnode.config import load_config; load_config(None); "
            "print('pydicom.sr.codedict' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
