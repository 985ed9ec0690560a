"""C-FIND latency against the size of the index: synthetic rows, real SQL, the node's own find().

Fills a fresh index (Alembic head, so the Q/R indexes of migration 0002 are there) with synthetic
patients / studies / series / instances / slice results / region ranges using bulk core inserts, then
times typical queries through :func:`dicomnode.qr.find.find` (matching, SQL, computed keys and
building every response dataset; no network). Each query runs ``--repeat`` times; the median and the
worst are printed, with the number of responses.

    nice -n 10 python bench/query.py --sizes 10000 100000 1000000 [--db-dir /tmp/qrbench] [--repeat 7] [--network]

``--network`` also times each query end to end over DICOM: the node's listener is started in this
process on a free loopback port and a pynetdicom SCU sends the C-FIND (one association, reused) and
reads every response.

Shape of the synthetic archive: 2 series of 100 instances per study (one CT classified with a
contiguous run of regions, one CT/MR/PT not classified), 1.25 studies per patient, study dates over
10 years, descriptions from a small vocabulary. Nothing here is real patient data; no file is written
besides the SQLite index.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import insert

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.db.models import Instance, Patient, RegionRange, Series, SliceResult, Study  # noqa: E402
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade  # noqa: E402
from dicomnode.qr.find import find  # noqa: E402

SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 100
DESCRIPTIONS = ["CT THORAX", "CT ABDOMEN", "CT THORAX ABDOMEN PELVIS", "CT NECK", "CT LEGS ANGIO", "Tórax",
                "CT HEAD", "PET-CT WHOLE BODY"]
REGIONS = ["NECK", "LUNG", "LIVER", "PELVIS", "LEG"]
CT = "1.2.840.10008.5.1.4.1.1.2"
BATCH = 50_000


def _uid(kind: int, n: int) -> str:
    return f"2.25.9{kind}{n:010d}"


def fill(url: str, n_instances: int, seed: int = 7) -> dict[str, object]:
    """Create the schema at ``url`` and insert about ``n_instances`` instances; returns sample keys."""
    upgrade(url, backup=False)
    engine = make_engine(url)
    rng = random.Random(seed)
    n_studies = max(1, n_instances // (SERIES_PER_STUDY * INSTANCES_PER_SERIES))
    rows: dict[str, list[dict]] = {"patients": [], "studies": [], "series": [], "instances": [], "slice_results": [],
                                   "region_ranges": []}
    tables = {"patients": Patient.__table__, "studies": Study.__table__, "series": Series.__table__,
              "instances": Instance.__table__, "slice_results": SliceResult.__table__,
              "region_ranges": RegionRange.__table__}
    order = ["patients", "studies", "series", "instances", "slice_results", "region_ranges"]
    sample: dict[str, object] = {}

    def flush(conn, force: bool = False) -> None:
        if force or sum(len(v) for v in rows.values()) >= BATCH:
            for name in order:
                if rows[name]:
                    conn.execute(insert(tables[name]), rows[name])
                    rows[name].clear()

    n_patients = max(1, int(n_studies / 1.25))
    instance_id = series_id = range_id = 0
    with engine.begin() as conn:
        for p in range(1, n_patients + 1):
            rows["patients"].append({"id": p, "patient_id": f"P{p:08d}", "issuer_of_patient_id": "",
                                     "patient_name": f"SYNTH^PATIENT{p}", "patient_birth_date": "19600101",
                                     "patient_sex": "MF"[p % 2], "specific_character_set": "ISO_IR 100"})
        for s in range(1, n_studies + 1):
            patient = (s - 1) % n_patients + 1
            date = f"{2015 + rng.randrange(10)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
            rows["studies"].append({"id": s, "patient_fk": patient, "study_instance_uid": _uid(1, s),
                                    "study_date": date,
                                    "study_time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}00",
                                    "accession_number": f"A{s:09d}", "study_id": str(s),
                                    "study_description": rng.choice(DESCRIPTIONS), "referring_physician_name": "",
                                    "specific_character_set": "ISO_IR 100"})
            for k in range(SERIES_PER_STUDY):
                series_id += 1
                classified = k == 0
                first = rng.randrange(len(REGIONS))
                parts = REGIONS[first:first + rng.randrange(1, 4)] if classified else []
                modality = "CT" if classified else rng.choice(["CT", "CT", "MR", "PT"])
                rows["series"].append({"id": series_id, "study_fk": s, "series_instance_uid": _uid(2, series_id),
                                       "modality": modality, "series_number": k + 1, "series_description": "",
                                       "body_part_examined": "CHEST", "specific_character_set": "ISO_IR 100",
                                       "state": "stable", "classification_state": "done" if classified else "none",
                                       "classification_reason": "", "model_version": "bench-1" if classified else "",
                                       "body_parts": "\\".join(parts)})
                per_part = INSTANCES_PER_SERIES // max(1, len(parts))
                for i in range(INSTANCES_PER_SERIES):
                    instance_id += 1
                    rows["instances"].append({"id": instance_id, "series_fk": series_id,
                                              "sop_instance_uid": _uid(3, instance_id), "sop_class_uid": CT,
                                              "instance_number": i + 1, "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                                              "path": f"{s}/{series_id}/{instance_id}.dcm", "size_bytes": 526_000,
                                              "calling_ae_title": "BENCH"})
                    if classified:
                        part = parts[min(i // per_part, len(parts) - 1)]
                        rows["slice_results"].append({"instance_fk": instance_id, "series_fk": series_id,
                                                      "model_version": "bench-1", "position": i, "z_mm": -2.0 * i,
                                                      "p_neck": 0.1, "p_lungs": 0.2, "p_liver": 0.3, "p_pelvis": 0.2,
                                                      "p_legs": 0.2, "predicted": part.lower(), "body_parts": part})
                for o, part in enumerate(parts):
                    range_id += 1
                    lo, hi = o * per_part + 1, (o + 1) * per_part if o < len(parts) - 1 else INSTANCES_PER_SERIES
                    rows["region_ranges"].append({
                        "id": range_id, "series_fk": series_id, "ordinal": o, "region": part.lower(),
                        "body_part": part, "first_instance_number": lo, "last_instance_number": hi,
                        "first_sop_instance_uid": "", "last_sop_instance_uid": "", "first_position": lo - 1,
                        "last_position": hi - 1, "z_start_mm": None, "z_end_mm": None, "n_slices": hi - lo + 1,
                        "mean_probability": 0.9, "model_version": "bench-1"})
                if classified and "LIVER" in parts and "liver_series" not in sample and s >= n_studies // 2:
                    # A study half-way through the index that has liver: the target of the sample queries.
                    sample.update(liver_series=_uid(2, series_id), study=_uid(1, s), date=date,
                                  patient_id=f"P{patient:08d}")
            flush(conn)
        flush(conn, force=True)
    engine.dispose()
    sample["instances"] = instance_id
    sample["studies"] = n_studies
    return sample


def queries(sample: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    day = str(sample["date"])
    week = f"{day[:6]}01-{day[:6]}07"
    study_keys = {"StudyInstanceUID": "", "StudyDate": "", "StudyDescription": "", "PatientName": "",
                  "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}
    return [
        ("STUDY  PatientID=<one patient>", {**study_keys, "QueryRetrieveLevel": "STUDY",
                                            "PatientID": sample["patient_id"]}),
        (f"STUDY  StudyDate={week}", {**study_keys, "QueryRetrieveLevel": "STUDY", "StudyDate": week}),
        (f"STUDY  StudyDate={day}", {**study_keys, "QueryRetrieveLevel": "STUDY", "StudyDate": day}),
        ("STUDY  StudyDescription=CT NECK* + month", {**study_keys, "QueryRetrieveLevel": "STUDY",
                                                      "StudyDescription": "CT NECK*",
                                                      "StudyDate": f"{day[:6]}01-{day[:6]}31"}),
        ("STUDY  StudyDescription=*rax (all)", {**study_keys, "QueryRetrieveLevel": "STUDY",
                                                "StudyDescription": "*rax"}),
        ("STUDY  ModalitiesInStudy=MR + month", {**study_keys, "QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": "MR",
                                                "StudyDate": f"{day[:6]}01-{day[:6]}31"}),
        ("SERIES StudyUID + BodyPartExamined=LIVER", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID":
                                                      sample["study"], "SeriesInstanceUID": "",
                                                      "BodyPartExamined": "LIVER",
                                                      "NumberOfSeriesRelatedInstances": ""}),
        ("SERIES BodyPartExamined=LIVER + day", {"QueryRetrieveLevel": "SERIES", "StudyDate": day,
                                                 "SeriesInstanceUID": "", "BodyPartExamined": "LIVER"}),
        ("IMAGE  SeriesUID + BodyPartExamined=LIVER", {"QueryRetrieveLevel": "IMAGE", "SeriesInstanceUID":
                                                       sample["liver_series"], "SOPInstanceUID": "",
                                                       "InstanceNumber": "", "BodyPartExamined": "LIVER"}),
    ]


def _identifier(keys: dict[str, object]) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def time_query(sessions, keys: dict[str, object], repeat: int) -> tuple[float, float, int]:
    """(median ms, worst ms, responses) of running the query to its last response."""
    times, n = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(1 for status, _ in find(sessions, _identifier(keys), root="STUDY") if status == 0xFF00)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times), n


def time_network(port: int, keys: dict[str, object], repeat: int) -> tuple[float, float, int]:
    """(median ms, worst ms, responses) of the C-FIND over a pynetdicom association on loopback."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as model

    ae = AE(ae_title="QRBENCH")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        raise RuntimeError(f"no association with the node on port {port}")
    # As DCMTK does: no Nagle wait between the request's command and identifier PDUs.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times, n = [], 0
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = sum(1 for status, _ in assoc.send_c_find(_identifier(keys), model) if status and status.Status == 0xFF00)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        assoc.release()
    return statistics.median(times), max(times), n


