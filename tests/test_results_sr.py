"""The per-series SR: TID 1500 content from the index's region ranges, valid for dciodvfy."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from dicomnode.results.content import load_series_results
from dicomnode.results.jobs import build_documents
from dicomnode.results.sr import build_sr, sr_instance_uid, sr_series_uid
from results_data import DCIODVFY, classified, dciodvfy_errors, series_id


@pytest.fixture
def results(node_ctx):
    stored, sid = classified(node_ctx)
    with node_ctx.sessions() as s:
        return stored, load_series_results(s, sid, node_ctx.config.resolved_storage_dir)


def _groups(sr):
    """(finding site meaning, slice count, mean probability, referenced SOP UIDs) per measurement group."""
    container = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = []
    for group in container.ContentSequence:
        site = count = prob = None
        refs = []
        for item in group.ContentSequence:
            code = item.ConceptNameCodeSequence[0].CodeValue
            if code == "363698007":  # Finding Site
                site = item.ConceptCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeValue
            elif code == "REGION-SLICES":
                count = float(item.MeasuredValueSequence[0].NumericValue)
            elif code == "122157":
                prob = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "IMAGE":
                refs.append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        groups.append((site, count, prob, refs))
    return groups


def test_sr_has_one_coded_entry_per_region_with_its_slices(results):
    stored, res = results
    sr = build_sr(res, "DICOMNODE")
    assert sr.StudyInstanceUID == stored.philips_study
    assert sr.SeriesInstanceUID == sr_series_uid(res) != stored.philips_series
    assert sr.SOPInstanceUID == sr_instance_uid(res)
    source = dcmread(stored.files[stored.philips_sops[55]], stop_before_pixels=True)
    assert (sr.PatientID, sr.PatientName) == (source.PatientID, source.PatientName)
    groups = _groups(sr)
    sops = stored.philips_sops
    assert [g[0] for g in groups] == [("Lung", "39607008"), ("Liver", "10200004")]
    assert [g[1] for g in groups] == [7.0, 6.0]
    assert [g[2] for g in groups] == [pytest.approx(0.8), pytest.approx(0.8)]
    assert groups[0][3] == [sops[n] for n in range(55, 62)]
    assert groups[1][3] == [sops[n] for n in range(59, 65)]
    # the model version is the algorithm version (DCM 111003) of every measurement
    assert _texts(sr, "111003") and set(_texts(sr, "111003")) == {"test-1"}


def _texts(ds, code: str) -> list[str]:
    """TextValue of every content item named ``code``, anywhere in the tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == code:
            found.append(str(item.TextValue))
        found += _texts(item, code)
    return found


@pytest.mark.skipif(not DCIODVFY.exists(), reason="dciodvfy (dicom3tools) not installed")
def test_sr_and_kos_pass_dciodvfy(results, tmp_path):
    _stored, res = results
    from dicomnode.config import load_config

    docs = build_documents(load_config(None), res)
    assert [d.Modality for d in docs] == ["SR", "KO", "KO"]
    for i, ds in enumerate(docs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"{ds.SOPClassUID.name}: dciodvfy errors"


def test_new_version_new_instance_in_the_same_series(results):
    _stored, res = results
    res.version = 1
    first = build_sr(res)
    res.version = 2
    second = build_sr(res)
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert int(second.InstanceNumber) == int(first.InstanceNumber) + 1


def test_unclassified_series_has_no_results(node_ctx):
    stored, _sid = classified(node_ctx)
    with node_ctx.sessions() as s:
        assert load_series_results(s, series_id(node_ctx, stored.ge_series)) is None
