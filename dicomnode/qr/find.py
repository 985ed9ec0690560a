"""C-FIND: an identifier -> one response dataset per matching entity at the requested level.

:func:`find` is a plain generator of ``(status, dataset)`` pairs, the shape pynetdicom's EVT_C_FIND
handler yields; tests call it without a network. Computed keys (NumberOf*Related*, ModalitiesInStudy)
are aggregated in SQL per batch of results, never per row in Python.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import lru_cache
from typing import Any, Callable, Iterator

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Patient, RegionRange, Series, SliceResult, Study
from dicomnode.qr import private
from dicomnode.qr.keys import INFORMATIONAL, LEVELS, RANK, UNIQUE_KEYS, key_for, keys_at
from dicomnode.qr.matching import QueryError
from dicomnode.qr.query import IdentifierError, describe, dialect_of, filters, joined, query_level

log = logging.getLogger("dicomnode.qr.find")

from dicomnode.dicom_status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PENDING,
    UNABLE_TO_PROCESS,
)

BATCH = 500

#: Called before each pending response is yielded, with the number of responses already sent and the
#: request's cancel check: a point where diagnostics (and tests) can observe or hold the generator.
RESPONSE_HOOKS: list[Callable[[int, Callable[[], bool]], None]] = []

#: The row columns each level selects (labels used when building responses).
_ID_COLUMN = {"PATIENT": Patient.id, "STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}
_CHARSET_COLUMN = {"PATIENT": Patient.specific_character_set, "STUDY": Study.specific_character_set,
                   "SERIES": Series.specific_character_set, "IMAGE": Series.specific_character_set}


def _columns(level: str, with_private: bool) -> list[Any]:
    cols = [_ID_COLUMN[level].label("_id"), _CHARSET_COLUMN[level].label("_charset")]
    cols += [k.expr.label(k.keyword) for k in keys_at(level) if k.expr is not None]
    if RANK[level] >= RANK["STUDY"]:
        cols.append(Patient.specific_character_set.label("_patient_charset"))
    if RANK[level] >= RANK["SERIES"] and with_private:
        cols += [Series.classification_state, Series.classification_reason, Series.model_version,
                 Series.body_part_examined.label("body_part_examined")]
    if level == "IMAGE" and with_private:
        cols += [SliceResult.p_neck, SliceResult.p_lungs, SliceResult.p_liver, SliceResult.p_pelvis,
                 SliceResult.p_legs, SliceResult.p_head, SliceResult.p_abdomen, SliceResult.predicted,
                 SliceResult.position,
                 SliceResult.model_version.label("sr_model_version")]
    return cols


# Computed keys, one SQL aggregate per batch ----------------------------------------------------------

def _grouped(session: Session, stmt) -> dict[int, int]:
    return {k: v for k, v in session.execute(stmt).all()}


def _sop_classes(session: Session, ids: list[int], by_series: bool = False) -> dict[int, list[str]]:
    """SOPClassesInStudy: the distinct SOP classes of each study's instances, keyed by study id (or, with
    ``by_series``, by the id of each series in ``ids``, listing the classes of the series' whole study)."""
    other = Series.__table__.alias("study_series")
    if by_series:
        key = Series.id
        stmt = (select(key, Instance.sop_class_uid).join(other, other.c.study_fk == Series.study_fk)
                .join(Instance, Instance.series_fk == other.c.id).where(Series.id.in_(ids)))
    else:
        key = Series.study_fk
        stmt = (select(key, Instance.sop_class_uid).join(Instance, Instance.series_fk == Series.id)
                .where(Series.study_fk.in_(ids)))
    classes: dict[int, list[str]] = defaultdict(list)
    for owner, uid in session.execute(stmt.distinct().order_by(key, Instance.sop_class_uid)).all():
        if uid:
            classes[owner].append(uid)
    return classes


