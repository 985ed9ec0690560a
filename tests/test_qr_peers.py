"""Retrieving peers other than DCMTK and pynetdicom: Orthanc (REST /modalities/<node>/query and
/queries/<id>/retrieve), GDCM's gdcmscu (C-MOVE to its own SCP) and odil (C-GET)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from io import BytesIO

import numpy as np
import pydicom
import pytest

import qr_data
from conftest import free_port
from dicomnode.config import RemoteAE
from tests.orthanc import orthanc_server
from test_qr_retrieve import _store_extra, _stored_path


@pytest.fixture
def node(running_node):
    return running_node, qr_data.populate(running_node)


def test_orthanc_finds_a_region_and_retrieves_it_and_a_big_endian_instance(node, tmp_path):
    """Orthanc asks the node (IMAGE-level C-FIND by BodyPartExamined), then retrieves each answer (C-MOVE
    by its unique keys) to itself; then a series holding a big endian and a deflated instance."""
    ctx, st = node
    extra = _store_extra(ctx, tmp_path)
    node_port = ctx.config.port
    with orthanc_server(tmp_path / "orthanc", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as o:
        ctx.config.qr.move_destinations.append(RemoteAE(ae_title=o.ae_title, host="127.0.0.1", port=o.dicom_port))
        query = o.rest("POST", "/modalities/node/query", {"Level": "Instance", "Query": {
            "StudyInstanceUID": st.philips_study, "SeriesInstanceUID": st.philips_series,
            "BodyPartExamined": "LIVER", "SOPInstanceUID": ""}})
        answers = o.rest("GET", f"/queries/{query['ID']}/answers?expand")
        found = {a["0008,0018"]["Value"] for a in answers}
        assert found == st.liver_sops()
        o.rest("POST", f"/queries/{query['ID']}/retrieve", {"TargetAet": o.ae_title, "Synchronous": True})
        assert o.instance_count() == len(st.liver_sops())
        query = o.rest("POST", "/modalities/node/query", {"Level": "Series", "Query": {
            "SeriesInstanceUID": extra["series"]}})
        o.rest("POST", f"/queries/{query['ID']}/retrieve", {"TargetAet": o.ae_title, "Synchronous": True})
        assert o.instance_count() == len(st.liver_sops()) + 2
        (be_id,) = o.rest("POST", "/tools/lookup", raw=extra["be"].encode())
        with urllib.request.urlopen(f"http://{o.host}:{o.http_port}/instances/{be_id['ID']}/file", timeout=30) as r:
            got = pydicom.dcmread(BytesIO(r.read()))
    assert np.array_equal(got.pixel_array, pydicom.dcmread(_stored_path(ctx, extra["be"])).pixel_array)


@pytest.mark.skipif(shutil.which("gdcmscu") is None, reason="gdcmscu (libgdcm-tools) not installed")
def test_gdcmscu_moves_a_series_to_itself(node, tmp_path):
    ctx, st = node
    port = free_port()
    ctx.config.qr.move_destinations.append(RemoteAE(ae_title="GDCMSCU", host="127.0.0.1", port=port))
    out = tmp_path / "gdcm"
    out.mkdir()
    proc = subprocess.run(["gdcmscu", "-D", "--move", "--series", "--studyroot", "--aetitle", "GDCMSCU", "--call",
                           "DICOMNODE", "--port-scp", str(port), "-o", str(out),
                           "--key", f"0020,000d={st.philips_study}", "--key", f"0020,000e={st.philips_series}",
                           "127.0.0.1", str(ctx.config.port)], capture_output=True, timeout=120)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    # gdcmscu 3.0.21 aborts ("ProtocolStream as nullptr is invalid") after it has read the final response,
    # with the node of before issue 12 too: its exit code is not the test; the final response and the files are.
    final = text[text.rindex("Response:"):]
    assert "(0000,0900) ?? (US) 0 " in final and "(US) 10 " in final, text[-3000:]
    got = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in out.rglob("*") if f.is_file()}
    assert got == set(st.philips_sops.values())


@pytest.mark.skipif(shutil.which("odil") is None, reason="odil not installed")
def test_odil_gets_a_series(node, tmp_path):
    """odil's get asks for SOPClassesInStudy first, then retrieves by the series' unique keys."""
    ctx, st = node
    out = tmp_path / "odil"
    out.mkdir()
    proc = subprocess.run(["odil", "get", "-d", str(out), "127.0.0.1", str(ctx.config.port), "ODIL", "DICOMNODE",
                           "study", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={st.philips_study}",
                           f"SeriesInstanceUID={st.philips_series}"], capture_output=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")
    got = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in out.rglob("*") if f.is_file()}
    assert got == set(st.philips_sops.values())
