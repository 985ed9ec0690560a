"""A Query/Retrieve identifier -> the SQL that selects the matching index rows (shared by C-FIND and retrieve)."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Select, exists, select
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.db.models import Instance, Patient, Series, SliceResult, Study
from dicomnode.qr import private
from dicomnode.qr.keys import INFORMATIONAL, LEVELS, RANK, key_for
from dicomnode.qr.matching import QueryError, match_clause, multi_value_clause

#: Information models (the "root") and the levels each allows.
ROOT_LEVELS = {"PATIENT": LEVELS, "STUDY": LEVELS[1:]}

#: Attributes whose values may be logged (UIDs only; never patient identifiers).
LOGGABLE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class IdentifierError(QueryError):
    """The identifier does not fit the information model (missing or wrong QueryRetrieveLevel): 0xA900."""


def query_level(identifier: Dataset, root: str) -> str:
    """The QueryRetrieveLevel of ``identifier``, checked against the information model ``root``."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise IdentifierError("QueryRetrieveLevel", "missing from the identifier")
    if level not in ROOT_LEVELS[root]:
        raise IdentifierError("QueryRetrieveLevel",
                              f"{level!r} is not a level of the {root.title()} Root model "
                              f"({', '.join(ROOT_LEVELS[root])})")
    return level


def dialect_of(session: Session) -> str:
    return session.get_bind().dialect.name


def describe(identifier: Dataset, level: str) -> str:
    """A log-safe summary of a query: its level and the UIDs it names, nothing else."""
    parts = [level]
    for kw in LOGGABLE:
        value = identifier.get(kw)
        if value:
            text = "\\".join(str(v) for v in value) if not isinstance(value, str) else value
            parts.append(f"{kw}={text[:200]}")
    return " ".join(parts)


def _modalities_clause(value: Any, dialect: str) -> ColumnElement | None:
    other = aliased(Series)
    clause = match_clause(other.modality, value, "CS", "ModalitiesInStudy", dialect)
    if clause is None:
        return None
    return exists(select(other.id).where(other.study_fk == Study.id, clause))


def filters(identifier: Dataset, level: str, dialect: str) -> list[ColumnElement]:
    """The WHERE clauses of ``identifier`` seen from ``level`` (keys below ``level`` are ignored)."""
    clauses: list[ColumnElement] = []
    for elem in identifier:
        if elem.tag.group == private.GROUP or elem.VR == "SQ" or elem.keyword in INFORMATIONAL:
            continue
        key = key_for(elem.keyword, level)
        if key is None or not key.matchable:
            continue
        if key.keyword == "ModalitiesInStudy":
            clause = _modalities_clause(elem.value, dialect)
        elif key.multi:
            clause = multi_value_clause(key.expr, elem.value, key.vr, key.keyword, dialect)
        else:
            clause = match_clause(key.expr, elem.value, key.vr, key.keyword, dialect)
        if clause is not None:
            clauses.append(clause)
    block = private.requested_block(identifier)
    if block is not None and RANK[level] >= RANK["SERIES"]:
        columns = {private.STATE: Series.classification_state, private.MODEL_VERSION: Series.model_version}
        for offset, value in private.private_query_values(identifier, block).items():
            name, vr = private.MATCHABLE[offset]
            clause = match_clause(columns[offset], value, vr, name, dialect)
            if clause is not None:
                clauses.append(clause)
    return clauses


def joined(stmt: Select, level: str) -> Select:
    """Add the joins from ``level`` up to the patient (and the slice results at IMAGE level)."""
    if level == "PATIENT":
        return stmt.select_from(Patient)
    if level == "STUDY":
        return stmt.select_from(Study).join(Patient, Study.patient_fk == Patient.id)
    if level == "SERIES":
        return (stmt.select_from(Series).join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id))
    return (stmt.select_from(Instance).join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id).join(Patient, Study.patient_fk == Patient.id)
            .outerjoin(SliceResult, SliceResult.instance_fk == Instance.id))


def retrieve_statement(identifier: Dataset, level: str, dialect: str) -> Select:
    """The instances selected by a C-MOVE / C-GET identifier at ``level`` (keys up to ``level`` filter them)."""
    clauses = filters(identifier, level, dialect)
    if not clauses:
        raise QueryError("identifier", f"a retrieve at {level} level needs a key with a value "
                                       f"(e.g. {'StudyInstanceUID' if level != 'PATIENT' else 'PatientID'})")
    stmt = select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
                  Instance.path)
    return joined(stmt, "IMAGE").where(*clauses).order_by(Instance.series_fk, Instance.instance_number, Instance.id)
