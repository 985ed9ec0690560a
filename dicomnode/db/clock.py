"""The database's clock as a SQL expression, so leases and stability agree across machines.

Several nodes or workers sharing one PostgreSQL may have skewed clocks; comparing a lease or a quiet
time with each machine's own ``utcnow()`` would let a fast clock steal live leases. Every lease and
completeness decision therefore compares and writes :func:`db_utcnow`, evaluated by the database in
the statement itself. Values are naive UTC, like the columns (``DateTime`` without time zone).

PostgreSQL: ``timezone('utc', statement_timestamp())`` (independent of the server's TimeZone).
SQLite is a file on the local machine, so its clock is this machine's: ``strftime(...)`` with
microsecond digits in the text format SQLAlchemy stores, so stored and computed values compare as text.
"""

from __future__ import annotations

from sqlalchemy import DateTime
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class db_utcnow(FunctionElement):
    """``db_utcnow(offset_s)``: the database's current UTC time plus ``offset_s`` seconds."""

    type = DateTime()
    inherit_cache = False
    name = "db_utcnow"

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = float(offset_s)
        super().__init__()


def _offset(element: db_utcnow) -> str:
    return repr(round(element.offset_s, 6))


@compiles(db_utcnow)
def _default(element: db_utcnow, compiler, **kw) -> str:  # SQLite and anything else with strftime
    return (f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '{element.offset_s:+.6f} seconds') || '000')"
            if element.offset_s else "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')")


@compiles(db_utcnow, "postgresql")
def _postgresql(element: db_utcnow, compiler, **kw) -> str:
    base = "timezone('utc', statement_timestamp())"
    return f"({base} + make_interval(secs => {_offset(element)}))" if element.offset_s else base
