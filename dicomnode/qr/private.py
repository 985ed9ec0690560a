"""The node's private block: classification results returned (and partly matchable) in C-FIND.

Private creator ``DICOMNODE 1.0`` in group 0x0011 (documented in docs/query.md). Elements, with ``xx`` the
block the creator was given (0x10 unless the query reserved another):

SERIES level
  (0011,xx01) LO  ClassificationState     none, queued, running, done, failed, skipped (matchable)
  (0011,xx02) LT  ClassificationReason    why failed/skipped; empty otherwise
  (0011,xx03) LO  ModelVersion            version of the model that classified the series (matchable)
  (0011,xx04) CS  OriginalBodyPartExamined the BodyPartExamined the modality sent
  (0011,xx10) SQ  RegionRangeSequence     one item per contiguous region, in anatomical order:
      (0011,xx11) CS Region (HEAD, NECK, LUNG, LIVER, ABDOMEN, PELVIS, LEG: the model's classes)
      (0011,xx12) IS FirstInstanceNumber    (0011,xx13) IS LastInstanceNumber
      (0011,xx14) UI FirstSOPInstanceUID    (0011,xx15) UI LastSOPInstanceUID
      (0011,xx16) DS ZStart (mm)            (0011,xx17) DS ZEnd (mm)
      (0011,xx18) IS NumberOfSlices         (0011,xx19) DS MeanProbability
IMAGE level
  (0011,xx01), (0011,xx03) as above, for the slice's series
  (0011,xx20) DS SliceProbabilities       five values: neck, lungs, liver, pelvis, legs
  (0011,xx21) LO PredictedRegion          argmax class name (head, neck, lungs, liver, abdomen, pelvis, legs)
  (0011,xx22) IS AnatomicalPosition       0 = the top slice of the series in anatomical order
  (0011,xx23) DS HeadProbability          probability of class head; empty when the model has no head class
  (0011,xx24) DS AbdomenProbability       probability of class abdomen; empty when the model has none

The block is returned when the identifier holds any element of group 0x0011 (e.g. only the creator,
``-k "(0011,0010)=DICOMNODE 1.0"``).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PRIVATE_CREATOR = "DICOMNODE 1.0"
GROUP = 0x0011
DEFAULT_BLOCK = 0x10

STATE, REASON, MODEL_VERSION, ORIGINAL_BODY_PART = 0x01, 0x02, 0x03, 0x04
RANGES = 0x10
R_REGION, R_FIRST_NUMBER, R_LAST_NUMBER, R_FIRST_UID, R_LAST_UID = 0x11, 0x12, 0x13, 0x14, 0x15
R_Z_START, R_Z_END, R_N_SLICES, R_MEAN_P = 0x16, 0x17, 0x18, 0x19
SLICE_P, SLICE_PREDICTED, SLICE_POSITION = 0x20, 0x21, 0x22
SLICE_P_HEAD, SLICE_P_ABDOMEN = 0x23, 0x24

#: Matchable private elements: offset -> (name, VR).
MATCHABLE = {STATE: ("ClassificationState", "LO"), MODEL_VERSION: ("ModelVersion", "LO")}


def _text(value: Any) -> str:
    """An element value as text; private elements of an implicit VR identifier arrive as bytes (VR UN)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value if value is not None else "").strip("\x00 ")


def requested_block(identifier: Dataset) -> int | None:
    """The block our creator holds in ``identifier``; DEFAULT_BLOCK when group 0x0011 is there without it;
    None when the identifier has no group 0x0011 element (the private block is not wanted)."""
    present = False
    for elem in identifier:
        if elem.tag.group != GROUP:
            continue
        present = True
        if 0x10 <= elem.tag.element <= 0xFF and _text(elem.value) == PRIVATE_CREATOR:
            return elem.tag.element
    return DEFAULT_BLOCK if present else None


def private_query_values(identifier: Dataset, block: int) -> dict[int, Any]:
    """Values given for the matchable private elements (offset -> value), empty ones included."""
    out = {}
    for offset in MATCHABLE:
        tag = (GROUP << 16) | (block << 8) | offset
        if tag in identifier:
            out[offset] = _text(identifier[tag].value)
    return out


