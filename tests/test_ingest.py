"""store_instance without a network: duplicate policies, SOP class mismatch, statuses."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from sqlalchemy import func, select

from conftest import CT_FIXTURES
from dicomnode.db.models import Instance, Series
from dicomnode.receive.ingest import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_REJECTED,
    SUCCESS,
    store_instance,
)
from dicomnode.queue.stability import mark_stable_series

SLICE = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"


def part10(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def rows(ctx) -> list[Instance]:
    with ctx.sessions() as s:
        return s.scalars(select(Instance)).all()


@pytest.mark.parametrize("policy, second_status", [("keep", SUCCESS), ("replace", SUCCESS),
                                                   ("reject", DUPLICATE_REJECTED)])
def test_duplicate_policies(node_ctx, policy, second_status):
    node_ctx.config.listener.duplicate_policy = policy
    original = SLICE.read_bytes()
    changed_ds = pydicom.dcmread(SLICE)
    changed_ds.SeriesDescription = "re-sent with a change"
    changed = part10(changed_ds)
    assert store_instance(node_ctx, original) == SUCCESS
    assert store_instance(node_ctx, changed) == second_status
    (row,) = rows(node_ctx)  # never two rows
    stored = (node_ctx.storage_dir / row.path).read_bytes()
    assert stored == (changed if policy == "replace" else original)
    files = [p for p in node_ctx.storage_dir.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_replaced_instance_reopens_a_stable_series(node_ctx):
    node_ctx.config.listener.duplicate_policy = "replace"
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    mark_stable_series(node_ctx.sessions, 0.0)
    with node_ctx.sessions() as s:
        assert s.scalar(select(Series.state)) == "stable"
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    with node_ctx.sessions() as s:
        assert s.scalar(select(Series.state)) == "receiving"


def test_power_loss_safe_mode_stores(node_ctx):
    node_ctx.config.listener.power_loss_safe = True  # fsync the folder after each rename
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    (row,) = rows(node_ctx)
    assert (node_ctx.storage_dir / row.path).read_bytes() == SLICE.read_bytes()


def test_sop_class_of_request_and_dataset_must_agree(node_ctx):
    status = store_instance(node_ctx, SLICE.read_bytes(), expected_sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    assert status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    with node_ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    assert not [p for p in node_ctx.storage_dir.rglob("*") if p.is_file()]


def test_truncated_instance_is_refused(node_ctx):
    raw = SLICE.read_bytes()
    assert store_instance(node_ctx, raw[: len(raw) - 1000]) != SUCCESS
    assert rows(node_ctx) == []


def test_patient_identifiers_never_reach_the_log(node_ctx, caplog):
    ds = pydicom.dcmread(SLICE)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    caplog.set_level("DEBUG")
    assert store_instance(node_ctx, part10(ds)) == SUCCESS
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    store_instance(node_ctx, part10(ds), expected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    assert caplog.records  # something was logged
    assert "Doe" not in caplog.text and "PID-SECRET-42" not in caplog.text
