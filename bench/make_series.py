"""Build the benchmark series: N (default 600) real 512x512 CT slices as one consistent series.

The slices are the real Siemens chest series of ``../shared/data/ct`` (30 slices, explicit VR little
endian, 512x512) repeated: every copy gets a new SOP Instance UID, and all of them one new Study and
Series Instance UID, consecutive InstanceNumbers and ImagePositionPatient stepping down by the slice
spacing, so that the receiver sees one long series. The pixel data is copied untouched.

    python bench/make_series.py [--count 600] [--out bench/out/series600]

The output folder is git-ignored (``bench/out/``); nothing generated here is ever committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"
DEFAULT_OUT = REPO / "bench" / "out" / "series600"


def make_series(source: Path, out: Path, count: int) -> list[Path]:
    """Write ``count`` slices derived from the DICOM files of ``source`` into ``out``; return their paths."""
    files = sorted(p for p in source.iterdir() if p.suffix == ".dcm")
    if not files:
        raise ValueError(f"no .dcm files in {source}")
    slices = [pydicom.dcmread(p) for p in files]
    slices.sort(key=lambda ds: int(ds.InstanceNumber))
    for ds in slices:
        if (ds.Rows, ds.Columns) != (512, 512):
            raise ValueError(f"{ds.filename}: {ds.Rows}x{ds.Columns}, the benchmark wants 512x512 slices")
    z0 = float(slices[0].ImagePositionPatient[2])
    spacing = abs(float(slices[1].ImagePositionPatient[2]) - z0) if len(slices) > 1 else float(slices[0].SliceThickness)
    study_uid, series_uid = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.dcm"):
        old.unlink()
    paths = []
    for i in range(count):
        ds = slices[i % len(slices)]
        sop_uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, round(z0 - i * spacing, 4)]
        ds.SliceLocation = round(z0 - i * spacing, 4)
        path = out / f"{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600, help="number of slices (default 600)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of real 512x512 CT slices")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default bench/out/series600)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    paths = make_series(args.source, args.out, args.count)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} slices ({size / 2**20:.0f} MiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
