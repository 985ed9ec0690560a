"""The results job kind against a real Orthanc as the PACS: the SR and the KOS documents arrive in the
patient's study; a re-classification adds its new version; superseded jobs do nothing."""

from __future__ import annotations

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.config import RemoteAE
from dicomnode.db.index import counts
from dicomnode.db.models import Job, Series
from dicomnode.results.jobs import enqueue_in
from dicomnode.results.runner import process_next
from conftest import shared_ct
from results_data import classified, classify_as, store_series
from tests.orthanc import ORTHANC, orthanc_server

pytestmark = pytest.mark.skipif(not ORTHANC.exists(), reason="Orthanc not installed")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def _run_all(ctx) -> list[str]:
    outcomes = []
    while (outcome := process_next(ctx.config, ctx.sessions, "test-owner")) is not None:
        outcomes.append(outcome)
    return outcomes


def _study(pacs, study_uid: str) -> dict:
    found = pacs.rest("POST", "/tools/lookup", raw=study_uid.encode())
    studies = [f for f in found if f["Type"] == "Study"]
    assert len(studies) == 1, f"{len(studies)} studies with UID {study_uid} (a different PatientID?)"
    (study,) = studies
    return pacs.rest("GET", f"/studies/{study['ID']}")


def _series_of(pacs, study: dict) -> dict[str, list[dict]]:
    """Modality -> list of (series main tags, instance count) of the study."""
    out: dict[str, list[dict]] = {}
    for sid in study["Series"]:
        series = pacs.rest("GET", f"/series/{sid}")
        tags = dict(series["MainDicomTags"], instances=len(series["Instances"]))
        out.setdefault(tags["Modality"], []).append(tags)
    return out


def test_pacs_receives_sr_and_kos_into_the_patients_study(node_ctx, pacs, caplog, recwarn):
    caplog.set_level("DEBUG")
    pacs.clear()
    # a real series (neck, lungs, liver from top to bottom; these ranges are written, not inferred)
    study_uid, series_uid, files = store_series(node_ctx, shared_ct("series/lungpetctdx_a0002_siemens_chest"))
    sid = classify_as(node_ctx, series_uid, [("neck", 0, 4), ("lungs", 5, 19), ("liver", 18, 29)])
    # the PACS holds the source series, as at a hospital
    pacs.store(files)
    node_ctx.config.results.destinations = [RemoteAE(pacs.ae_title, pacs.host, pacs.dicom_port)]
    with node_ctx.sessions.begin() as s:
        assert [j.kind for j in enqueue_in(s, node_ctx.config, sid)] == ["results"]
    assert _run_all(node_ctx) == ["done"]
    study = _study(pacs, study_uid)
    series = _series_of(pacs, study)
    assert sorted(series) == ["CT", "KO", "SR"]
    assert [s["instances"] for s in series["SR"]] == [1]
    assert sorted(s["SeriesDescription"] for s in series["KO"]) == ["liver slices", "lungs slices", "neck slices"]
    patient = pacs.rest("GET", f"/patients/{study['ParentPatient']}")
    assert len(patient["Studies"]) == 1  # the same patient and study, not a new one

    # re-classification: a new version, a new SR instance in the same SR series
    with node_ctx.sessions.begin() as s:
        enqueue_in(s, node_ctx.config, sid)
    assert _run_all(node_ctx) == ["done"]
    series = _series_of(pacs, _study(pacs, study_uid))
    assert [s["instances"] for s in series["SR"]] == [2]
    assert sorted(s["instances"] for s in series["KO"]) == [2, 2, 2]
    with node_ctx.sessions() as s:
        assert counts(s)["jobs_by_kind"]["results"] == {"done": 2}
    # patients are never named in the log, nor in warnings (highdicom's quote the name)
    patient_id = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
    assert "sent 4 document(s)" in caplog.text
    assert patient_id not in caplog.text and not [w for w in recwarn if patient_id in str(w.message)]


def test_a_newer_classification_supersedes_queued_and_running_jobs(node_ctx, pacs):
    _stored, sid = classified(node_ctx)
    node_ctx.config.results.destinations = [RemoteAE(pacs.ae_title, pacs.host, pacs.dicom_port)]
    with node_ctx.sessions.begin() as s:
        first = enqueue_in(s, node_ctx.config, sid)[0].id
        enqueue_in(s, node_ctx.config, sid)
        assert s.get(Job, first).state == "cancelled"
        # a job of version 1 that was already claimed when version 2 came: it sends nothing
        stale = s.get(Job, first)
        stale.state = "queued"
    outcomes = sorted(_run_all(node_ctx))
    assert outcomes == ["done", "skipped"]
    with node_ctx.sessions() as s:
        assert "superseded by results version 2" in s.get(Job, first).error
        assert s.scalar(select(Series.results_version).where(Series.id == sid)) == 2


def test_results_off_queues_nothing(node_ctx, pacs):
    _stored, sid = classified(node_ctx)
    node_ctx.config.results.destinations = [RemoteAE(pacs.ae_title, pacs.host, pacs.dicom_port)]
    node_ctx.config.results.enabled = False
    with node_ctx.sessions.begin() as s:
        assert enqueue_in(s, node_ctx.config, sid) == []
