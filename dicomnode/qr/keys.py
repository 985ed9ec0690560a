"""The query keys the node supports, per level, and the index columns behind them.

Levels are PATIENT, STUDY, SERIES, IMAGE. A key of the requested level or of a level above it can be
matched (the node answers "relational-lite": a STUDY query may carry patient keys in either root).
Keys of a lower level than the requested one are ignored and not returned.

``BodyPartExamined`` is the classifier's answer: at SERIES level the regions found in the series
(``LUNG\\LIVER``), at IMAGE level the slice's region(s). Until a series is classified
(``classification_state`` other than ``done``) both fall back to the BodyPartExamined the modality sent,
so an unclassified series stays findable by its original value; the private block
(:mod:`dicomnode.qr.private`) says which of the two a response carries.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.db.models import Instance, Patient, Series, SliceResult, Study

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANK = {name: i for i, name in enumerate(LEVELS)}

#: Unique key of each level (PS3.4 C.6.1.1 / C.6.2.1); PatientID is unique only in the Patient Root.
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}

CLASSIFIED = "done"


@dataclass(frozen=True)
class Key:
    """One attribute: its VR, level, and the SQL expression holding it (None for computed keys)."""

    keyword: str
    vr: str
    level: str
    expr: ColumnElement | None = None
    multi: bool = False  # the column holds several values joined by backslash
    matchable: bool = True


def _series_body_parts() -> ColumnElement:
    return case((Series.classification_state == CLASSIFIED, Series.body_parts), else_=Series.body_part_examined)


def _slice_body_parts() -> ColumnElement:
    return case((Series.classification_state == CLASSIFIED, func.coalesce(SliceResult.body_parts, "")),
                else_=Series.body_part_examined)


_KEYS = [
    Key("PatientName", "PN", "PATIENT", Patient.patient_name),
    Key("PatientID", "LO", "PATIENT", Patient.patient_id),
    Key("IssuerOfPatientID", "LO", "PATIENT", Patient.issuer_of_patient_id),
    Key("PatientBirthDate", "DA", "PATIENT", Patient.patient_birth_date),
    Key("PatientSex", "CS", "PATIENT", Patient.patient_sex),
    Key("NumberOfPatientRelatedStudies", "IS", "PATIENT", matchable=False),
    Key("NumberOfPatientRelatedSeries", "IS", "PATIENT", matchable=False),
    Key("NumberOfPatientRelatedInstances", "IS", "PATIENT", matchable=False),
    Key("StudyInstanceUID", "UI", "STUDY", Study.study_instance_uid),
    Key("StudyDate", "DA", "STUDY", Study.study_date),
    Key("StudyTime", "TM", "STUDY", Study.study_time),
    Key("AccessionNumber", "SH", "STUDY", Study.accession_number),
    Key("StudyID", "SH", "STUDY", Study.study_id),
    Key("StudyDescription", "LO", "STUDY", Study.study_description),
    Key("ReferringPhysicianName", "PN", "STUDY", Study.referring_physician_name),
    Key("ModalitiesInStudy", "CS", "STUDY", multi=True),  # computed; matched with EXISTS over series
    Key("SOPClassesInStudy", "UI", "STUDY", multi=True, matchable=False),  # computed
    Key("NumberOfStudyRelatedSeries", "IS", "STUDY", matchable=False),
    Key("NumberOfStudyRelatedInstances", "IS", "STUDY", matchable=False),
    Key("SeriesInstanceUID", "UI", "SERIES", Series.series_instance_uid),
    Key("Modality", "CS", "SERIES", Series.modality),
    Key("SeriesNumber", "IS", "SERIES", Series.series_number),
    Key("SeriesDescription", "LO", "SERIES", Series.series_description),
    Key("BodyPartExamined", "CS", "SERIES", _series_body_parts(), multi=True),
    Key("NumberOfSeriesRelatedInstances", "IS", "SERIES", matchable=False),
    Key("SOPInstanceUID", "UI", "IMAGE", Instance.sop_instance_uid),
    Key("SOPClassUID", "UI", "IMAGE", Instance.sop_class_uid),
    Key("InstanceNumber", "IS", "IMAGE", Instance.instance_number),
    Key("AvailableTransferSyntaxUID", "UI", "IMAGE", Instance.transfer_syntax_uid),
]

_BY_KEYWORD: dict[str, Key] = {k.keyword: k for k in _KEYS}
#: At IMAGE level BodyPartExamined is the slice's own region(s).
_IMAGE_OVERRIDES = {"BodyPartExamined": Key("BodyPartExamined", "CS", "IMAGE", _slice_body_parts(), multi=True)}

#: Returned when asked for, never matched.
INFORMATIONAL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


def key_for(keyword: str, level: str) -> Key | None:
    """The key ``keyword`` as seen from a query at ``level``; None when unknown or below ``level``."""
    if level == "IMAGE" and keyword in _IMAGE_OVERRIDES:
        return _IMAGE_OVERRIDES[keyword]
    key = _BY_KEYWORD.get(keyword)
    if key is None or RANK[key.level] > RANK[level]:
        return None
    return key


def keys_at(level: str) -> list[Key]:
    """Every key visible from ``level`` (its own and those of the levels above)."""
    return [k for k in (key_for(kw, level) for kw in _BY_KEYWORD) if k is not None]
