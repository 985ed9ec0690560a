"""C-FIND SCP with DCMTK's findscu as the peer: region keys, the private block, charsets, cancel, counts.

findscu writes each response to rspNNNN.dcm (``-X``); the tests read those files back.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import insert, select

import qr_data
from conftest import REPO, dcmtk
from dicomnode.db.models import Instance, Series, Study
from dicomnode.qr import private
from dicomnode.qr.find import CANCEL, OUT_OF_RESOURCES, PENDING, find


@pytest.fixture
def node(running_node):
    return running_node, qr_data.populate(running_node)


def findscu(port: int, out: Path, keys: list, *extra, env: dict | None = None
            ) -> tuple[subprocess.CompletedProcess, list[pydicom.Dataset]]:
    """Run DCMTK findscu (Study Root unless ``-P`` in extra); return the process and the responses."""
    out.mkdir(parents=True, exist_ok=True)
    args: list = [dcmtk("findscu"), "-S", "-X", "-od", str(out), "-aet", "FINDSCU", "-aec", "DICOMNODE", *extra]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(port)]
    proc = subprocess.run(args, capture_output=True, timeout=60, env=env)
    responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return proc, responses


def test_series_level_region_query_returns_the_private_block(node, tmp_path):
    ctx, st = node
    proc, rsp = findscu(ctx.config.port, tmp_path / "r", [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={st.philips_study}", "BodyPartExamined=LIVER",
        "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "(0011,0010)=DICOMNODE 1.0"])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert len(rsp) == 1
    ds = rsp[0]
    assert ds.SeriesInstanceUID == st.philips_series
    assert list(ds.BodyPartExamined) == ["LUNG", "LIVER"]
    assert ds.NumberOfSeriesRelatedInstances == 10
    block = ds.private_block(0x0011, private.PRIVATE_CREATOR)
    assert block[private.STATE].value == "done"
    assert block[private.MODEL_VERSION].value == "test-1"
    ranges = block[private.RANGES].value
    liver = ranges[1].private_block(0x0011, private.PRIVATE_CREATOR)
    assert liver[private.R_REGION].value == "LIVER"
    assert (liver[private.R_FIRST_NUMBER].value, liver[private.R_LAST_NUMBER].value) == (59, 64)
    assert liver[private.R_FIRST_UID].value == st.philips_sops[59]
    assert liver[private.R_LAST_UID].value == st.philips_sops[64]
    assert liver[private.R_N_SLICES].value == 6
    assert float(liver[private.R_Z_START].value) == pytest.approx(-414.0)

    # Without a group 0x0011 key the block is not returned.
    _, rsp = findscu(ctx.config.port, tmp_path / "s", [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={st.philips_study}", "SeriesInstanceUID"])
    assert len(rsp) == 1 and not any(e.tag.group == 0x0011 for e in rsp[0])


def test_image_level_region_query_lists_exactly_the_classified_slices(node, tmp_path):
    ctx, st = node
    proc, rsp = findscu(ctx.config.port, tmp_path / "r", [
        "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={st.philips_series}", "BodyPartExamined=LIVER",
        "SOPInstanceUID", "InstanceNumber", "(0011,0010)=DICOMNODE 1.0"])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert {ds.SOPInstanceUID for ds in rsp} == st.liver_sops()
    assert len(rsp) == len(st.liver_sops())
    for ds in rsp:
        parts = ds["BodyPartExamined"].value
        assert "LIVER" in ([parts] if isinstance(parts, str) else list(parts))
        assert "\\".join([parts] if isinstance(parts, str) else parts) == qr_data.REGIONS[ds.InstanceNumber]
        block = ds.private_block(0x0011, private.PRIVATE_CREATOR)
        assert len(block[private.SLICE_P].value) == 5
        assert block[private.SLICE_POSITION].value == ds.InstanceNumber - 55


@pytest.mark.parametrize("query_charset, encoding", [("ISO_IR 100", "latin-1"), ("ISO_IR 192", "utf-8")])
def test_non_ascii_description_matches_and_is_returned_intact(node, tmp_path, query_charset, encoding):
    ctx, st = node
    out = tmp_path / "r"
    keys = [f"SpecificCharacterSet={query_charset}".encode(), b"QueryRetrieveLevel=STUDY",
            f"StudyDescription={qr_data.TORAX}".encode(encoding), b"StudyInstanceUID", b"PatientName"]
    proc, rsp = findscu(ctx.config.port, out, keys)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    by_uid = {ds.StudyInstanceUID: ds for ds in rsp}
    assert set(by_uid) == {st.torax["ISO_IR 100"], st.torax["ISO_IR 192"]}
    for charset, uid in st.torax.items():
        ds = by_uid[uid]
        assert ds.SpecificCharacterSet == charset  # answered in the charset the study was stored with
        assert ds.StudyDescription == qr_data.TORAX
        assert str(ds.PatientName) == "Gómez^Ana"
    raw = {p.read_bytes() for p in out.glob("rsp*.dcm")}
    assert any(b"T\xf3rax" in r for r in raw) and any("Tórax".encode("utf-8") in r for r in raw)


def test_study_level_computed_keys_patient_root(node, tmp_path):
    ctx, st = node
    proc, rsp = findscu(ctx.config.port, tmp_path / "r", [
        "QueryRetrieveLevel=STUDY", "PatientID=Lung_Dx-A0001", "StudyInstanceUID", "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveAETitle"], "-P")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert len(rsp) == 1
    ds = rsp[0]
    assert ds.StudyInstanceUID == st.philips_study and ds.PatientID == "Lung_Dx-A0001"
    assert (ds.ModalitiesInStudy, ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances) == ("CT", 1, 10)
    assert ds.RetrieveAETitle == "DICOMNODE"


def _add_synthetic_instances(ctx, n: int) -> str:
    """Index-only rows (no files) under the GE series' study: enough responses for a cancel to land mid-way."""
    with ctx.sessions() as s:
        study = s.scalar(select(Study).limit(1))
        series = Series(study_fk=study.id, series_instance_uid="2.25.4242", modality="CT")
        s.add(series)
        s.flush()
        s.execute(insert(Instance), [{"series_fk": series.id, "sop_instance_uid": f"2.25.4242.{i}",
                                      "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_number": i,
                                      "path": "none"} for i in range(n)])
        s.commit()
    return "2.25.4242"


