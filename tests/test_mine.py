"""``dicomnode mine`` against a real Orthanc loaded over C-STORE with real CT (copies with hospital-like tags).

The PACS holds (StudyDescription / BodyPartExamined, as a hospital writes them):

- A  "CT Abdomen Liver trifásico" / ABDOMEN: 10 real slices, no KOS -> an evenly spaced sample (4), liver
- B  "LIVER CT" / LIVER: 3 slices, a KOS "Of Interest" on slice 2 and a rejection note on slice 3
     -> exactly slice 2, liver
- D  "Dr OLIVER control" / "": found by the keyword (substring) but no mapped term -> unmapped, left out
- E  "LIVER" / HEAD: a head slice -> ambiguous, left out
- F  "LIVER MRI" with Modality MR -> not a CT study, never found
- G  "TC Hígado" / "": one slice, found by ``higado`` (accent-insensitive), not by ``liver``
- H  "TÓRAX" / CHEST (from ../shared/data when present): not liver; ``torax`` finds it
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import sys
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.cli import main as cli_main
from dicomnode.config import load_config
from tests.conftest import CT_FIXTURES, SHARED_DATA, free_port
from tests.orthanc import orthanc_server
from trainer.mine import (
    EXCLUDED, MANIFEST, MANIFEST_COLUMNS, MineOptions, MiningError, assign_splits, key_images_from_kos,
    keyword_matches, keyword_wildcards, mine, parse_remote, pseudonym, sample_evenly,
)

MINER_AE = "MINER"
SECRET_IDS = ["PID-SECRET-A", "PID-SECRET-B", "PID-SECRET-D", "PID-SECRET-E", "PID-SECRET-F", "PID-SECRET-G", "PID-SECRET-H"]


# Building the PACS content ---------------------------------------------------------------------------------

def _copy_series(paths: list[Path], *, patient: str, description: str, body_part: str, date: str,
                 modality: str = "CT", charset: str = "ISO_IR 192") -> list[pydicom.Dataset]:
    """Copies of real files as one new study/series: new UIDs, hospital tags, a secret PatientID."""
    study, series = generate_uid(), generate_uid()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = patient
        ds.PatientName = f"Secret^{patient[-1]}"
        ds.StudyDescription = description
        ds.StudyDate = date
        ds.Modality = modality
        if body_part:
            ds.BodyPartExamined = body_part
        elif "BodyPartExamined" in ds:
            del ds.BodyPartExamined
        out.append(ds)
    return out


def _z(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _kos(images: list[pydicom.Dataset], referenced: list[pydicom.Dataset], title, series_uid: str,
         number: int) -> pydicom.Dataset:
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

    content = KeyObjectSelection(document_title=title, referenced_objects=referenced)
    doc = KeyObjectSelectionDocument(evidence=images, content=content, series_instance_uid=series_uid,
                                     series_number=99, sop_instance_uid=generate_uid(), instance_number=number,
                                     manufacturer="dicomnode tests")
    return doc


@pytest.fixture(autouse=True)
def _keep_root_logging():
    """The CLI's setup_logging binds a handler to the (captured) stderr: put the root logger back after."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, scp_port):
    """Orthanc with the studies of the module docstring; yields (orthanc, expectations)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    with orthanc_server(tmp_path_factory.mktemp("orthanc"), modalities={"miner": (MINER_AE, "127.0.0.1", scp_port)}) as o:
        a_files = sorted((CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k").glob("*.dcm"))
        a = _copy_series(a_files, patient="PID-SECRET-A", description="CT Abdomen Liver trifásico", body_part="ABDOMEN",
                         date="20210301")
        b = _copy_series(sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm")), patient="PID-SECRET-B",
                         description="LIVER CT", body_part="LIVER", date="20200615", charset="ISO_IR 100")
        b.sort(key=_z)
        kos_series = generate_uid()
        of_interest = _kos(b, [b[1]], codes.DCM.OfInterest, kos_series, 1)
        rejection = _kos(b, [b[2]], CodedConcept("113001", "DCM", "Rejected for Quality Reasons"), kos_series, 2)
        d = _copy_series([CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"], patient="PID-SECRET-D",
                         description="Dr OLIVER control", body_part="", date="20200901")
        e = _copy_series([CT_FIXTURES / "slices" / "cq500_head_j2k_lossy.dcm"], patient="PID-SECRET-E",
                         description="LIVER", body_part="HEAD", date="20201010")
        f = _copy_series([CT_FIXTURES / "slices" / "ctimage_rle.dcm"], patient="PID-SECRET-F",
                         description="LIVER MRI", body_part="ABDOMEN", date="20210301", modality="MR")
        g = _copy_series([CT_FIXTURES / "slices" / "ctimage_jpeg_lossless_57.dcm"], patient="PID-SECRET-G",
                         description="TC Hígado", body_part="", date="20190101", charset="ISO_IR 100")
        h: list[pydicom.Dataset] = []
        chest = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"
        if chest.is_dir():
            h = _copy_series(sorted(chest.glob("*.dcm"))[:12], patient="PID-SECRET-H", description="TÓRAX",
                             body_part="CHEST", date="20190505")
        o.store([*a, *b, of_interest, rejection, *d, *e, *f, *g, *h])
        a_sorted = sorted(a, key=_z)
        expected = {
            "A": [str(a_sorted[i].SOPInstanceUID) for i in (0, 3, 6, 9)],  # 4 evenly spaced of 10 along z
            "B": [str(b[1].SOPInstanceUID)],
            "studies": {k: str(v[0].StudyInstanceUID) for k, v in {"A": a, "B": b, "D": d, "E": e, "F": f, "G": g}.items()},
            "h_study": str(h[0].StudyInstanceUID) if h else "",
            "kos": [str(of_interest.SOPInstanceUID), str(rejection.SOPInstanceUID)],
        }
        yield o, expected


def _cfg(o, scp_port: int, **extra):
    return load_config(None, {
        "mining.pacs": vars(parse_remote(o.address)),
        "mining.move_destination": {"ae_title": MINER_AE, "host": "127.0.0.1", "port": scp_port},
        "mining.slices_per_series": 4,
        "mining.timeout_s": 20.0,
        "listener.fsync": False,
        **extra,
    })


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _no_partial_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.startswith(".incoming-")]


# Against Orthanc -------------------------------------------------------------------------------------------

def test_mine_liver_retrieves_exactly_the_key_images_and_samples(pacs, scp_port, tmp_path, caplog):
    o, expected = pacs
    out = tmp_path / "dataset"
    caplog.set_level("DEBUG", logger="trainer")
    caplog.set_level("DEBUG", logger="dicomnode")
    cfg = _cfg(o, scp_port, **{"mining.max_concurrent_moves": 2})
    result = mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False, seed=3))

    rows = _rows(out)
    assert list(rows[0].keys()) == MANIFEST_COLUMNS
    got = {r["sop_instance_uid"] for r in rows}
    assert got == set(expected["A"]) | set(expected["B"])
    assert len(rows) == 5
    assert {r["region"] for r in rows} == {"liver"}
    studies = expected["studies"]
    assert {r["study"] for r in rows} == {studies["A"], studies["B"]}
    for r in rows:
        path = out / r["path"]
        assert path.is_file()
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == r["sop_instance_uid"]
        assert r["query"] == "liver"
        assert r["z_mm"] != ""
        assert r["source"] == f"PACS {o.address}"
    b_rows = [r for r in rows if r["study"] == studies["B"]]
    assert "key images" in b_rows[0]["label_method"]
    a_rows = [r for r in rows if r["study"] == studies["A"]]
    assert all("4 of 10" in r["label_method"] for r in a_rows)
    assert "liver->liver" in a_rows[0]["note"] and "abdomen->within:liver|pelvis" in a_rows[0]["note"]

    # Patient-level split, pseudonymous patients: 2 patients -> one in val, one in train.
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert len(by_patient) == 2 and all(len(s) == 1 for s in by_patient.values())
    assert sorted(s.pop() for s in by_patient.values()) == ["train", "val"]

    # Left out and reported, never guessed; the MR study and the chest study are not found.
    with open(out / EXCLUDED, newline="", encoding="utf-8") as fh:
        excluded = {r["study"]: r["status"] for r in csv.DictReader(fh)}
    assert excluded == {studies["D"]: "unmapped", studies["E"]: "ambiguous"}
    assert studies["F"] not in excluded and result.studies == 4  # A, B, D, E

    # The KOS documents were retrieved (to read them) and kept apart from the images.
    assert sorted(p.stem for p in (out / "kos").rglob("*.dcm")) == sorted(expected["kos"])
    assert not (out / "images" / studies["D"]).exists() and not (out / "images" / studies["E"]).exists()

    # No patient identifier in logs or manifest.
    manifest_text = (out / MANIFEST).read_text(encoding="utf-8") + (out / EXCLUDED).read_text(encoding="utf-8")
    for secret in SECRET_IDS + ["Secret^"]:
        assert secret not in caplog.text
        assert secret not in manifest_text
    assert _no_partial_files(out)


def test_mine_resumes_after_an_interruption(pacs, scp_port, tmp_path):
    o, expected = pacs
    out = tmp_path / "dataset"
    cfg = _cfg(o, scp_port)

    def interrupt(study_uid: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False, on_study_done=interrupt))
    first = _rows(out)
    # Studies are taken by date: B (2020) first. Its rows are whole and on disk.
    assert {r["sop_instance_uid"] for r in first} == set(expected["B"])
    inodes = {r["sop_instance_uid"]: (out / r["path"]).stat().st_ino for r in first}
    assert _no_partial_files(out)

    # The rerun is the command a user types, as a process, with no config file (so 10 slices per series).
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "mine", "--pacs", o.address, "--move-dest",
                           f"{MINER_AE}@127.0.0.1:{scp_port}", "--keywords", "liver", "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "retrieved 10 new instance(s); 1 already in the manifest" in proc.stdout
    assert "10/10" in proc.stderr  # the progress bar counted only what was fetched
    rows = _rows(out)
    assert len(rows) == 11 and {r["sop_instance_uid"] for r in rows} >= set(expected["A"]) | set(expected["B"])
    for r in first:  # not fetched again: the very same files
        assert (out / r["path"]).stat().st_ino == inodes[r["sop_instance_uid"]]
    # Same pseudonyms across runs (the salt is kept in the dataset folder).
    assert {r["patient"] for r in rows if r["study"] == expected["studies"]["B"]} == {first[0]["patient"]}


def test_mine_with_c_get(pacs, scp_port, tmp_path):
    o, expected = pacs
    out = tmp_path / "dataset"
    cfg = _cfg(o, scp_port, **{"mining.use_c_get": True})
    mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
    assert {r["sop_instance_uid"] for r in _rows(out)} == set(expected["A"]) | set(expected["B"])


def test_dry_run_transfers_nothing_and_finds_accented_studies(pacs, scp_port, tmp_path, capsys):
    o, expected = pacs
    out = tmp_path / "dataset"
    before = o.instance_count()
    rc = cli_main(["mine", "--pacs", o.address, "--move-dest", f"{MINER_AE}@127.0.0.1:{scp_port}",
                   "--keywords", "liver", "--keywords", "higado", "--keywords", "torax", "--out", str(out), "--dry-run", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert not out.exists()
    assert o.instance_count() == before
    assert expected["studies"]["A"] in printed and expected["studies"]["B"] in printed
    assert "unmapped" in printed and "ambiguous" in printed
    assert f"liver   study {expected['studies']['G']}" in printed
    if expected["h_study"]:
        assert f"lungs   study {expected['h_study']}" in printed
    for secret in SECRET_IDS:
        assert secret not in printed


def test_date_windows_split_when_the_pacs_caps_answers(pacs, scp_port, tmp_path):
    o, expected = pacs
    capped = mine(_cfg(o, scp_port, **{"mining.max_results_per_query": 2}),
                  MineOptions(keywords=["liver"], out_dir=tmp_path / "a", dry_run=True, progress=False,
                              since=dt.date(2020, 1, 1), until=dt.date(2021, 12, 31)))
    plain = mine(_cfg(o, scp_port), MineOptions(keywords=["liver"], out_dir=tmp_path / "b", dry_run=True,
                                                progress=False, since=dt.date(2020, 1, 1), until=dt.date(2021, 12, 31)))
    assert capped.studies == plain.studies == 4
    assert {h.study_uid for h, _ in capped.planned} == {h.study_uid for h, _ in plain.planned}
    assert not capped.warnings
    only_2021 = mine(_cfg(o, scp_port), MineOptions(keywords=["liver"], out_dir=tmp_path / "c", dry_run=True,
                                                    progress=False, since=dt.date(2021, 1, 1)))
    assert {h.study_uid for h, _ in only_2021.planned} == {expected["studies"]["A"]}


def _seed_manifest(pacs, scp_port, out: Path) -> bytes:
    o, _ = pacs
    mine(_cfg(o, scp_port), MineOptions(keywords=["liver"], out_dir=out, progress=False))
    return (out / MANIFEST).read_bytes()


@pytest.fixture(scope="module")
def seeded(pacs, scp_port, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded") / "dataset"
    return out, _seed_manifest(pacs, scp_port, out)


def _assert_untouched(out: Path, manifest: bytes) -> None:
    assert (out / MANIFEST).read_bytes() == manifest
    assert _no_partial_files(out)


def test_wrong_pacs_ae_title_is_a_clear_error_and_keeps_the_manifest(pacs, scp_port, seeded, capsys):
    o, _ = pacs
    out, manifest = seeded
    rc = cli_main(["mine", "--pacs", f"NOTORTHANC@127.0.0.1:{o.dicom_port}", "--move-dest",
                   f"{MINER_AE}@127.0.0.1:{scp_port}", "--keywords", "neck", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rejected" in err and "NOTORTHANC" in err and f"register our AE title '{MINER_AE}'" in err
    _assert_untouched(out, manifest)


def test_unregistered_ae_is_told_to_register(pacs, seeded):
    o, _ = pacs
    out, manifest = seeded
    cfg = load_config(None, {"mining.pacs": vars(parse_remote(o.address)),
                             "mining.move_destination": {"ae_title": "STRANGER", "host": "127.0.0.1",
                                                         "port": free_port()},
                             "mining.timeout_s": 20.0})
    with pytest.raises(MiningError, match="register it on the PACS") as info:
        mine(cfg, MineOptions(keywords=["neck"], out_dir=out, progress=False))
    assert "STRANGER" in str(info.value)
    _assert_untouched(out, manifest)


def test_unreachable_move_destination_fails_clearly(pacs, scp_port, seeded):
    """Orthanc has MINER at scp_port, but our SCP listens on another port (a stale PACS entry)."""
    o, expected = pacs
    out, manifest = seeded
    with pytest.raises(MiningError, match="nothing arrived") as info:
        mine(_cfg(o, scp_port, **{"mining.move_destination.port": free_port()}),
             MineOptions(keywords=["liver"], out_dir=out / "new", progress=False))
    assert "C-MOVE" in str(info.value) and f"'{MINER_AE}'" in str(info.value)
    assert not (out / "new" / MANIFEST).exists()
    _assert_untouched(out, manifest)


def _node_cfg(o, node_ctx, storage_dir: Path):
    node = node_ctx.config
    return load_config(None, {
        "ae_title": node.ae_title, "port": node.port, "storage_dir": str(storage_dir),
        "mining.pacs": vars(parse_remote(o.address)), "mining.timeout_s": 20.0, "listener.fsync": False,
    })


def test_c_move_to_the_running_node(pacs, running_node, tmp_path):
    """The node answers at the move destination: C-MOVE delivers to its storage and the miner copies from it."""
    o, expected = pacs
    node = running_node.config
    o.add_modality("node", node.ae_title, "127.0.0.1", node.port)
    try:
        out = tmp_path / "dataset"
        mine(_node_cfg(o, running_node, node.resolved_storage_dir),
             MineOptions(keywords=["higado"], out_dir=out, progress=False))
        rows = _rows(out)
        assert [r["study"] for r in rows] == [expected["studies"]["G"]]
        assert (node.resolved_storage_dir / rows[0]["path"].split("/", 1)[1]).is_file()
        assert (out / rows[0]["path"]).is_file()

        # A node that stores elsewhere than this config says: success reported, no file here -> failure.
        with pytest.raises(MiningError, match=r"reported status 0x0000 .* but no file arrived at the node's storage"):
            mine(_node_cfg(o, running_node, tmp_path / "elsewhere"),
                 MineOptions(keywords=["higado"], out_dir=tmp_path / "other", progress=False))
        assert not (tmp_path / "other" / MANIFEST).exists()
    finally:
        o.remove_modality("node")


DCMQRSCP_CONFIG = """\
NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16