def _aggregates(session: Session, level: str, ids: list[int], wanted: set[str], with_private: bool) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if level == "PATIENT":
        if "NumberOfPatientRelatedStudies" in wanted:
            out["NumberOfPatientRelatedStudies"] = _grouped(
                session, select(Study.patient_fk, func.count(Study.id)).where(Study.patient_fk.in_(ids))
                .group_by(Study.patient_fk))
        if "NumberOfPatientRelatedSeries" in wanted:
            out["NumberOfPatientRelatedSeries"] = _grouped(session, select(Study.patient_fk, func.count(Series.id))
                                                           .join(Series, Series.study_fk == Study.id)
                                                           .where(Study.patient_fk.in_(ids)).group_by(Study.patient_fk))
        if "NumberOfPatientRelatedInstances" in wanted:
            out["NumberOfPatientRelatedInstances"] = _grouped(
                session, select(Study.patient_fk, func.count(Instance.id)).join(Series, Series.study_fk == Study.id)
                .join(Instance, Instance.series_fk == Series.id).where(Study.patient_fk.in_(ids))
                .group_by(Study.patient_fk))
    elif level == "STUDY":
        if "NumberOfStudyRelatedSeries" in wanted:
            out["NumberOfStudyRelatedSeries"] = _grouped(session, select(Series.study_fk, func.count(Series.id))
                                                         .where(Series.study_fk.in_(ids)).group_by(Series.study_fk))
        if "NumberOfStudyRelatedInstances" in wanted:
            out["NumberOfStudyRelatedInstances"] = _grouped(
                session, select(Series.study_fk, func.count(Instance.id))
                .join(Instance, Instance.series_fk == Series.id)
                .where(Series.study_fk.in_(ids)).group_by(Series.study_fk))
        if "ModalitiesInStudy" in wanted:
            modalities: dict[int, list[str]] = defaultdict(list)
            for study_fk, modality in session.execute(
                    select(Series.study_fk, Series.modality).where(Series.study_fk.in_(ids)).distinct()
                    .order_by(Series.study_fk, Series.modality)).all():
                if modality:
                    modalities[study_fk].append(modality)
            out["ModalitiesInStudy"] = modalities
        if "SOPClassesInStudy" in wanted:
            out["SOPClassesInStudy"] = _sop_classes(session, ids)
    elif level == "SERIES":
        if "SOPClassesInStudy" in wanted:
            out["SOPClassesInStudy"] = _sop_classes(session, ids, by_series=True)
        if "NumberOfSeriesRelatedInstances" in wanted:
            out["NumberOfSeriesRelatedInstances"] = _grouped(
                session, select(Instance.series_fk, func.count(Instance.id)).where(Instance.series_fk.in_(ids))
                .group_by(Instance.series_fk))
        if with_private:
            ranges: dict[int, list[dict]] = defaultdict(list)
            for r in session.execute(select(RegionRange).where(RegionRange.series_fk.in_(ids))
                                     .order_by(RegionRange.series_fk, RegionRange.ordinal)).scalars():
                ranges[r.series_fk].append({c: getattr(r, c) for c in (
                    "body_part", "first_instance_number", "last_instance_number", "first_sop_instance_uid",
                    "last_sop_instance_uid", "z_start_mm", "z_end_mm", "n_slices", "mean_probability")})
            out["_ranges"] = ranges
    return out


# Building a response ---------------------------------------------------------------------------------

def _codec(charset: str) -> str | None:
    """Python codec of a single-term Specific Character Set; None when it cannot be checked simply."""
    terms = [t.strip() for t in charset.split("\\")]
    if not terms or terms == [""]:
        return "ascii"
    if len(terms) == 1:
        return python_encoding.get(terms[0])
    return None


def _response_charset(stored: str, texts: list[str]) -> str:
    """The stored Specific Character Set when it can encode every text value, else ISO_IR 192 (UTF-8)."""
    codec = _codec(stored)
    if codec is None:
        return stored
    try:
        for t in texts:
            t.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return "ISO_IR 192"
    return stored


@lru_cache(maxsize=None)
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    return tag, dictionary_VR(tag)


def _value(keyword: str, vr: str, value: Any) -> Any:
    if value is None:
        return "" if vr != "IS" else None
    if vr == "IS":
        return int(value)
    if keyword in ("BodyPartExamined", "ModalitiesInStudy") and isinstance(value, str) and "\\" in value:
        return value.split("\\")
    return value


def _requested(identifier: Dataset, level: str, root: str) -> list[str]:
    """Keywords the SCU asked for that this level can return, in identifier order, plus the unique keys."""
    wanted: list[str] = []
    for elem in identifier:
        kw = elem.keyword
        if not kw or kw in wanted:
            continue
        if kw in INFORMATIONAL or key_for(kw, level) is not None:
            wanted.append(kw)
    for lvl in LEVELS[: RANK[level] + 1]:
        kw = UNIQUE_KEYS[lvl]
        if root == "STUDY" and lvl == "PATIENT":
            continue
        if kw not in wanted:
            wanted.append(kw)
    return wanted


