"""Test setup shared by the Q/R tests: real CT stored through ingest, classification rows written as the worker does.

- Philips J2K series (10 slices, instance 55-64, ISO_IR 100, "Chest", 20070404 185824): classified,
  55-58 LUNG, 59-61 LUNG\\LIVER, 62-64 LIVER (the labels of tests/fixtures/ct/labels.csv); ranges
  LUNG 55-61 and LIVER 59-64.
- GE 3-slice series (implicit VR, no charset, 20030417 104607): skipped ("fewer than 5 slices").
- pydicom CT_small (ISO_IR 100, "e+1", 20040119 072730): not classified; BodyPartExamined set to CHEST
  in a copy so the fallback to the modality's value is visible.
- Two copies of CT_small with new UIDs and StudyDescription "Tórax": one ISO_IR 100, one ISO_IR 192.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import AllTransferSyntaxes, ExplicitVRBigEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.config import AllowedPeer
from dicomnode.db.models import Instance, RegionRange, Series, SliceResult
from dicomnode.receive.ingest import NodeContext, store_instance

from conftest import CT_FIXTURES, dcmtk

PHILIPS = CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k"
GE = CT_FIXTURES / "series" / "dcmqi_ge_3slice"
SMALL = CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"

REGIONS = {55: "LUNG", 56: "LUNG", 57: "LUNG", 58: "LUNG", 59: "LUNG\\LIVER", 60: "LUNG\\LIVER",
           61: "LUNG\\LIVER", 62: "LIVER", 63: "LIVER", 64: "LIVER"}
TORAX = "Tórax"


@dataclass
class Stored:
    philips_study: str = ""
    philips_series: str = ""
    philips_sops: dict[int, str] = field(default_factory=dict)  # instance number -> SOP UID
    ge_study: str = ""
    ge_series: str = ""
    small_study: str = ""
    small_series: str = ""
    torax: dict[str, str] = field(default_factory=dict)  # charset -> StudyInstanceUID
    files: dict[str, Path] = field(default_factory=dict)  # SOP UID -> source file (for byte comparison)

    def liver_sops(self) -> set[str]:
        return {uid for n, uid in self.philips_sops.items() if "LIVER" in REGIONS[n]}


def _store(ctx: NodeContext, data: bytes) -> None:
    status = store_instance(ctx, data, calling_ae_title="TESTSCU")
    assert status == 0x0000, f"store_instance answered 0x{status:04X}"


def _variant(src: Path, charset: str | None, **changes) -> bytes:
    ds = pydicom.dcmread(src)
    study, series = generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if charset:
        ds.SpecificCharacterSet = charset
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


#: Calling AE titles the Q/R tests use; Q/R is answered only for listed peers (qr.allowed_peers).
QR_PEERS = ("TESTSCU", "FINDSCU", "MOVESCU", "GETSCU", "ORTHANC", "GDCMSCU", "ODIL", "STORESCU")


def allow_peers(ctx: NodeContext, *ae_titles: str, host: str = "127.0.0.1") -> None:
    """List ``ae_titles`` (default: :data:`QR_PEERS`) in the running node's qr.allowed_peers."""
    for ae in ae_titles or QR_PEERS:
        ctx.config.qr.allowed_peers.append(AllowedPeer(ae_title=ae, host=host))


