"""The few header attributes the index needs, read from an encoded instance without its pixel data."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from dicomnode.part10 import (
    DEFLATED,
    EXPLICIT_BE,
    IMPLICIT_LE,
    UNDEFINED_LENGTH,
    IncompleteDataset,
    check_complete,
    dataset_offset,
    file_meta_info,
    top_level_elements,
)
from dicomnode.receive.storage import validate_uid

# Tags read from the header; pixel data and everything after it is never parsed.
_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "Modality", "ReferringPhysicianName", "StudyDescription", "SeriesDescription", "PatientName", "PatientID",
    "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "BodyPartExamined", "StudyInstanceUID",
    "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber",
]

_TAG_NUMBERS = frozenset(tag_for_keyword(k) for k in _TAGS)
_LAST_TAG = max(_TAG_NUMBERS)

_INT_KEYWORDS = {"SeriesNumber", "InstanceNumber"}
_UID_KEYWORDS = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}


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
    values: dict[str, object] = {}
    for keyword in _TAGS:
        if keyword in _UID_KEYWORDS:
            values[keyword] = ds.get(keyword)
        elif keyword in _INT_KEYWORDS:
            values[keyword] = _int(ds, keyword)
        else:
            values[keyword] = _text(ds, keyword)
    return header_from_values(values, transfer_syntax_uid)


def header_from_values(values: dict[str, object], transfer_syntax_uid: str) -> InstanceHeader:
    """Build an :class:`InstanceHeader` from decoded values by keyword (UIDs validated, ``InvalidUID``)."""

    def text(keyword: str) -> str:
        return str(values.get(keyword) or "")

    return InstanceHeader(
        sop_class_uid=validate_uid(values.get("SOPClassUID"), "SOPClassUID"),
        sop_instance_uid=validate_uid(values.get("SOPInstanceUID"), "SOPInstanceUID"),
        study_instance_uid=validate_uid(values.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(values.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        specific_character_set=text("SpecificCharacterSet"),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate")[:8],
        patient_sex=text("PatientSex"),
        study_date=text("StudyDate")[:8],
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"),
        modality=text("Modality"),
        series_number=values.get("SeriesNumber"),
        series_description=text("SeriesDescription"),
        body_part_examined=text("BodyPartExamined"),
        instance_number=values.get("InstanceNumber"),
    )


def read_header(encoded: bytes) -> InstanceHeader:
    """Parse the header of a Part 10 encoded instance (preamble + file meta + dataset).

    Raises :class:`UndecodableDataset` when the bytes do not parse and ``InvalidUID`` when a
    required UID is missing or malformed.

    Little endian datasets take a fast path that walks the top-level elements only up to the last
    tag the index needs (InstanceNumber, group 0020) and hands just those ~20 raw elements to pydicom
    for decoding (character sets included); anything unusual on that path falls back to a full
    ``dcmread``, so the outcome for odd or corrupt input is the same as before.
    """
    try:
        found = _scan_header(encoded)
    except (IncompleteDataset, ValueError, IndexError, struct.error):
        found = None
    if found is None:
        return _read_header_pydicom(encoded)
    raw, ts, offset = found
    try:
        check_complete(memoryview(encoded)[offset:], ts)
    except IncompleteDataset as exc:
        raise UndecodableDataset(f"dataset is incomplete: {exc}") from exc
    header = _header_from_ascii(raw, ts)
    if header is not None:
        return header
    ds = pydicom.Dataset(raw)
    ds.set_original_encoding(ts == IMPLICIT_LE, True)
    try:
        for elem in ds:  # decode every value read, so that a bad one fails here
            _ = elem.value
    except Exception as exc:
        raise UndecodableDataset(f"dataset does not decode: {type(exc).__name__}: {exc}") from exc
    return header_from_dataset(ds, ts)


_KEYWORD_OF = {tag_for_keyword(k): k for k in _TAGS}


def _header_from_ascii(raw: dict, ts: str) -> InstanceHeader | None:
    """The header straight from raw values when all are plain single-valued ASCII, else None.

    Plain ASCII decodes the same under every character set DICOM allows, so no pydicom conversion
    is needed; anything else (non-ASCII bytes, ESC, multiple values, a non-decimal number) returns
    None and the values go through pydicom as before.
    """
    values: dict[str, object] = {}
    for tag, elem in raw.items():
        value = elem.value
        if not value.isascii() or b"\\" in value or b"\x1b" in value:
            return None
        keyword = _KEYWORD_OF[tag]
        text = value.decode("ascii")
        if keyword in _UID_KEYWORDS:
            values[keyword] = text
        elif keyword in _INT_KEYWORDS:
            text = text.strip(" \x00")
            if text and not text.lstrip("+-").isdigit():
                return None
            values[keyword] = int(text) if text else None
        else:
            values[keyword] = text.rstrip("\x00").strip()
    return header_from_values(values, ts)


def _scan_header(encoded: bytes) -> tuple[dict, str, int] | None:
    """The fast path of :func:`read_header`: (raw wanted elements by tag, transfer syntax, dataset offset).

    Returns None where the full parser must decide (big endian, deflate, no transfer syntax).
    """
    offset, ts = file_meta_info(encoded)
    if not ts or ts in (DEFLATED, EXPLICIT_BE):
        return None
    implicit = ts == IMPLICIT_LE
    raw: dict = {}
    end = len(encoded)
    for tag, vr, length, value_pos in top_level_elements(encoded, offset, implicit):
        if tag > _LAST_TAG:
            break
        if tag in _TAG_NUMBERS:
            if length == UNDEFINED_LENGTH or value_pos + length > end:
                return None
            raw[Tag(tag)] = RawDataElement(Tag(tag), None if vr is None else vr.decode("ascii"), length,
                                          encoded[value_pos:value_pos + length], value_pos, implicit, True)
        elif length != UNDEFINED_LENGTH and value_pos + length > end:
            return None
    return raw, ts, offset


def _read_header_pydicom(encoded: bytes) -> InstanceHeader:
    """The full parser: ``dcmread`` of everything before the pixel data."""
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
