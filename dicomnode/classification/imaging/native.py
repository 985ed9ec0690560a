"""Read an uncompressed little-endian CT slice straight from its bytes: its slice header and its HU pixels.

The files a PACS sends are mostly native (Implicit or Explicit VR Little Endian, as the node stores them),
and for those pydicom's full parse (every element of the file made a ``DataElement``, then its pixel
backends) costs several times what the classifier needs. :func:`read_native_slice` walks the top-level
elements up to Pixel Data once, with the walker the receive path's header reader uses
(:func:`dicomnode.part10.top_level_elements`), keeps the ~20 it needs as raw bytes,
converts those and views the pixels with numpy. The header then goes through :func:`~dicomnode.classification.imaging.series.headers_from_dataset`
and the pixels through :func:`~dicomnode.classification.imaging.pixels.stored_to_hu`, the code the pydicom
path runs, so the result is the same :class:`SliceHeader` and the same HU array
(``tests/test_native.py`` compares both paths on every real file of ``../shared/data/ct``).

Anything this reader is not sure of gives ``None``, and the caller reads the file with pydicom as
before: another transfer syntax (compressed, big endian, deflate), a multi-frame or enhanced image,
colour or float pixels, a value that is empty, not plain ASCII or not strictly numeric, a tag out of
order, a Pixel Data length that differs from Rows x Columns x Bits Allocated, a truncated or malformed
file. So errors are still reported with pydicom's reasons, and nothing here raises on bad input.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from dicomnode.classification.imaging.pixels import stored_to_hu
from dicomnode.classification.imaging.series import SliceHeader, headers_from_dataset
from dicomnode.part10 import IMPLICIT_LE, UNDEFINED_LENGTH, file_meta_info, top_level_elements

__all__ = ["read_native_slice", "NATIVE_LITTLE_ENDIAN"]

#: The transfer syntaxes this reader handles (Implicit, Explicit VR Little Endian); every other one goes
#: through pydicom.
NATIVE_LITTLE_ENDIAN = frozenset({IMPLICIT_LE, "1.2.840.10008.1.2.1"})

_PIXEL_DATA = 0x7FE00010
#: Larger files (multi-frame, most likely) go to pydicom unread: a single 4096 x 4096 16-bit slice is 32 MiB.
MAX_FILE_BYTES = 64 << 20

# keyword -> kind of value, by tag; every other element before Pixel Data is skipped unread.
_WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("ImageType", "cs"),
    0x00080016: ("SOPClassUID", "ui"),
    0x00080018: ("SOPInstanceUID", "ui"),
    0x00080060: ("Modality", "cs"),
    0x00181164: ("ImagerPixelSpacing", "ds"),
    0x0020000E: ("SeriesInstanceUID", "ui"),
    0x00200013: ("InstanceNumber", "is"),
    0x00200032: ("ImagePositionPatient", "ds"),
    0x00200037: ("ImageOrientationPatient", "ds"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280004: ("PhotometricInterpretation", "cs"),
    0x00280008: ("NumberOfFrames", "is"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280030: ("PixelSpacing", "ds"),
    0x00280100: ("BitsAllocated", "us"),
    0x00280101: ("BitsStored", "us"),
    0x00280103: ("PixelRepresentation", "us"),
    0x00281052: ("RescaleIntercept", "ds"),
    0x00281053: ("RescaleSlope", "ds"),
}
#: Elements whose presence sends the file to pydicom (functional groups of enhanced images, float pixels).
_NOT_HANDLED = frozenset({0x52009229, 0x52009230, 0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009})
_REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "BitsAllocated", "BitsStored",
             "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation")

_UID = re.compile(r"[0-9.]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DTYPES = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.dtype("<u2"), (16, 1): np.dtype("<i2")}


class _NotHandled(Exception):
    """The file is not one this reader is sure of: the caller uses pydicom."""


class _Values(dict):
    """Keyword -> value, as pydicom gives them, for the header and HU functions (``ds.get`` and ``filename``)."""

    filename: str = ""


def read_native_slice(path: str | Path) -> tuple[SliceHeader, np.ndarray] | None:
    """(slice header, HU image in display orientation) of a single-frame native little-endian CT file, or
    ``None`` when the file must be read with pydicom (see the module docstring). Never raises on bad input."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                return None
            buf = f.read()
        values, pixels = _scan(buf)
        values.filename = str(path)
        header = headers_from_dataset(values, Path(path))[0]
        return header, stored_to_hu(_stored_pixels(values, pixels), values, None)
    except (_NotHandled, ValueError, KeyError, TypeError, IndexError, struct.error, OSError):
        return None


