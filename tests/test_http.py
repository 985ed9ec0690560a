"""The administrator's page, JSON API, /metrics and /healthz of a real node (``dicomnode serve`` as a process):
a real CT series sent with DCMTK ``storescu`` and classified by the node's worker with the shipped model,
the page loaded in headless Chromium (DOM and screenshot checked), /metrics scraped before and after,
refused associations from real pynetdicom peers, the token, and an unknown series."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import SHARED_DATA, dcmtk, free_port, stop_node, wait_for, wait_for_echo
from dicomnode.classification.model import checkpoint_path

SERIES = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"  # neck, lungs, lungs|liver; 30 slices
PATIENT = "Lung_Dx-A0002"  # PatientName and PatientID of SERIES
TOKEN = "s3cret-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SERIES.exists(), reason="needs ../shared/data"),
    pytest.mark.skipif(not checkpoint_path(None).exists(), reason="no shipped default model"),
]


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes, Any]:
    """GET ``url``; returns (status, body, headers) for every status, 4xx/5xx included."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def scrape(base: str) -> dict[str, float]:
    """The samples of /metrics as ``{'name{labels}': value}`` (parsed with prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body, headers = get(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, body[:300])
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, url],
                          capture_output=True, text=True, timeout=120)


def associate(port: int, calling: str, called: str = "DICOMNODE") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    established = assoc.is_established
    if established:
        assoc.release()
    return established


def _healthy(base: str) -> bool:
    try:
        return get(f"{base}/healthz", None)[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


@pytest.fixture
def node(tmp_path):
    """A node with the worker, two listener processes, an allow-list, the page on a free port and a token."""
    port, http_port = free_port(), free_port()
    config = tmp_path / "node.yaml"
    config.write_text(f"""
data_dir: {tmp_path / 'data'}
port: {port}
stable_age_s: 1
listener:
  processes: 2
  duplicate_policy: reject
security:
  allowed_peers:
    - {{ae_title: STORESCU, host: 127.0.0.1}}
    - {{ae_title: PROBE, host: 127.0.0.1}}
worker:
  poll_interval_s: 0.2
http:
  enabled: true
  port: {http_port}
  token: {TOKEN}