def test_findscu_cancel_stops_the_responses(node, tmp_path):
    """findscu sends C-CANCEL after the first response (``--cancel 1``). The node's response generator is
    held (find.RESPONSE_HOOKS) before its second response until the C-CANCEL has arrived, so the outcome
    does not depend on load: exactly one response, then 0xFE00."""
    import threading

    from dicomnode.qr import find as find_module

    ctx, _ = node
    n = 50
    series_uid = _add_synthetic_instances(ctx, n)
    seen_cancel = threading.Event()

    def hold(sent, is_cancelled):
        if sent == 1:  # the first response is out; wait (bounded) for findscu's C-CANCEL to be received
            for _ in range(1200):
                if is_cancelled():
                    seen_cancel.set()
                    return
                threading.Event().wait(0.1)

    find_module.RESPONSE_HOOKS.append(hold)
    try:
        proc, rsp = findscu(ctx.config.port, tmp_path / "r", [
            "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={series_uid}", "SOPInstanceUID"], "--cancel", "1", "-v")
    finally:
        find_module.RESPONSE_HOOKS.remove(hold)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, text
    assert seen_cancel.is_set(), "the C-CANCEL never reached the C-FIND generator"
    assert "Cancel" in text  # the final response findscu printed: 0xFE00 "Matching terminated due to Cancel"
    assert len(rsp) == 1


def test_sop_classes_in_study_at_study_and_series_level(node, tmp_path):
    """SOPClassesInStudy (0008,0062) is filled like ModalitiesInStudy (odil's get asks for it first)."""
    ctx, st = node
    for level, keys in (("STUDY", []), ("SERIES", [f"SeriesInstanceUID={st.philips_series}"])):
        proc, rsp = findscu(ctx.config.port, tmp_path / level, [
            f"QueryRetrieveLevel={level}", f"StudyInstanceUID={st.philips_study}", *keys, "SOPClassesInStudy"])
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert len(rsp) == 1 and rsp[0].SOPClassesInStudy == "1.2.840.10008.5.1.4.1.1.2", level


def test_cancel_is_checked_before_every_response(node):
    ctx, st = node
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.SeriesInstanceUID = st.philips_series
    q.SOPInstanceUID = ""
    statuses: list[int] = []
    for status, _ in find(ctx.sessions, q, is_cancelled=lambda: len(statuses) >= 3):
        statuses.append(status)
    assert statuses == [PENDING, PENDING, PENDING, CANCEL]  # 10 match; the C-CANCEL came after the third


def test_max_find_results_stops_with_out_of_resources(node):
    ctx, st = node
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.SeriesInstanceUID = st.philips_series
    q.SOPInstanceUID = ""
    statuses = [s for s, _ in find(ctx.sessions, q, max_results=4)]
    assert statuses == [PENDING] * 4 + [OUT_OF_RESOURCES]


def test_patient_identifiers_never_reach_the_log(node, tmp_path, caplog):
    ctx, st = node
    caplog.set_level(logging.DEBUG)
    findscu(ctx.config.port, tmp_path / "r", ["QueryRetrieveLevel=STUDY", "PatientName=Gómez^Ana".encode(),
                                              "PatientID=TORAX-100", f"StudyInstanceUID={st.torax['ISO_IR 100']}",
                                              "PatientBirthDate"], "-P")
    text = "\n".join(r.getMessage() for r in caplog.records)  # pynetdicom's records included
    assert st.torax["ISO_IR 100"] in text  # the query is logged, by UID
    for identifier in ("Gómez", "Ana", "TORAX-100"):
        assert identifier not in text


def test_findscu_matches_on_the_private_state(node, tmp_path):
    """DCMTK needs the private dictionary of docs/dicomnode.dic to put (0011,1001) in a query."""
    ctx, st = node
    dictionaries = sorted(Path("/usr/share").glob("libdcmtk*/dicom.dic"))
    if not dictionaries:
        pytest.skip("DCMTK's dicom.dic not found under /usr/share/libdcmtk*")
    env = {**os.environ, "DCMDICTPATH": f"{dictionaries[-1]}:{REPO / 'docs' / 'dicomnode.dic'}"}
    proc, rsp = findscu(ctx.config.port, tmp_path / "r", [
        "QueryRetrieveLevel=SERIES", "SeriesInstanceUID", "(0011,0010)=DICOMNODE 1.0", "(0011,1001)=skipped"],
        env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert [ds.SeriesInstanceUID for ds in rsp] == [st.ge_series]
    block = rsp[0].private_block(0x0011, private.PRIVATE_CREATOR)
    assert block[private.REASON].value.startswith("3 slices")