def _scan(buf: bytes) -> tuple[_Values, memoryview]:
    """The wanted values and the Pixel Data bytes of a native little-endian file."""
    pos, syntax = file_meta_info(buf)
    if syntax not in NATIVE_LITTLE_ENDIAN:
        raise _NotHandled(f"transfer syntax {syntax!r}")
    values = _Values()
    last_tag = -1
    end = len(buf)
    pixels = None
    for tag, vr, length, value_pos in top_level_elements(buf, pos, syntax == IMPLICIT_LE):
        if tag <= last_tag or tag in _NOT_HANDLED or tag > _PIXEL_DATA:
            raise _NotHandled(f"tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order or not handled")
        last_tag = tag
        if length == UNDEFINED_LENGTH:
            if tag in _WANTED or tag == _PIXEL_DATA:
                raise _NotHandled("a wanted value or Pixel Data has an undefined length")
            continue  # a sequence: the walker skips it, as for the receive path's header reader
        if value_pos + length > end:
            raise _NotHandled("an element runs past the end of the file")
        if tag == _PIXEL_DATA:
            pixels = memoryview(buf)[value_pos:value_pos + length]
            break
        wanted = _WANTED.get(tag)
        if wanted is not None:
            keyword, kind = wanted
            values[keyword] = _value(buf[value_pos:value_pos + length], kind, vr)
    if pixels is None:
        raise _NotHandled("no Pixel Data")
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise _NotHandled(f"missing {', '.join(missing)}")
    return values, pixels


def _value(raw: bytes, kind: str, vr: bytes | None) -> object:
    """A value as pydicom gives it, for plain values only (anything else: :class:`_NotHandled`)."""
    if vr is not None and vr.decode("ascii").lower() != kind:
        raise _NotHandled(f"a value of VR {vr!r} where {kind.upper()} is expected")
    if kind == "us":
        if len(raw) != 2:
            raise _NotHandled("an unsigned short that is not 2 bytes")
        return struct.unpack("<H", raw)[0]
    if not raw.isascii() or b"\x1b" in raw:
        raise _NotHandled("a value that is not plain ASCII")
    text = raw.decode("ascii")
    if text[-1:] in ("\x00", " "):  # the one padding byte of an odd-length value
        text = text[:-1]
    items = text.split("\\")
    if kind in ("ui", "cs"):  # plain tokens only, so that no rule of stripping can differ
        if any(not t or t != t.strip() for t in items):
            raise _NotHandled("an empty or space-padded code string or UID")
        if kind == "cs":
            return items if len(items) > 1 else items[0]
        if len(items) != 1 or not _UID.fullmatch(items[0]):
            raise _NotHandled("a UID that is not one plain value")
        return items[0]
    if kind == "is":
        if len(items) != 1 or not _INTEGER.fullmatch(items[0].strip()):
            raise _NotHandled("an integer string that is not one plain integer")
        return int(items[0])
    numbers = [float(t) for t in items]  # "ds": what pydicom's DSfloat does with the text (ValueError if empty)
    return numbers if len(numbers) > 1 else numbers[0]


def _stored_pixels(values: _Values, pixels: memoryview) -> np.ndarray:
    """The stored values (rows, columns) as pydicom's native decoder gives them (unused high bits corrected)."""
    rows, columns = values["Rows"], values["Columns"]
    allocated, stored, representation = values["BitsAllocated"], values["BitsStored"], values["PixelRepresentation"]
    if values.get("NumberOfFrames", 1) != 1 or values["SamplesPerPixel"] != 1:
        raise _NotHandled("not a single-frame monochrome image")
    if values["PhotometricInterpretation"] not in ("MONOCHROME1", "MONOCHROME2"):
        raise _NotHandled("not MONOCHROME1/2")
    dtype = _DTYPES.get((allocated, representation))
    if dtype is None or not 1 <= stored <= allocated or rows < 1 or columns < 1:
        raise _NotHandled("pixel attributes this reader does not handle")
    count = rows * columns
    if len(pixels) != count * (allocated // 8):
        raise _NotHandled("Pixel Data length differs from Rows x Columns x Bits Allocated")
    arr = np.frombuffer(pixels, dtype=dtype, count=count).reshape(rows, columns)
    if stored < allocated:
        shift = allocated - stored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr
