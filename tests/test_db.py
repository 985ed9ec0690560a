"""Index schema: migrations from empty on SQLite and PostgreSQL, refusal of a schema not at head, backups."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from dicomnode.db.models import Base
from dicomnode.db.session import (
    SchemaError,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)


def test_migrations_run_from_empty_and_match_the_models(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        check_schema(engine)
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        # Every model column exists in the migrated schema.
        insp = inspect(engine)
        for name, table in Base.metadata.tables.items():
            columns = {c["name"] for c in insp.get_columns(name)}
            assert {c.name for c in table.columns} <= columns, name
        # And autogenerate finds nothing left to migrate.
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(db_url):
    upgrade(db_url)
    from alembic import command

    from dicomnode.db.session import alembic_config

    command.downgrade(alembic_config(db_url), "base")
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        with pytest.raises(SchemaError, match="dicomnode db upgrade"):
            check_schema(engine)
    finally:
        engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()


def test_sqlite_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
    engine = make_engine(url, sqlite_synchronous="NORMAL")  # the listeners' setting by default
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    engine.dispose()
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        make_engine(url, sqlite_synchronous="OFF")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_upgrade_backs_up_and_serve_refuses_an_old_schema(tmp_path):
    data = tmp_path / "data"
    result = run_cli("db", "upgrade", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert run_cli("db", "current", "--data-dir", str(data)).returncode == 0
    # Take the schema back to empty: the node must refuse to start and name the fix.
    from alembic import command

    from dicomnode.db.session import alembic_config

    url = f"sqlite:///{data / 'index.sqlite'}"
    command.downgrade(alembic_config(url), "base")
    result = run_cli("serve", "--data-dir", str(data), "--port", "1")
    assert result.returncode == 3
    assert "dicomnode db upgrade" in result.stderr
    result = run_cli("status", "--data-dir", str(data))
    assert result.returncode == 3
    # Upgrading now backs the file up first.
    result = run_cli("db", "upgrade", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "backed up" in result.stdout
    assert list(data.glob("index.sqlite.*.bak"))
    assert run_cli("db", "current", "--data-dir", str(data)).returncode == 0


def test_cli_check_and_rebuild_from_storage(tmp_path):
    """``db check`` reports index vs storage (exit 1 when they differ); ``db rebuild`` re-indexes a whole
    storage folder into an empty index."""
    import shutil

    from conftest import CT_FIXTURES
    from dicomnode.config import load_config
    from dicomnode.db.session import open_index
    from dicomnode.receive.ingest import NodeContext, store_instance

    data = tmp_path / "data"
    cfg = load_config(None, {"data_dir": str(data), "listener.min_free_space_mb": 1})
    engine, sessions = open_index(cfg)
    ctx = NodeContext(cfg, sessions)
    for path in sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm")):
        assert store_instance(ctx, path.read_bytes()) == 0
    engine.dispose()
    result = run_cli("db", "check", "--data-dir", str(data))
    assert result.returncode == 0 and "consistent" in result.stdout, result.stdout + result.stderr
    # The index is lost; a new one, empty, beside the same storage.
    (data / "index.sqlite").unlink()
    for extra in data.glob("index.sqlite-*"):
        extra.unlink()
    result = run_cli("db", "upgrade", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    result = run_cli("db", "check", "--data-dir", str(data))
    assert result.returncode == 1 and "3 files not in the index" in result.stdout
    result = run_cli("db", "rebuild", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "re-indexed 3 instance(s)" in result.stdout and "re-indexing" in result.stderr  # the progress bar
    assert run_cli("db", "check", "--data-dir", str(data)).returncode == 0
    # Rebuilding into an index that is not empty is refused.
    result = run_cli("db", "rebuild", "--data-dir", str(data))
    assert result.returncode == 2 and "empty index" in result.stdout
    shutil.rmtree(data / "storage")
    result = run_cli("db", "check", "--data-dir", str(data))
    assert result.returncode == 1 and "3 index rows whose file is missing" in result.stdout
