"""The index database: models, engines and sessions, and schema versioning."""

from dicomnode.db.models import Base, Instance, Job, Patient, RegionRange, Series, SliceResult, Study
from dicomnode.db.session import (
    SchemaError,
    check_schema,
    make_engine,
    make_sessionmaker,
    session_scope,
    upgrade,
)

__all__ = [
    "Base", "Instance", "Job", "Patient", "RegionRange", "Series", "SliceResult", "Study",
    "SchemaError", "check_schema", "make_engine", "make_sessionmaker", "session_scope", "upgrade",
]
