"""End to end with the real worker and the shipped model: a series sent with DCMTK storescu is classified
by ``dicomnode serve``; its SR and KOS documents arrive in the patient's study on Orthanc (the PACS), and a
DCMTK storescp (the "liver CAD") receives exactly the liver slices plus the margin; ``status --json``
shows both jobs done."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from conftest import SHARED_DATA, dcmtk, free_port, stop_node, wait_for_echo
from dicomnode.classification.model import checkpoint_path
from results_data import received_sops, storescp
from test_end_to_end import status
from tests.orthanc import ORTHANC, orthanc_server

SERIES = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"  # neck, lungs, lungs|liver; 30 slices
MARGIN = 1

pytestmark = [
    pytest.mark.skipif(not SERIES.exists(), reason="needs ../shared/data"),
    pytest.mark.skipif(not ORTHANC.exists(), reason="Orthanc not installed"),
    pytest.mark.skipif(not checkpoint_path(None).exists(), reason="no shipped default model"),
]


def test_classified_series_sends_documents_to_the_pacs_and_liver_slices_to_the_cad(tmp_path):
    cad_dir = tmp_path / "livercad"
    with orthanc_server(tmp_path / "orthanc") as pacs, storescp(cad_dir) as cad_port:
        port = free_port()
        config = tmp_path / "node.yaml"
        config.write_text(f"""
data_dir: {tmp_path / 'data'}
port: {port}
stable_age_s: 1
worker:
  poll_interval_s: 0.2
results:
  destinations:
    - {{ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.dicom_port}}}
routing:
  rules:
    - {{region: liver, destination: {{ae_title: LIVERCAD, host: 127.0.0.1, port: {cad_port}}}, margin_slices: {MARGIN}}}
    - {{region: legs, destination: {{ae_title: LIVERCAD, host: 127.0.0.1, port: {cad_port}}}}}
""")
        log = open(tmp_path / "node.log", "wb")
        node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_echo(port)
            sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(SERIES)],
                                  capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 300  # bounds a hang only
            while time.monotonic() < deadline:
                counts = status(config)
                kinds = counts["jobs_by_kind"]
                settled = [kinds.get(k, {}).get("done", 0) + kinds.get(k, {}).get("failed", 0)
                           for k in ("results", "forward")]
                if settled == [1, 1] or counts["jobs"]["failed"]:
                    break
                time.sleep(0.5)
            assert kinds.get("results") == {"done": 1} and kinds.get("forward") == {"done": 1}, counts
        finally:
            assert stop_node(node) == 0

        engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
        with engine.connect() as conn:
            study_uid = conn.execute(text("SELECT study_instance_uid FROM studies")).scalar_one()
            regions = conn.execute(text("SELECT region, first_position, last_position FROM region_ranges "
                                        "ORDER BY ordinal")).all()
            positions = dict(conn.execute(text(
                "SELECT r.position, i.sop_instance_uid FROM slice_results r "
                "JOIN instances i ON i.id = r.instance_fk")).all())
        engine.dispose()
        liver = [(a, b) for region, a, b in regions if region == "liver"]
        assert liver and not [r for r in regions if r[0] == "legs"], regions
        wanted = {uid for p, uid in positions.items() if any(a - MARGIN <= p <= b + MARGIN for a, b in liver)}
        assert received_sops(cad_dir) == sorted(wanted)
        assert len(wanted) < len(positions)

        found = [f for f in pacs.rest("POST", "/tools/lookup", raw=study_uid.encode()) if f["Type"] == "Study"]
        assert len(found) == 1
        modalities = sorted(pacs.rest("GET", f"/series/{s}")["MainDicomTags"]["Modality"]
                            for s in pacs.rest("GET", f"/studies/{found[0]['ID']}")["Series"])
        assert modalities == ["KO"] * len({r[0] for r in regions}) + ["SR"]
    assert "Traceback" not in (tmp_path / "node.log").read_text()