""")
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_echo(port)
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: _healthy(base), "the HTTP server answering", 60, 0.3)
        yield port, base, tmp_path
    finally:
        assert stop_node(proc) == 0
        log.close()
    text = (tmp_path / "node.log").read_text()
    assert "Traceback" not in text
    assert PATIENT not in text  # the page shows the patient; the log never names them


def test_page_metrics_and_api_after_a_real_series(node):
    port, base, tmp_path = node
    before = scrape(base)
    assert before.get("dicomnode_instances_received_total{}", 0) == 0
    assert before['dicomnode_index_instances{}'] == 0

    sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(SERIES)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert sent.returncode == 0, sent.stderr
    n_files = len([p for p in SERIES.iterdir() if p.is_file()])

    # The counters of the listener processes moved as soon as storescu had its answers.
    after = scrape(base)
    assert after["dicomnode_instances_received_total{}"] == n_files
    assert after['dicomnode_cstore_responses_total{status="0x0000"}'] == n_files
    assert after['dicomnode_index_instances{}'] == n_files
    assert after['dicomnode_associations_total{outcome="accepted",reason=""}'] >= 2  # the probe and storescu

    # Classified by the real worker: the job's metrics, the queue gauge and the latency histogram.
    done = wait_for(lambda: (lambda m: m if m.get('dicomnode_jobs_finished_total{kind="classify",outcome="done"}')
                             else None)(scrape(base)), "the classification job's metrics", 240.0, 0.3)
    assert done['dicomnode_jobs_finished_total{kind="classify",outcome="done"}'] == 1
    assert done['dicomnode_queue_jobs{kind="classify",state="done"}'] == 1
    assert done['dicomnode_queue_jobs{kind="classify",state="queued"}'] == 0
    assert done["dicomnode_classification_duration_seconds_count{}"] == 1
    assert done["dicomnode_last_slice_to_result_seconds_count{}"] == 1
    assert done["dicomnode_last_slice_to_result_seconds_sum{}"] >= 1.0  # at least StableAge (1 s) after the last slice
    assert done['dicomnode_index_series{classification_state="done"}'] == 1

    # The JSON API behind the page.
    status, body, _ = get(f"{base}/api/overview")
    assert status == 200
    overview = json.loads(body)
    (study,) = overview["studies"]
    (series,) = study["series"]
    uid = series["series_instance_uid"]
    assert series["classification_state"] == "done" and series["n_instances"] == n_files
    names = [r["region"] for r in series["regions"]]
    assert names in (["neck", "lungs", "liver"], ["lungs", "liver"]), names  # the top neck slice: the model's call
    assert overview["summary"]["queue"]["classify"]["done"] == 1
    status, body, _ = get(f"{base}/api/series/{uid}")
    detail = json.loads(body)
    assert status == 200 and len(detail["slices"]) == n_files
    assert [r["region"] for r in detail["regions"]] == names
    assert abs(sum(detail["slices"][0]["probabilities"].values()) - 1) < 1e-3

    # The profile picture: a PNG of classify --plot's size (1000 x 700).
    status, png, headers = get(f"{base}/series/{uid}/profile.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (1000, 700)

    # A refused C-STORE (a duplicate, listener.duplicate_policy: reject): counted by status and listed.
    duplicate = sorted(p for p in SERIES.iterdir() if p.is_file())[0]
    subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), str(duplicate)],
                   capture_output=True, text=True, timeout=120)
    assert scrape(base)['dicomnode_cstore_responses_total{status="0xC230"}'] == 1
    import pydicom

    duplicate_uid = str(pydicom.dcmread(duplicate, stop_before_pixels=True).SOPInstanceUID)

    # Refused associations: calling AE not allowed (our check), called AE title wrong (pynetdicom's).
    assert not associate(port, "INTRUDER")
    assert not associate(port, "PROBE", called="SOMEONEELSE")
    # (pynetdicom signals its own rejection after sending it: wait for the count rather than race it)
    key = 'dicomnode_associations_total{outcome="rejected",reason="called_ae_title_not_recognised"}'
    refused = wait_for(lambda: (lambda m: m if key in m else None)(scrape(base)), "the rejection's count", 60, 0.3)
    assert refused[key] == 1
    assert refused['dicomnode_associations_total{outcome="rejected",reason="calling_ae_title_not_allowed"}'] == 1
    events = json.loads(get(f"{base}/api/events")[1])["events"]
    assert {(e["calling_ae_title"], e["reason"]) for e in events if e["kind"] == "association_rejected"} == {
        ("INTRUDER", "calling_ae_title_not_allowed"), ("PROBE", "called_ae_title_not_recognised")}

    # The page in a real browser: the overview lists the series with its ranges and the refused peers;
    # the series page shows the region ranges and the profile picture.
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    dom = chromium(tmp_path, f"{base}/?token={TOKEN}", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-series-uid="{uid}"' in dom.stdout
    assert PATIENT in dom.stdout
    assert re.search(rf"<td>0xC230 duplicate refused</td>\s*<td>STORESCU at 127\.0\.0\.1</td>"
                     rf'<td class="uid">{re.escape(duplicate_uid)}</td>', dom.stdout)
    assert re.search(r'class="region r-liver">liver \d+–\d+<', dom.stdout)
    assert re.search(r"<td>INTRUDER</td><td>127\.0\.0\.1</td>\s*<td>calling AE title \(or its host\) not in "
                     r"security\.allowed_peers</td>", dom.stdout)
    queue_row = re.search(r"<tr><td>classify</td>((?:<td class=\"num\">\d+</td>)+)</tr>", dom.stdout)
    assert queue_row, "no queue row for classification jobs"
    from dicomnode.http.collectors import JOB_STATES

    assert dict(zip(JOB_STATES, map(int, re.findall(r"\d+", queue_row.group(1)))))["done"] == 1

    dom = chromium(tmp_path, f"{base}/series/{uid}?token={TOKEN}", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'<td class="uid" id="series-uid">{uid}</td>' in dom.stdout
    assert len(re.findall(r'<tr class="range">', dom.stdout)) == len(names)
    assert re.search(r'<img id="profile" src="/series/[0-9.]+/profile\.png"', dom.stdout)

    shot = tmp_path / "series-page.png"
    out = chromium(tmp_path, f"{base}/series/{uid}?token={TOKEN}", f"--screenshot={shot}", "--window-size=1100,1300")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    if os.environ.get("DICOMNODE_TEST_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(shot, Path(os.environ["DICOMNODE_TEST_SCREENSHOT_DIR"]) / "series-page.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1100, 1300)
    # The picture was loaded and drawn: its coronal reformat is a large area of grey pixels (text and tables
    # have only a few anti-aliased ones), and its probability curves are in matplotlib's colours.
    import numpy as np

    rgb = np.asarray(image).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = int(((r == g) & (g == b) & (r > 20) & (r < 200)).sum())
    assert grey > 50_000, grey
    tab_red = int(((abs(r - 214) < 12) & (abs(g - 39) < 12) & (abs(b - 40) < 12)).sum())
    assert tab_red > 300, tab_red
    if os.environ.get("DICOMNODE_TEST_SCREENSHOT_DIR"):
        chromium(tmp_path, f"{base}/?token={TOKEN}", "--screenshot=" + os.path.join(
            os.environ["DICOMNODE_TEST_SCREENSHOT_DIR"], "overview.png"), "--window-size=1300,900")


def test_token_health_and_unknown_series(node):
    port, base, tmp_path = node
    # Without the token (or with a wrong one): 401 everywhere but /healthz.
    for path in ("/", "/api/overview", "/metrics", "/series/1.2.3/profile.png"):
        status, body, headers = get(f"{base}{path}", None)
        assert status == 401, (path, status)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert b"token" in body
    assert get(f"{base}/metrics", "wrong")[0] == 401
    status, body, _ = get(f"{base}/healthz", None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    # ?token= works too, and sets a cookie that the page's links and picture then use.
    status, body, headers = get(f"{base}/?token={TOKEN}", None)
    assert status == 200 and "dicomnode_token=" in headers.get("Set-Cookie", "")

    # An unknown series: 404 naming it, as JSON under /api and as a page elsewhere.
    status, body, headers = get(f"{base}/api/series/1.2.826.0.1.999")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "no series with SeriesInstanceUID '1.2.826.0.1.999' in the index"
    status, body, headers = get(f"{base}/series/1.2.826.0.1.999")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert b"no series with SeriesInstanceUID &#39;1.2.826.0.1.999&#39; in the index" in body
    assert get(f"{base}/series/1.2.826.0.1.999/profile.png")[0] == 404
    status, body, _ = get(f"{base}/api/studies?limit=many")
    assert status == 400 and b"limit must be a whole number" in body
    assert get(f"{base}/no/such/page")[0] == 404
