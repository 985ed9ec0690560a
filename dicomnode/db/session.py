"""Engines, sessions and schema versioning (Alembic) of the index.

One engine per process. SQLite gets WAL, foreign keys and a busy timeout; any other SQLAlchemy URL
(``postgresql+psycopg2://...``) is used as given.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from dicomnode.config import Config

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaError(RuntimeError):
    """The database schema is not at the head revision this code expects."""


def _unicode_lower(value):
    """SQLite function ``unicode_lower``: Python's str.lower (Unicode), as PostgreSQL's lower() does."""
    return value.lower() if isinstance(value, str) else value


def _sqlite_pragmas(synchronous: str):
    def apply(dbapi_conn, _record) -> None:  # pragma: no cover - called by SQLAlchemy
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()
        # Unicode lower case for Q/R matching (SQLite's own lower() is ASCII-only): dicomnode.qr.matching
        dbapi_conn.create_function("unicode_lower", 1, _unicode_lower, deterministic=True)

    return apply


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    """Create the engine for ``url``; for SQLite the parent folder is created and pragmas applied.

    SQLite runs in WAL mode. ``sqlite_synchronous`` FULL (default) fsyncs the WAL at every commit, so a
    commit survives a power loss; NORMAL fsyncs it only at checkpoints: a commit still survives a crash
    of the process, but a power loss can take the last ones (Orthanc's default).
    """
    if sqlite_synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, got {sqlite_synchronous!r}")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=8,
            max_overflow=16,
        )
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# Alembic ------------------------------------------------------------------------------------------

def migrations_dir() -> Path:
    """The Alembic scripts folder: ``migrations/`` in a checkout, ``dicomnode/migrations`` when installed."""
    import dicomnode.migrations as pkg  # mapped onto the top-level migrations/ folder

    return Path(pkg.__file__).resolve().parent


def alembic_config(url: str):
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaError` unless the database is at the head revision."""
    head = head_revision()
    current = current_revision(engine)
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        state = "empty (no schema)" if current is None else f"at revision {current}"
        raise SchemaError(
            f"database {where} is {state}, this dicomnode needs revision {head}; "
            "run: dicomnode db upgrade --config <your config> (or --data-dir DIR)"
        )


def backup_sqlite(url: str) -> Path | None:
    """Copy a SQLite database file beside itself (online backup API); returns the copy's path."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    src = Path(parsed.database)
    if not src.exists() or src.stat().st_size == 0:
        return None
    dst = src.with_name(f"{src.name}.{datetime.now().strftime('%Y%m%d-%H%M%S')}.bak")
    with sqlite3.connect(str(src)) as s, sqlite3.connect(str(dst)) as d:
        s.backup(d)
    return dst


def upgrade(url: str, revision: str = "head", backup: bool = True) -> Path | None:
    """Run Alembic up to ``revision``; backs up a SQLite file first. Returns the backup path, if any."""
    from alembic import command

    engine = make_engine(url)
    try:
        at_head = current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    copy = backup_sqlite(url) if (backup and not at_head) else None
    if copy:
        log.info("backed up %s to %s before upgrading", make_url(url).database, copy)
    command.upgrade(alembic_config(url), revision)
    return copy


def ensure_embedded_schema(url: str) -> bool:
    """Create the schema of a brand-new embedded SQLite file so the node runs with no setup.

    Only an SQLite file that does not exist yet is initialised; an existing database at another
    revision is left to ``dicomnode db upgrade``. Returns True when the schema was created.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return False
    if Path(parsed.database).exists():
        return False
    upgrade(url, backup=False)
    return True


def open_index(cfg: "Config") -> tuple[Engine, sessionmaker[Session]]:
    """Create the embedded schema on first run, refuse a schema not at head, return a session factory."""
    url = cfg.resolved_database_url
    if ensure_embedded_schema(url):
        log.info("created a new index at %s", url)
    engine = make_engine(url)
    check_schema(engine)
    return engine, make_sessionmaker(engine)


@contextmanager
def checked_index(cfg: "Config") -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    """The index of ``cfg`` for a command: refuse a schema not at head (:class:`SchemaError`), never
    create one; the engine is disposed of on exit."""
    engine = make_engine(cfg.resolved_database_url)
    try:
        check_schema(engine)
        yield engine, make_sessionmaker(engine)
    finally:
        engine.dispose()
