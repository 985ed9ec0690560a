"""Per-region Key Object Selection documents: "liver slices" referencing exactly the region's slices."""

from __future__ import annotations

import pytest

from dicomnode.results.content import load_series_results
from dicomnode.results.kos import build_kos
from results_data import classified


@pytest.fixture
def results(node_ctx):
    stored, sid = classified(node_ctx)
    with node_ctx.sessions() as s:
        return stored, load_series_results(s, sid, node_ctx.config.resolved_storage_dir)


def _referenced(kos) -> list[str]:
    return [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in kos.ContentSequence if item.ValueType == "IMAGE"]


def test_liver_kos_references_the_liver_slices_and_reads_liver_slices(results):
    stored, res = results
    kos = build_kos(res, "liver")
    assert kos.Modality == "KO" and kos.StudyInstanceUID == stored.philips_study
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest (CID 7010)
    description = [str(i.TextValue) for i in kos.ContentSequence
                   if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert description == ["liver slices"] and kos.SeriesDescription == "liver slices"
    assert _referenced(kos) == [stored.philips_sops[n] for n in range(59, 65)]
    evidence = [r.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence]
    assert sorted(evidence) == sorted(_referenced(kos))


def test_each_region_its_own_series(results):
    _stored, res = results
    lungs, liver = build_kos(res, "lungs"), build_kos(res, "liver")
    assert lungs.SeriesInstanceUID != liver.SeriesInstanceUID
    assert len(_referenced(lungs)) == 7


def test_a_region_the_series_lacks_is_a_clear_error(results):
    _stored, res = results
    with pytest.raises(ValueError, match="no pelvis slices"):
        build_kos(res, "pelvis")
