"""The few header attributes the index needs, read from an encoded instance without its pixel data."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import pydicom

from dicomnode.dataset_check import IncompleteDataset, check_complete, dataset_offset
from dicomnode.storage import validate_uid

# Tags read from the header; pixel data and everything after it is never parsed.
_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "Modality", "ReferringPhysicianName", "StudyDescription", "SeriesDescription", "PatientName", "PatientID",
    "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "BodyPartExamined", "StudyInstanceUID",
    "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber",
]


class UndecodableDataset(ValueError):
    """The bytes a peer sent are not a dataset pydicom can parse."""


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    specific_character_set: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def header_from_dataset(ds: pydicom.Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    """Build an :class:`InstanceHeader` from a dataset, validating the four UIDs (``InvalidUID``)."""
    return InstanceHeader(
        sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOPClassUID"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        specific_character_set=_text(ds, "SpecificCharacterSet"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate")[:8],
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate")[:8],
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        instance_number=_int(ds, "InstanceNumber"),
    )


def read_header(encoded: bytes) -> InstanceHeader:
    """Parse the header of a Part 10 encoded instance (preamble + file meta + dataset).

    Raises :class:`UndecodableDataset` when the bytes do not parse and ``InvalidUID`` when a
    required UID is missing or malformed.
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_TAGS)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        # Touch every element so that a value that cannot be decoded fails here, not later.
        for elem in ds:
            _ = elem.value
        for kw in ("PatientName", "StudyDescription", "SeriesDescription", "ReferringPhysicianName"):
            _ = ds.get(kw)
    except Exception as exc:  # pydicom raises many kinds of error on corrupt input
        raise UndecodableDataset(f"dataset does not decode: {type(exc).__name__}: {exc}") from exc
    try:
        check_complete(memoryview(encoded)[dataset_offset(encoded):], ts)
    except IncompleteDataset as exc:
        raise UndecodableDataset(f"dataset is incomplete: {exc}") from exc
    return header_from_dataset(ds, ts)