def populate(ctx: NodeContext) -> Stored:
    """Store the fixtures, write the Philips series' classification and list the test peers
    (:func:`allow_peers`); returns the UIDs."""
    allow_peers(ctx)
    stored = Stored()
    for path in sorted(PHILIPS.glob("*.dcm")) + sorted(GE.glob("*.dcm")):
        data = path.read_bytes()
        _store(ctx, data)
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        stored.files[ds.SOPInstanceUID] = path
        if path.parent == PHILIPS:
            stored.philips_study, stored.philips_series = ds.StudyInstanceUID, ds.SeriesInstanceUID
            stored.philips_sops[int(ds.InstanceNumber)] = ds.SOPInstanceUID
        else:
            stored.ge_study, stored.ge_series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    small = _variant(SMALL, None, BodyPartExamined="CHEST")
    _store(ctx, small)
    ds = pydicom.dcmread(BytesIO(small), stop_before_pixels=True)
    stored.small_study, stored.small_series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    for charset, date in (("ISO_IR 100", "20200102"), ("ISO_IR 192", "20200103")):
        data = _variant(SMALL, charset, StudyDescription=TORAX, StudyDate=date, StudyTime="093000",
                        PatientName="Gómez^Ana", PatientID=f"TORAX-{charset[-3:]}")
        _store(ctx, data)
        stored.torax[charset] = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).StudyInstanceUID
    classify(ctx, stored)
    return stored


def classify(ctx: NodeContext, stored: Stored) -> None:
    """Write the results the worker would write for the Philips series; mark the GE series skipped."""
    with ctx.sessions() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == stored.philips_series))
        instances = s.scalars(select(Instance).where(Instance.series_fk == series.id)
                              .order_by(Instance.instance_number)).all()
        for position, inst in enumerate(instances):
            parts = REGIONS[inst.instance_number]
            p_lungs = 0.9 if parts == "LUNG" else (0.5 if "LUNG" in parts else 0.05)
            p_liver = 0.9 if parts == "LIVER" else (0.45 if "LIVER" in parts else 0.05)
            s.add(SliceResult(instance_fk=inst.id, series_fk=series.id, model_version="test-1", position=position,
                              z_mm=-394.0 - 5 * position, p_neck=0.01, p_lungs=p_lungs, p_liver=p_liver,
                              p_pelvis=0.02, p_legs=0.02, predicted="lungs" if p_lungs >= p_liver else "liver",
                              body_parts=parts))
        by_number = {i.instance_number: i for i in instances}
        for ordinal, (region, part, first, last) in enumerate((("lungs", "LUNG", 55, 61), ("liver", "LIVER", 59, 64))):
            s.add(RegionRange(series_fk=series.id, ordinal=ordinal, region=region, body_part=part,
                              first_instance_number=first, last_instance_number=last,
                              first_sop_instance_uid=by_number[first].sop_instance_uid,
                              last_sop_instance_uid=by_number[last].sop_instance_uid,
                              first_position=first - 55, last_position=last - 55,
                              z_start_mm=-394.0 - 5 * (first - 55), z_end_mm=-394.0 - 5 * (last - 55),
                              n_slices=last - first + 1, mean_probability=0.8, model_version="test-1"))
        series.classification_state = "done"
        series.body_parts = "LUNG\\LIVER"
        series.model_version = "test-1"
        ge = s.scalar(select(Series).where(Series.series_instance_uid == stored.ge_series))
        ge.classification_state = "skipped"
        ge.classification_reason = "3 slices, fewer than worker.min_slices (5)"
        s.commit()


# Byte-level helpers of the retrieve tests ------------------------------------------------------------

def stored_bytes(path: Path) -> bytes:
    """The dataset bytes of a Part 10 file: everything after its file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def big_endian_copy(src: Path, out: Path, new_uid: bool = True) -> Path:
    """``src`` (with a new SOP Instance UID unless ``new_uid`` is false) in Explicit VR Big Endian (DCMTK dcmconv)."""
    ds = pydicom.dcmread(src)
    if new_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    le = out.with_suffix(".le.dcm")
    ds.save_as(le, enforce_file_format=True)
    subprocess.run([dcmtk("dcmconv"), "+tb", str(le), str(out)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    return out


@contextmanager
def capturing_scp(transfer_syntaxes=AllTransferSyntaxes, ae_title: str = "CAPTURE"):
    """A Storage SCP on a free port keeping, per SOP Instance UID, (transfer syntax, the received bytes)."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                               event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(CTImageStorage, transfer_syntaxes)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
