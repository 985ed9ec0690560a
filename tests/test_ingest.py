"""store_instance without a network: duplicate policies, SOP class mismatch, statuses."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from sqlalchemy import func, select

from conftest import CT_FIXTURES
from dicomnode.db.models import Instance, Series
from dicomnode.receive.ingest import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_REJECTED,
    SUCCESS,
    store_instance,
)
from dicomnode.queue.stability import mark_stable_series

SLICE = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"


def part10(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def rows(ctx) -> list[Instance]:
    with ctx.sessions() as s:
        return s.scalars(select(Instance)).all()


@pytest.mark.parametrize("policy, second_status", [("keep", SUCCESS), ("replace", SUCCESS),
                                                   ("reject", DUPLICATE_REJECTED)])
def test_duplicate_policies(node_ctx, policy, second_status):
    node_ctx.config.listener.duplicate_policy = policy
    original = SLICE.read_bytes()
    changed_ds = pydicom.dcmread(SLICE)
    changed_ds.SeriesDescription = "re-sent with a change"
    changed = part10(changed_ds)
    assert store_instance(node_ctx, original) == SUCCESS
    assert store_instance(node_ctx, changed) == second_status
    (row,) = rows(node_ctx)  # never two rows
    stored = (node_ctx.storage_dir / row.path).read_bytes()
    assert stored == (changed if policy == "replace" else original)
    files = [p for p in node_ctx.storage_dir.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_replaced_instance_reopens_a_stable_series(node_ctx):
    node_ctx.config.listener.duplicate_policy = "replace"
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    mark_stable_series(node_ctx.sessions, 0.0)
    with node_ctx.sessions() as s:
        assert s.scalar(select(Series.state)) == "stable"
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    with node_ctx.sessions() as s:
        assert s.scalar(select(Series.state)) == "receiving"


def test_power_loss_safe_mode_stores(node_ctx):
    node_ctx.config.listener.power_loss_safe = True  # fsync the folder after each rename
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    (row,) = rows(node_ctx)
    assert (node_ctx.storage_dir / row.path).read_bytes() == SLICE.read_bytes()


def test_sop_class_of_request_and_dataset_must_agree(node_ctx):
    status = store_instance(node_ctx, SLICE.read_bytes(), expected_sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    assert status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    with node_ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    assert not [p for p in node_ctx.storage_dir.rglob("*") if p.is_file()]


def test_truncated_instance_is_refused(node_ctx):
    raw = SLICE.read_bytes()
    assert store_instance(node_ctx, raw[: len(raw) - 1000]) != SUCCESS
    assert rows(node_ctx) == []


def test_patient_identifiers_never_reach_the_log(node_ctx, caplog):
    ds = pydicom.dcmread(SLICE)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    caplog.set_level("DEBUG")
    assert store_instance(node_ctx, part10(ds)) == SUCCESS
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    store_instance(node_ctx, part10(ds), expected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    assert caplog.records  # something was logged
    assert "Doe" not in caplog.text and "PID-SECRET-42" not in caplog.text


def test_stored_files_are_group_readable(node_ctx):
    assert store_instance(node_ctx, SLICE.read_bytes()) == SUCCESS
    (path,) = [p for p in node_ctx.storage_dir.rglob("*.dcm")]
    assert path.stat().st_mode & 0o777 == 0o640
    node_ctx.config.listener.file_mode = "0600"
    node_ctx.__dict__.pop("file_mode", None)  # the cached value
    other = pydicom.dcmread(SLICE)
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    assert store_instance(node_ctx, part10(other)) == SUCCESS
    assert max(p.stat().st_mode & 0o777 for p in node_ctx.storage_dir.rglob("*.77.dcm")) == 0o600


@pytest.fixture
def ctx_on_db(node_config, db_url):
    """A NodeContext on db_url (SQLite and PostgreSQL), schema at head."""
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
    from dicomnode.receive.ingest import NodeContext

    upgrade(db_url, backup=False)
    node_config.database_url = db_url
    engine = make_engine(db_url)
    yield NodeContext(node_config, make_sessionmaker(engine))
    engine.dispose()


def test_values_longer_than_their_column_are_truncated_on_every_database(ctx_on_db, caplog):
    ds = pydicom.dcmread(SLICE)
    ds.AccessionNumber = "A" * 20  # SH: at most 16 characters; PostgreSQL's VARCHAR(16) would raise DataError
    ds.StudyID = "S" * 17
    ds.InstanceNumber = 999999999999  # IS allows 12 digits; beyond a 32-bit INTEGER
    caplog.set_level("WARNING")
    assert store_instance(ctx_on_db, part10(ds)) == SUCCESS
    second = pydicom.dcmread(SLICE)  # the same series again: the fast path must fit the values too
    second.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.78"
    second.InstanceNumber = 999999999999
    assert store_instance(ctx_on_db, part10(second)) == SUCCESS
    from dicomnode.db.models import Study

    with ctx_on_db.sessions() as s:
        study = s.scalar(select(Study))
        assert (study.accession_number, study.study_id) == ("A" * 16, "S" * 16)
        assert s.scalars(select(Instance.instance_number)).all() == [None, None]
    assert "AccessionNumber is 20 characters" in caplog.text and "StudyID is 17 characters" in caplog.text
    assert "InstanceNumber 999999999999 is out of range" in caplog.text
    # The file keeps what was sent.
    (row, _) = rows(ctx_on_db)
    assert pydicom.dcmread(ctx_on_db.storage_dir / row.path).AccessionNumber == "A" * 20


def test_empty_study_and_series_attributes_are_filled_by_later_instances(node_ctx):
    from dicomnode.db.models import Study

    first = pydicom.dcmread(SLICE)  # e.g. a Secondary Capture sent first, without descriptions
    first.SOPInstanceUID, first.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.81", "1.2.826.0.1.3680043.8.498.82"
    first.StudyDescription, first.SeriesDescription, first.AccessionNumber = "", "", ""
    assert store_instance(node_ctx, part10(first)) == SUCCESS
    second = pydicom.dcmread(SLICE)  # another series of the study, with the descriptions
    second.StudyDescription, second.AccessionNumber = "CT CHEST", "ACC42"
    assert store_instance(node_ctx, part10(second)) == SUCCESS
    late = pydicom.dcmread(SLICE)  # a third instance, in the first series, that has the descriptions
    late.SOPInstanceUID, late.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.83", first.SeriesInstanceUID
    late.SeriesDescription = "filled later"
    node_ctx.series_ids.clear()  # another listener process: the series is not in its cache
    assert store_instance(node_ctx, part10(late)) == SUCCESS
    with node_ctx.sessions() as s:
        study = s.scalar(select(Study))
        assert (study.study_description, study.accession_number) == ("CT CHEST", "ACC42")
        first_series = s.scalar(select(Series).where(Series.series_instance_uid == first.SeriesInstanceUID))
        assert first_series.series_description == "filled later"


COPY_TEXTS = ("copy A", "copy B, which is longer")


def _pair_copies(uid: str, n: int) -> tuple[bytes, bytes]:
    """Two different encodings of one SOP Instance UID (ImageComments tells them apart)."""
    copies = []
    for text in COPY_TEXTS:
        ds = pydicom.dcmread(SLICE)
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = n
        ds.ImageComments = text
        copies.append(part10(ds))
    return copies[0], copies[1]


@pytest.mark.parametrize("policy", ["keep", "reject", "replace"])
def test_concurrent_duplicates_from_two_associations(running_node, policy, caplog, tmp_path):
    """Two associations send the same SOP Instance UID with different content at the same moment
    (a Barrier lines them up), for many pairs: the existence check and the publish are one step."""
    race_duplicate_pairs(running_node, policy, caplog, tmp_path)


def test_concurrent_duplicates_on_every_database(ctx_on_db, caplog, tmp_path):
    """The same race with the index on PostgreSQL too (where the unique index makes the second insert wait)."""
    from dicomnode.receive.listener import start_listener

    server = start_listener(ctx_on_db)
    try:
        race_duplicate_pairs(ctx_on_db, "reject", caplog, tmp_path)
    finally:
        server.shutdown()
        server.server_close()


def race_duplicate_pairs(ctx, policy: str, caplog, tmp_path) -> None:
    """Send pairs of same-UID, different-content instances over two associations of the listener of
    ``ctx`` at the same moment; check statuses, log lines, index rows and files for ``policy``."""
    import threading

    from pydicom.uid import generate_uid
    from pynetdicom import AE

    ctx.config.listener.duplicate_policy = policy
    caplog.set_level("INFO", logger="dicomnode.receive.ingest")
    pairs = 12
    uids = [generate_uid(prefix="1.2.826.0.1.3680043.8.498.") for _ in range(pairs)]
    copies = [_pair_copies(uid, i + 1) for i, uid in enumerate(uids)]
    files = []
    for i, (a, b) in enumerate(copies):
        for side, data in (("a", a), ("b", b)):
            path = tmp_path / f"{i}{side}.dcm"
            path.write_bytes(data)
            files.append(path)
    ae = AE(ae_title="DUPTEST")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [str(pydicom.dcmread(SLICE).file_meta.TransferSyntaxUID)])
    assocs = [ae.associate("127.0.0.1", ctx.config.port, ae_title=ctx.config.ae_title) for _ in range(2)]
    assert all(a.is_established for a in assocs)
    barrier = threading.Barrier(2, timeout=120)
    statuses: list[list[int]] = [[0, 0] for _ in range(pairs)]

    def sender(side: int) -> None:
        for i in range(pairs):
            barrier.wait()
            statuses[i][side] = assocs[side].send_c_store(tmp_path / f"{i}{'ab'[side]}.dcm").Status

    threads = [threading.Thread(target=sender, args=(side,)) for side in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for a in assocs:
        a.release()
    assert not any(t.is_alive() for t in threads)

    with ctx.sessions() as s:
        indexed = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    assert set(indexed) == set(uids)  # one row per UID, never two
    logged = [r.getMessage() for r in caplog.records]
    for i, uid in enumerate(uids):
        row = indexed[uid]
        path = ctx.storage_dir / row.path
        which = COPY_TEXTS.index(pydicom.dcmread(path).ImageComments)  # the file is one copy, whole
        assert row.size_bytes == path.stat().st_size
        mentions = [m for m in logged if uid in m]
        if policy == "reject":
            assert sorted(statuses[i]) == [SUCCESS, DUPLICATE_REJECTED], statuses[i]
            assert statuses[i][which] == SUCCESS  # the copy on disk is the one acknowledged
            assert sum("refused (0xC230)" in m for m in mentions) == 1
        else:
            assert statuses[i] == [SUCCESS, SUCCESS]
            wording = "kept the stored copy" if policy == "keep" else "replaced the stored copy"
            assert sum(wording in m for m in mentions) == 1, mentions
    # Nothing but the instance files is left in storage (no temporary files).
    assert len([p for p in ctx.storage_dir.rglob("*") if p.is_file()]) == pairs