HostTable BEGIN
other = (OTHER, 127.0.0.1, 9)
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
DCMQRSCP {db} RW (100, 64mb) ANY
AETable END
"""


@pytest.fixture
def dcmqrscp(tmp_path):
    """DCMTK's dcmqrscp, a Q/R SCP that knows no move destination but OTHER (it answers 0xA801)."""
    import subprocess

    from tests.conftest import dcmtk, wait_for_echo

    exe = dcmtk("dcmqrscp")
    port = free_port()
    (tmp_path / "db").mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(DCMQRSCP_CONFIG.format(port=port, db=tmp_path / "db"))
    with open(tmp_path / "dcmqrscp.log", "ab") as log:
        process = subprocess.Popen([exe, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, called="DCMQRSCP")
        yield "DCMQRSCP", port
    finally:
        process.terminate()
        process.wait(10)


def test_move_destination_unknown_0xA801_says_register_our_ae(dcmqrscp, seeded, scp_port):
    from tests.orthanc import c_store

    out, manifest = seeded
    ae_title, port = dcmqrscp
    c_store("127.0.0.1", port, ae_title, _copy_series([CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"],
                                                      patient="PID-SECRET-X", description="CT LIVER",
                                                      body_part="LIVER", date="20200101"))
    cfg = load_config(None, {"mining.pacs": {"ae_title": ae_title, "host": "127.0.0.1", "port": port},
                             "mining.move_destination": {"ae_title": MINER_AE, "host": "127.0.0.1", "port": scp_port},
                             "mining.timeout_s": 20.0})
    with pytest.raises(MiningError, match="0xA801") as info:
        mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
    assert f"register our AE title '{MINER_AE}'" in str(info.value)
    _assert_untouched(out, manifest)


def test_pacs_that_never_answers_times_out_clearly(seeded):
    out, manifest = seeded
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections complete in the backlog; nobody ever answers them
    try:
        port = silent.getsockname()[1]
        cfg = load_config(None, {"mining.pacs": {"ae_title": "SILENT", "host": "127.0.0.1", "port": port},
                                 "mining.timeout_s": 1.0})
        with pytest.raises(MiningError, match=r"did not accept an association .* within 1 s"):
            mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
    finally:
        silent.close()
    _assert_untouched(out, manifest)


def test_refused_connection_is_a_clear_error(seeded):
    out, manifest = seeded
    cfg = load_config(None, {"mining.pacs": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}})
    with pytest.raises(MiningError, match="connection refused"):
        mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
    _assert_untouched(out, manifest)


# Pure functions --------------------------------------------------------------------------------------------

def test_mining_config_is_validated():
    from dicomnode.config import ConfigError

    with pytest.raises(ConfigError, match="mining.pacs.ae_title"):
        load_config(None, {"mining.pacs": {"ae_title": "BAD\\AE", "host": "h", "port": 104}})
    with pytest.raises(ConfigError, match="mining.slices_per_series"):
        load_config(None, {"mining.slices_per_series": 0})


def test_keyword_wildcards_and_matching():
    assert keyword_wildcards("torax") == ["*t*r*x*", "*T*R*X*", "*T*r*x*"]
    assert keyword_wildcards("lung*") == ["*l*ng*", "*L*NG*", "*L*ng*"]
    assert keyword_wildcards("aio") == ["*"]
    assert keyword_matches("torax", "CT TÓRAX C/C")
    assert keyword_matches("lung*", "Lungs low dose")
    assert keyword_matches("higado", "Hígado")
    assert not keyword_matches("liver", "CT Hígado")
    assert keyword_matches("liv?r", "CT LIVER")


def test_sample_evenly():
    assert sample_evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert sample_evenly(list(range(3)), 10) == [0, 1, 2]
    assert sample_evenly(list(range(5)), 1) == [2]
    assert sample_evenly([], 3) == []


def test_split_is_patient_level_and_deterministic():
    patients = [f"p{i}" for i in range(10)]
    a, b = assign_splits(patients, 7), assign_splits(list(reversed(patients)), 7)
    assert a == b
    assert sum(v == "val" for v in a.values()) == 2
    assert assign_splits(patients, 8) != a or assign_splits(patients, 9) != a


def test_pseudonym_hides_the_patient_id():
    p = pseudonym("PID-SECRET-A", "salt")
    assert p == pseudonym("PID-SECRET-A", "salt") and p != pseudonym("PID-SECRET-A", "other")
    assert "SECRET" not in p and p.startswith("p") and len(p) == 17
    assert pseudonym("", "salt", "1.2.3") != pseudonym("", "salt", "1.2.4")


def test_key_images_from_kos_skips_rejections_and_other_titles():
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    images = _copy_series(sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm")), patient="X",
                          description="LIVER", body_part="LIVER", date="20200101")
    series = generate_uid()
    docs = [
        _kos(images, images[:2], codes.DCM.OfInterest, series, 1),
        _kos(images, [images[1]], CodedConcept("113001", "DCM", "Rejected for Quality Reasons"), series, 2),
        _kos(images, [images[2]], CodedConcept("113004", "DCM", "For Teaching"), series, 3),
    ]
    keys = key_images_from_kos(docs)
    assert keys.of_interest == {str(images[0].SeriesInstanceUID): [str(images[0].SOPInstanceUID)]}
    assert keys.rejected == {str(images[1].SOPInstanceUID)}
    assert keys.documents == 3 and len(keys.skipped) == 1


def test_parse_remote_errors_name_the_option():
    assert vars(parse_remote("ORTHANC@10.0.0.5:4242")) == {"ae_title": "ORTHANC", "host": "10.0.0.5", "port": 4242}
    with pytest.raises(ValueError, match="--move-dest"):
        parse_remote("ORTHANC:4242", "--move-dest")
    with pytest.raises(ValueError, match="not a valid AE title"):
        parse_remote("A\\B@h:1")


def test_partial_retrieval_keeps_what_arrived_and_fetches_the_rest_later(tmp_path, scp_port):
    """A PACS that lost one file (index entry, no file): the C-MOVE delivers part of the series (Orthanc
    stops at the lost file); the manifest holds what arrived, and once the PACS has the file again a rerun
    fetches only the rest."""
    files = sorted((CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k").glob("*.dcm"))
    series = sorted(_copy_series(files, patient="PID-SECRET-P", description="CT LIVER", body_part="LIVER",
                                 date="20220202"), key=_z)
    port = free_port()
    with orthanc_server(tmp_path / "orthanc", modalities={"miner": (MINER_AE, "127.0.0.1", port)},
                        extra_config={"StorageAccessOnFind": "Never", "MaximumStorageCacheSize": 0}) as o:
        o.store(series)
        cfg = _cfg(o, port)
        plan = mine(cfg, MineOptions(keywords=["liver"], out_dir=tmp_path / "plan", dry_run=True, progress=False))
        (planned,) = [p.sop_uids for _, p in plan.planned]
        assert len(planned) == 4
        lost = planned[1]
        (found,) = o.rest("POST", "/tools/lookup", raw=lost.encode())
        uuid = o.rest("GET", f"/instances/{found['ID']}/attachments/dicom/info")["Uuid"]
        (o.workdir / "storage" / uuid[:2] / uuid[2:4] / uuid).unlink()

        out = tmp_path / "dataset"
        result = mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
        first = {r["sop_instance_uid"] for r in _rows(out)}
        assert first and first < set(planned) - {lost}
        assert any(f"partial retrieval: {len(first)} of 4" in w for w in result.warnings)
        assert _no_partial_files(out)

        o.store([ds for ds in series if str(ds.SOPInstanceUID) == lost])
        again = mine(cfg, MineOptions(keywords=["liver"], out_dir=out, progress=False))
        assert {r["sop_instance_uid"] for r in _rows(out)} == set(planned)
        assert again.already_present == len(first) and again.retrieved == 4 - len(first)


def test_the_miners_storage_scp_checks_the_request_uids_like_the_node(tmp_path):
    """The miner's C-STORE handler refuses a dataset whose SOP Instance / Class UID is not the request's
    (0xA900), as the node's does, and writes nothing; the matching request is stored."""
    import threading

    from dicomnode.dicom_status import DATASET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS
    from trainer.pacs import _store_status

    path = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"
    encoded = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uid, cls = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    expected, received, lock = {uid}, set(), threading.Lock()
    out = tmp_path / "dataset"
    assert _store_status(encoded, out, expected, received, lock, False, cls, generate_uid()) == \
        DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert _store_status(encoded, out, expected, received, lock, False, "1.2.840.10008.5.1.4.1.1.7", uid) == \
        DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert not out.exists() and not received
    assert _store_status(encoded, out, expected, received, lock, False, cls, uid) == SUCCESS
    assert received == {uid} and len(list(out.rglob("*.dcm"))) == 1
