"""Index writes (dicomnode.db.index) on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text

from conftest import CT_FIXTURES
from dicomnode.db.index import StoredFile, index_instance_cached
from dicomnode.db.models import Series
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.receive.headers import read_header


def test_quiet_time_is_on_the_database_clock_on_postgresql(db_url, monkeypatch):
    """A listener whose clock is an hour fast stamps last_received_at with the database's time on a server
    database (so StableAge and the early completeness checks, which compare with the database's clock,
    see the series quiet only when it is); an SQLite file, local to the machine, keeps this machine's."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the database clock differs from the listener's only on a server database")
    upgrade(db_url, backup=False)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    ahead = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(hours=1)
    monkeypatch.setattr("dicomnode.db.models.utcnow", lambda: ahead)
    monkeypatch.setattr("dicomnode.db.index.utcnow", lambda: ahead)
    series_ids: dict[str, int] = {}
    files = sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm"))
    for i, path in enumerate(files):  # the first goes through the full path, the others the cached one
        header = read_header(path.read_bytes())
        assert index_instance_cached(sessions, header, StoredFile(f"x/{i}.dcm", 1, "PEER"), series_ids) == "new"
        with sessions() as session:
            db_now = session.execute(text("SELECT timezone('utc', statement_timestamp())")).scalar_one()
            last = session.execute(select(Series.last_received_at)).scalar_one()
        assert abs((db_now - last).total_seconds()) < 600, (db_now, last)  # not an hour ahead
    engine.dispose()