def start_node(url: str, db_dir: Path):
    """The node's listener on a free loopback port, serving the index at ``url``; returns (server, port)."""
    from dicomnode.config import load_config
    from dicomnode.receive.ingest import NodeContext
    from dicomnode.receive.listener import start_listener

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, {"database_url": url, "data_dir": str(db_dir), "port": port, "bind_address": "127.0.0.1",
                             "worker.enabled": False,
                             "qr.allowed_peers": [{"ae_title": "QRBENCH", "host": "127.0.0.1"}]})
    engine = make_engine(url)
    return start_listener(NodeContext(cfg, make_sessionmaker(engine))), port, engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--db-dir", type=Path, default=None, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--network", action="store_true", help="also time each query over DICOM (pynetdicom SCU)")
    args = parser.parse_args(argv)
    db_dir = args.db_dir or Path(tempfile.mkdtemp(prefix="qrbench-"))
    db_dir.mkdir(parents=True, exist_ok=True)
    print(f"SQLite files in {db_dir}; {args.repeat} runs per query, median / worst, through dicomnode.qr.find.find; "
          f"ratios against the first query of each size (a one-patient lookup, the anchor of the run); "
          f"load average {os.getloadavg()[0]:.2f}")
    for size in args.sizes:
        path = db_dir / f"index-{size}.sqlite"
        path.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
        t0 = time.perf_counter()
        sample = fill(url, size)
        fill_s = time.perf_counter() - t0
        print(f"\n== {sample['instances']:,} instances, {sample['studies']:,} studies: filled in {fill_s:.1f} s "
              f"({path.stat().st_size / 2**20:.0f} MiB)")
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        server = port = node_engine = None
        if args.network:
            server, port, node_engine = start_node(url, db_dir)
        anchor = net_anchor = None
        for label, keys in queries(sample):
            median, worst, n = time_query(sessions, keys, args.repeat)
            anchor = anchor or median
            line = (f"  {label:<44} {median:8.2f} ms  (worst {worst:8.2f} ms, x{median / anchor:5.1f} anchor)  "
                    f"{n:6d} response(s)")
            if port:
                net_median, net_worst, net_n = time_network(port, keys, args.repeat)
                net_anchor = net_anchor or net_median
                line += (f" | C-FIND over loopback {net_median:8.2f} ms (worst {net_worst:8.2f} ms, "
                         f"x{net_median / net_anchor:5.1f}) {net_n:6d}")
            print(line, flush=True)
        if server:
            server.shutdown()
            node_engine.dispose()
        engine.dispose()
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
