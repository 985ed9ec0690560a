"""The whole way through, with real peers: a PACS sends a CT series (DCMTK storescu), the node's worker
classifies it with the shipped model, a CAD peer queries the liver slices (DCMTK findscu) and pulls exactly
those (DCMTK movescu to a pynetdicom storage SCP)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import create_engine, text

from conftest import SHARED_DATA, dcmtk, free_port, stop_node, wait_for_echo
from dicomnode.classification.model import checkpoint_path

SERIES = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"  # neck, lungs, lungs|liver; 30 slices

pytestmark = [
    pytest.mark.skipif(not SERIES.exists(), reason="needs ../shared/data"),
    pytest.mark.skipif(not checkpoint_path(None).exists(), reason="no shipped default model in dicomnode/classification/model/default"),
]


def status(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def findscu_values(port: int, keys: list[str], keyword: str) -> list[str]:
    """Run DCMTK findscu and collect the values of ``keyword`` from its printed responses."""
    args = [dcmtk("findscu"), "-S", "-aec", "DICOMNODE"]
    for key in keys:
        args += ["-k", key]
    out = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    values = re.findall(rf"\) \w\w \[([^\]]*)\][^\n]*# *\d+, *\d+ {keyword}\b", out.stdout + out.stderr)
    return [v.strip() for v in values]


def series_labels() -> dict[str, set[str]]:
    """SOPInstanceUID -> labelled classes of the slices of ``SERIES`` in ct/labels.csv."""
    import csv

    import pydicom

    folder = SHARED_DATA / "ct"
    with open(folder / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if (folder / r["path"]).parent == SERIES]
    return {str(pydicom.dcmread(folder / r["path"], stop_before_pixels=True).SOPInstanceUID): set(r["region"].split("|"))
            for r in rows}


def instance_numbers() -> dict[str, int]:
    import pydicom

    return {str(ds.SOPInstanceUID): int(ds.InstanceNumber)
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(SERIES.glob("*.dcm")))}


def test_store_classify_find_and_move_the_liver_slices(tmp_path):
    received: list[str] = []
    viewer = AE(ae_title="VIEWER")
    viewer.supported_contexts = AllStoragePresentationContexts

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    viewer_port, port = free_port(), free_port()
    scp = viewer.start_server(("127.0.0.1", viewer_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    config = tmp_path / "node.yaml"
    config.write_text(f"""
data_dir: {tmp_path / 'data'}
port: {port}
stable_age_s: 1
qr:
  move_destinations:
    - {{ae_title: VIEWER, host: 127.0.0.1, port: {viewer_port}}}
  allowed_peers:  # Q/R is answered only for listed peers
    - {{ae_title: FINDSCU, host: 127.0.0.1}}
    - {{ae_title: CAD, host: 127.0.0.1}}
worker:
  poll_interval_s: 0.2
""")
    log = open(tmp_path / "node.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_echo(port)
        sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(SERIES)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            counts = status(config)
            if counts["series_by_classification"].get("done") == 1 or counts["jobs"]["failed"]:
                break
            time.sleep(0.5)
        assert counts["series_by_classification"] == {"done": 1}, counts

        engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
        with engine.connect() as conn:
            series_uid, body_parts = conn.execute(text("SELECT series_instance_uid, body_parts FROM series")).one()
            liver_in_index = set(conn.execute(text(
                "SELECT i.sop_instance_uid FROM instances i JOIN slice_results r ON r.instance_fk = i.id "
                "WHERE r.body_parts LIKE '%LIVER%'")).scalars())
            ranges = conn.execute(text("SELECT region FROM region_ranges ORDER BY ordinal")).scalars().all()
        engine.dispose()
        # The labels of this series (ct/labels.csv): neck on the top slice, neck|lungs on the next, lungs,
        # then lungs|liver on the last ten (the liver dome under the lung bases). Whether the decoder opens
        # a neck range for one or two slices at the edge is the model's call (the model card gives the
        # whole-series error on ct/); the order and the liver slices a CAD system asks for are checked here.
        assert ranges in (["neck", "lungs", "liver"], ["lungs", "liver"]), ranges
        assert body_parts.split("\\") == [{"neck": "NECK", "lungs": "LUNG", "liver": "LIVER"}[r] for r in ranges]
        labels = series_labels()
        liver_labelled = {uid for uid, region in labels.items() if "liver" in region}
        far_from_liver = {uid for uid, number in instance_numbers().items() if number <= 12}
        assert len(liver_labelled) == 10 and len(far_from_liver) == 12
        assert liver_labelled <= liver_in_index and not liver_in_index & far_from_liver

        # SERIES level: the series is found by one of its regions, and not by a region it lacks.
        assert findscu_values(port, ["QueryRetrieveLevel=SERIES", "BodyPartExamined=LIVER", "SeriesInstanceUID"],
                              "SeriesInstanceUID") == [series_uid]
        assert findscu_values(port, ["QueryRetrieveLevel=SERIES", "BodyPartExamined=LEG", "SeriesInstanceUID"],
                              "SeriesInstanceUID") == []
        # IMAGE level: exactly the slices the worker tagged as liver.
        liver_found = findscu_values(port, ["QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={series_uid}",
                                            "BodyPartExamined=LIVER", "SOPInstanceUID"], "SOPInstanceUID")
        assert set(liver_found) == liver_in_index and len(liver_found) == len(liver_in_index)

        moved = subprocess.run([dcmtk("movescu"), "-S", "-aet", "CAD", "-aem", "VIEWER", "-aec", "DICOMNODE",
                                "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SeriesInstanceUID={series_uid}",
                                "-k", "BodyPartExamined=LIVER", "127.0.0.1", str(port)],
                               capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stderr
        assert sorted(received) == sorted(liver_in_index)
    finally:
        try:
            assert stop_node(node) == 0
        finally:
            scp.shutdown()
    assert "Traceback" not in (tmp_path / "node.log").read_text()