def _tag(block: int, offset: int) -> int:
    return (GROUP << 16) | (block << 8) | offset


def _num(value: Any) -> Any:
    return "" if value is None else value


def _ds(value: float | None) -> Any:
    return "" if value is None else f"{value:.6g}"


def _creator(ds: Dataset, block: int) -> None:
    ds.add_new((GROUP << 16) | block, "LO", PRIVATE_CREATOR)


def add_series_block(ds: Dataset, block: int, series: dict[str, Any], ranges: list[dict[str, Any]]) -> None:
    """Add the SERIES-level private elements to ``ds``.

    ``series`` has classification_state, classification_reason, model_version and body_part_examined;
    ``ranges`` the RegionRange columns, in anatomical order.
    """
    _creator(ds, block)
    ds.add_new(_tag(block, STATE), "LO", series.get("classification_state") or "")
    ds.add_new(_tag(block, REASON), "LT", series.get("classification_reason") or "")
    ds.add_new(_tag(block, MODEL_VERSION), "LO", series.get("model_version") or "")
    ds.add_new(_tag(block, ORIGINAL_BODY_PART), "CS", series.get("body_part_examined") or "")
    items = []
    for r in ranges:
        item = Dataset()
        _creator(item, block)
        item.add_new(_tag(block, R_REGION), "CS", r["body_part"])
        item.add_new(_tag(block, R_FIRST_NUMBER), "IS", _num(r["first_instance_number"]))
        item.add_new(_tag(block, R_LAST_NUMBER), "IS", _num(r["last_instance_number"]))
        item.add_new(_tag(block, R_FIRST_UID), "UI", r["first_sop_instance_uid"] or "")
        item.add_new(_tag(block, R_LAST_UID), "UI", r["last_sop_instance_uid"] or "")
        item.add_new(_tag(block, R_Z_START), "DS", _ds(r["z_start_mm"]))
        item.add_new(_tag(block, R_Z_END), "DS", _ds(r["z_end_mm"]))
        item.add_new(_tag(block, R_N_SLICES), "IS", r["n_slices"])
        item.add_new(_tag(block, R_MEAN_P), "DS", _ds(r["mean_probability"]))
        items.append(item)
    ds.add_new(_tag(block, RANGES), "SQ", Sequence(items))


def add_image_block(ds: Dataset, block: int, row: dict[str, Any]) -> None:
    """Add the IMAGE-level private elements (slice probabilities, prediction, position) to ``ds``."""
    _creator(ds, block)
    ds.add_new(_tag(block, STATE), "LO", row.get("classification_state") or "")
    ds.add_new(_tag(block, MODEL_VERSION), "LO", row.get("sr_model_version") or row.get("model_version") or "")
    if row.get("p_neck") is None:
        ds.add_new(_tag(block, SLICE_P), "DS", "")
        ds.add_new(_tag(block, SLICE_PREDICTED), "LO", "")
        ds.add_new(_tag(block, SLICE_POSITION), "IS", "")
        ds.add_new(_tag(block, SLICE_P_HEAD), "DS", "")
        ds.add_new(_tag(block, SLICE_P_ABDOMEN), "DS", "")
        return
    probs = [row["p_neck"], row["p_lungs"], row["p_liver"], row["p_pelvis"], row["p_legs"]]
    ds.add_new(_tag(block, SLICE_P), "DS", [f"{p:.4f}" for p in probs])
    ds.add_new(_tag(block, SLICE_PREDICTED), "LO", row.get("predicted") or "")
    ds.add_new(_tag(block, SLICE_POSITION), "IS", row.get("position"))
    for offset, key in ((SLICE_P_HEAD, "p_head"), (SLICE_P_ABDOMEN, "p_abdomen")):
        value = row.get(key)
        ds.add_new(_tag(block, offset), "DS", "" if value is None else f"{value:.4f}")
