"""A PACS (Orthanc) routes a whole study (CT + Secondary Capture + Key Object Selection + dose SR) to the
node with the default configuration: every instance arrives, is stored and indexed; only CT is classified."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from conftest import CT_FIXTURES
from dicomnode.db.models import Instance, Series, Study
from dicomnode.queue.stability import mark_stable_series
from tests.orthanc import orthanc_server

SLICES = sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm"))
SC, KOS, DOSE_SR = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.88.67"
STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def _non_ct(ct: Dataset, sop_class: str, modality: str, with_pixels: bool) -> Dataset:
    """An instance of another SOP class in the CT's study (its own series), without StudyDescription."""
    ds = copy.deepcopy(ct) if with_pixels else Dataset()
    for keyword in STUDY_KEYWORDS:
        if keyword in ct:
            setattr(ds, keyword, ct.data_element(keyword).value)
    if "StudyDescription" in ds:
        del ds.StudyDescription
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), modality, 900, 1
    if not with_pixels:
        ds.ContentDate, ds.ContentTime, ds.ValueType = ct.StudyDate, "120000", "CONTAINER"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
        concept.CodeMeaning = "X-Ray Radiation Dose Report" if sop_class == DOSE_SR else "Of Interest"
        ds.ConceptNameCodeSequence = [concept]
        ds.ContinuityOfContent = "SEPARATE"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture
def study() -> list[Dataset]:
    cts = [pydicom.dcmread(p) for p in SLICES]
    for ds in cts:
        ds.StudyDescription = "CT THORAX"
    return [_non_ct(cts[0], SC, "OT", True), _non_ct(cts[0], KOS, "KO", False),
            _non_ct(cts[0], DOSE_SR, "SR", False), *cts]


def test_orthanc_routes_a_mixed_study_to_the_node(running_node, study, tmp_path):
    ctx = running_node
    with orthanc_server(tmp_path / "orthanc") as pacs:
        pacs.store(study)
        pacs.add_modality("node", ctx.config.ae_title, "127.0.0.1", ctx.config.port)
        (study_id,) = pacs.rest("GET", "/studies")
        answer = pacs.rest("POST", "/modalities/node/store", {"Resources": [study_id], "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == len(study), answer
    with ctx.sessions() as s:
        assert set(s.scalars(select(Instance.sop_instance_uid))) == {str(ds.SOPInstanceUID) for ds in study}
        assert s.scalar(select(Study.study_description)) == "CT THORAX"  # whichever instance came first
    assert len(list(ctx.storage_dir.rglob("*.dcm"))) == len(study)
    mark_stable_series(ctx.sessions, 0.0)
    with ctx.sessions() as s:
        states = {modality: (state, reason) for modality, state, reason in
                  s.execute(select(Series.modality, Series.classification_state, Series.classification_reason))}
    assert states["CT"][0] == "queued"
    for modality in ("OT", "KO", "SR"):
        assert states[modality][0] == "skipped" and "CT only" in states[modality][1]
