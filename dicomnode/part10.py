"""The bytes of a DICOM Part 10 file: file meta, the top-level element walk, structural completeness.

Shared by the receive path (the header reader and the check before Success) and the classifier's
native slice reader, so that neither stage imports the other; it decodes no value and knows nothing of
pynetdicom, the index or the model.

pydicom is lenient: it reads a truncated element as a short value and stops quietly at the end of
the bytes. A peer that sends a cut or corrupt dataset must get a failure status instead of a
Success for a file that can never be read back, so the element structure is walked here once:
every element's length must fit, every sequence, item and encapsulated fragment must be closed.
No value is decoded; this costs a few microseconds per element.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: VRs whose explicit encoding has a 4-byte length (after 2 reserved bytes).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF
_TRANSFER_SYNTAX_TAG = 0x00020010
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_MAX_DEPTH = 64


class IncompleteDataset(ValueError):
    """The encoded dataset is truncated or its element structure is broken; the message says where."""


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: Transfer syntaxes whose Pixel Data is native (defined length); every other one encapsulates it.
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, "1.2.840.10008.1.2.1", DEFLATED, EXPLICIT_BE})
_PIXEL_DATA = 0x7FE00010


class _Walker:
    def __init__(self, buf: bytes, explicit: bool, little: bool, encapsulated: bool | None = None) -> None:
        self.buf = buf
        self.explicit = explicit
        self.e = "<" if little else ">"
        #: True/False: the top-level Pixel Data must be encapsulated / native; None: not checked.
        self.encapsulated = encapsulated

    def _pixel_data_mismatch(self, pos: int, undefined: bool) -> IncompleteDataset:
        if undefined:
            return IncompleteDataset(f"Pixel Data at byte {pos} is encapsulated (undefined length) but the "
                                     "transfer syntax is a native one")
        return IncompleteDataset(f"Pixel Data at byte {pos} has a defined length (native) but the transfer "
                                 "syntax is an encapsulated (compressed) one")

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > len(self.buf):
            raise IncompleteDataset(f"{what} at byte {pos} needs {n} bytes, only {len(self.buf) - pos} remain")

    def _tag(self, pos: int) -> int:
        self._need(pos, 4, "tag")
        group, elem = struct.unpack_from(self.e + "HH", self.buf, pos)
        return (group << 16) | elem

    def elements(self, pos: int, end: int | None, depth: int) -> int:
        """Walk elements from ``pos`` up to ``end`` (defined length) or an item delimiter (undefined)."""
        if depth > _MAX_DEPTH:
            raise IncompleteDataset("sequences nested too deeply")
        buf = self.buf
        while (end is None or pos < end) and pos < len(buf):
            tag = self._tag(pos)
            if tag == _ITEM_END:
                if end is not None:
                    raise IncompleteDataset(f"item delimiter inside a defined-length item at byte {pos}")
                self._need(pos, 8, "item delimiter")
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise IncompleteDataset(f"unexpected delimiter {_tag_str(tag)} at byte {pos}")
            if pos + 8 > len(self.buf):  # message built only on failure (hot loop)
                self._need(pos, 8, f"element {_tag_str(tag)}")
            vr = buf[pos + 4:pos + 6] if self.explicit else b""
            # Some writers encode sequence items in implicit VR inside an explicit VR dataset; like
            # pydicom and DCMTK, read an element whose VR bytes are not letters as implicit VR.
            if vr and vr.isalpha() and vr.isupper():
                if vr in LONG_VRS:
                    if pos + 12 > len(self.buf):  # message built only on failure (hot loop)
                        self._need(pos, 12, f"element {_tag_str(tag)}")
                    (length,) = struct.unpack_from(self.e + "L", buf, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.e + "H", buf, pos + 6)
                    pos += 8
            else:
                vr = b""
                (length,) = struct.unpack_from(self.e + "L", buf, pos + 4)
                pos += 8
            if length == UNDEFINED_LENGTH:
                if tag == _PIXEL_DATA:
                    if self.encapsulated is False and depth == 0:
                        raise self._pixel_data_mismatch(pos, True)
                    pos = self.fragments(pos, tag)
                else:  # SQ, or UN/implicit with undefined length: a sequence of items
                    pos = self.items(pos, tag, depth)
                continue
            if end is None and pos + length > len(buf) or end is not None and pos + length > end:
                limit = len(buf) if end is None else end
                raise IncompleteDataset(
                    f"element {_tag_str(tag)} claims {length} bytes at byte {pos}, only {limit - pos} remain")
            if tag == _PIXEL_DATA and self.encapsulated and depth == 0:
                raise self._pixel_data_mismatch(pos, False)
            if vr == b"SQ" or (not vr and length and self._looks_like_items(pos, tag)):
                self.items_defined(pos, pos + length, tag, depth)
            pos += length
        if end is not None and pos != end:
            raise IncompleteDataset(f"item ends at byte {pos}, its length says {end}")
        if end is None and depth > 0:
            raise IncompleteDataset("dataset ends inside an undefined-length item")
        return pos

    def _looks_like_items(self, pos: int, tag: int) -> bool:
        """In implicit VR a defined-length SQ is recognised by its first item tag."""
        return pos + 4 <= len(self.buf) and self._tag(pos) == _ITEM and tag != 0x7FE00010

    def items(self, pos: int, tag: int, depth: int) -> int:
        """Items of an undefined-length sequence, up to its sequence delimiter."""
        while True:
            item_tag = self._tag(pos)
            if pos + 8 > len(self.buf):  # message built only on failure (hot loop)
                self._need(pos, 8, f"item of {_tag_str(tag)}")
            (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
            pos += 8
            if item_tag == _SEQ_END:
                return pos
            if item_tag != _ITEM:
                raise IncompleteDataset(f"sequence {_tag_str(tag)} holds {_tag_str(item_tag)} instead of an item")
            if length == UNDEFINED_LENGTH:
                pos = self.elements(pos, None, depth + 1)
            else:
                if pos + length > len(self.buf):  # message built only on failure (hot loop)
                    self._need(pos, length, f"item of {_tag_str(tag)}")
                self.elements(pos, pos + length, depth + 1)
                pos += length

    def items_defined(self, pos: int, end: int, tag: int, depth: int) -> None:
        while pos < end:
            item_tag = self._tag(pos)
            if item_tag != _ITEM:
                raise IncompleteDataset(f"sequence {_tag_str(tag)} holds {_tag_str(item_tag)} instead of an item")
            if pos + 8 > len(self.buf):  # message built only on failure (hot loop)
                self._need(pos, 8, f"item of {_tag_str(tag)}")
            (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
            pos += 8
            if length == UNDEFINED_LENGTH:
                pos = self.elements(pos, None, depth + 1)
            else:
                if pos + length > end:
                    raise IncompleteDataset(f"an item of {_tag_str(tag)} overruns its sequence")
                self.elements(pos, pos + length, depth + 1)
                pos += length

    def fragments(self, pos: int, tag: int) -> int:
        """Encapsulated pixel data: offset table and fragments, each with a defined length, then the delimiter."""
        while True:
            item_tag = self._tag(pos)
            self._need(pos, 8, "pixel data fragment")
            (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
            pos += 8
            if item_tag == _SEQ_END:
                return pos
            if item_tag != _ITEM or length == UNDEFINED_LENGTH:
                raise IncompleteDataset(f"encapsulated pixel data holds {_tag_str(item_tag)} at byte {pos - 8}")
            self._need(pos, length, "pixel data fragment")
            pos += length


_IMPLICIT_HEADER = struct.Struct("<HHL")  # group, element, 4-byte length
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_LONG_LENGTH = struct.Struct("<L")


def top_level_elements(buf: bytes, pos: int, implicit: bool) -> Iterator[tuple[int, bytes | None, int, int]]:
    """``(tag, VR, value length, value offset)`` of each top-level element of a little-endian dataset.

    The walk starts at ``pos`` (the first element after the file meta group) and goes in file order until
    fewer than 8 bytes remain or the caller stops; the VR is None in Implicit VR. An element of undefined
    length (a sequence, an undefined-length UN, encapsulated Pixel Data) is yielded with
    ``UNDEFINED_LENGTH`` and then skipped past its delimiter. A defined length is yielded as it is
    written: the caller checks that ``value offset + length`` fits. Raises ``ValueError`` for an explicit
    VR that is not two upper-case letters, :class:`IncompleteDataset` for a sequence cut short and
    ``struct.error`` for a long-VR header cut short.
    """
    end = len(buf)
    walker = None
    while pos + 8 <= end:
        if implicit:
            group, elem, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
            vr, value_pos = None, pos + 8
        else:
            group, elem, vr, length = _EXPLICIT_HEADER.unpack_from(buf, pos)
            if vr in LONG_VRS:
                length, value_pos = _LONG_LENGTH.unpack_from(buf, pos + 8)[0], pos + 12
            elif vr.isalpha() and vr.isupper():
                value_pos = pos + 8
            else:
                raise ValueError(f"element {_tag_str(group << 16 | elem)} at byte {pos} has no valid explicit VR")
        tag = group << 16 | elem
        yield tag, vr, length, value_pos
        if length == UNDEFINED_LENGTH:
            if walker is None:
                walker = _Walker(buf, explicit=not implicit, little=True)
            pos = walker.fragments(value_pos, tag) if tag == _PIXEL_DATA else walker.items(value_pos, tag, 0)
        else:
            pos = value_pos + length


def check_complete(dataset: bytes | memoryview, transfer_syntax_uid: str) -> None:
    """Raise :class:`IncompleteDataset` unless ``dataset`` (no preamble/meta) is structurally whole
    and its top-level Pixel Data is encoded as ``transfer_syntax_uid`` says (native: defined length;
    encapsulated: undefined length with fragments)."""
    buf = bytes(dataset)
    if transfer_syntax_uid == DEFLATED:
        try:
            buf = zlib.decompress(buf, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise IncompleteDataset(f"deflated dataset does not inflate: {exc}") from exc
    walker = _Walker(buf, explicit=transfer_syntax_uid != IMPLICIT_LE, little=transfer_syntax_uid != EXPLICIT_BE,
                     encapsulated=transfer_syntax_uid not in NATIVE_SYNTAXES if transfer_syntax_uid else None)
    end = walker.elements(0, None, 0)
    if end != len(buf):
        raise IncompleteDataset(f"{len(buf) - end} stray bytes after the last element")


def file_meta_info(part10: bytes | memoryview) -> tuple[int, str]:
    """(byte offset of the dataset, Transfer Syntax UID) of a Part 10 stream: one walk over the
    preamble, 'DICM' and the group 0002 elements (always explicit VR little endian)."""
    if len(part10) < 132 or bytes(part10[128:132]) != b"DICM":
        raise IncompleteDataset("no DICM prefix: not a Part 10 stream")
    pos = 132
    syntax = ""
    while pos + 8 <= len(part10):
        group, elem = struct.unpack_from("<HH", part10, pos)
        if group != 0x0002:
            return pos, syntax
        vr = bytes(part10[pos + 4:pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > len(part10):
                break
            length = struct.unpack_from("<L", part10, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from("<H", part10, pos + 6)[0]
            pos += 8
        if (group << 16 | elem) == _TRANSFER_SYNTAX_TAG:
            syntax = bytes(part10[pos:pos + length]).decode("ascii", "replace").rstrip("\x00 ")
        pos += length
    if pos == len(part10):
        return pos, syntax
    raise IncompleteDataset("file meta information is truncated")


def dataset_offset(part10: bytes | memoryview) -> int:
    """Byte offset of the dataset in a Part 10 stream: after preamble, 'DICM' and the group 0002 elements."""
    return file_meta_info(part10)[0]