def build_response(row: dict[str, Any], level: str, wanted: list[str], aggregates: dict[str, dict],
                   block: int | None, ae_title: str) -> Dataset:
    """One C-FIND response dataset for ``row`` (a result row of the level's select)."""
    ds = Dataset()
    values: dict[str, Any] = {}
    for kw in wanted:
        if kw in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if kw == "RetrieveAETitle":
            values[kw] = ae_title
        elif kw == "InstanceAvailability":
            values[kw] = "ONLINE"
        elif kw in aggregates:
            v = aggregates[kw].get(row["_id"], 0 if kw.startswith("NumberOf") else [])
            values[kw] = v
        elif kw in row:
            key = key_for(kw, level)
            values[kw] = _value(kw, key.vr if key else "", row[kw])
    texts = [v for v in values.values() if isinstance(v, str)]
    texts += [x for v in values.values() if isinstance(v, list) for x in v if isinstance(x, str)]
    stored = row["_charset"] or row.get("_patient_charset") or ""
    charset = _response_charset(stored, texts)
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.QueryRetrieveLevel = level
    for kw, v in values.items():
        tag, vr = _tag_vr(kw)
        # Values come from the index (checked on ingest): pydicom's per-value validation is skipped.
        ds[tag] = DataElement(tag, vr, v, validation_mode=config.IGNORE)
    if block is not None and RANK[level] >= RANK["SERIES"]:
        if level == "SERIES":
            private.add_series_block(ds, block, row, aggregates.get("_ranges", {}).get(row["_id"], []))
        else:
            private.add_image_block(ds, block, row)
    return ds


# The generator ---------------------------------------------------------------------------------------

def find(sessions: sessionmaker[Session], identifier: Dataset, *, root: str = "STUDY", ae_title: str = "DICOMNODE",
         is_cancelled: Callable[[], bool] = lambda: False, max_results: int = 0,
         peer: str = "") -> Iterator[tuple[int, Dataset | None]]:
    """Yield ``(0xFF00, dataset)`` per match, then stop (Success); or ``(status, None)`` once on cancel/failure.

    ``root`` is ``"PATIENT"`` or ``"STUDY"`` (the information model of the request).
    """
    try:
        level = query_level(identifier, root)
    except IdentifierError as exc:
        log.warning("C-FIND from %s refused (0x%04X): %s", peer, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, exc)
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    block = private.requested_block(identifier)
    wanted = _requested(identifier, level, root)
    with sessions() as session:
        try:
            clauses = filters(identifier, level, dialect_of(session))
        except QueryError as exc:
            log.warning("C-FIND %s from %s refused (0x%04X): %s", describe(identifier, level), peer,
                        UNABLE_TO_PROCESS, exc)
            yield UNABLE_TO_PROCESS, None
            return
        stmt = joined(select(*_columns(level, block is not None)), level).where(*clauses)
        stmt = stmt.order_by(_ID_COLUMN[level])
        if max_results > 0:
            stmt = stmt.limit(max_results + 1)
        result = session.execute(stmt)
        sent = 0
        while True:
            rows = [dict(r._mapping) for r in result.fetchmany(BATCH)]
            if not rows:
                break
            aggregates = _aggregates(session, level, [r["_id"] for r in rows], set(wanted), block is not None)
            for row in rows:
                for hook in RESPONSE_HOOKS:
                    hook(sent, is_cancelled)
                if is_cancelled():
                    log.info("C-FIND %s from %s cancelled after %d result(s)", describe(identifier, level), peer, sent)
                    yield CANCEL, None
                    return
                if max_results > 0 and sent >= max_results:
                    log.warning("C-FIND %s from %s stopped after %d results (qr.max_find_results); "
                                "answering 0x%04X", describe(identifier, level), peer, sent, OUT_OF_RESOURCES)
                    yield OUT_OF_RESOURCES, None
                    return
                yield PENDING, build_response(row, level, wanted, aggregates, block, ae_title)
                sent += 1
        log.info("C-FIND %s from %s: %d result(s)", describe(identifier, level), peer, sent)
