"""Where instance files live, and the one way they are written: temp file, fsync, rename.

Paths are built only from validated UIDs, so nothing a peer sends can steer a write outside the
storage folder. Only this module writes instance files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

# PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit component,
# at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """A UID is missing or not a valid DICOM UID; the message names the attribute."""


class OutOfSpace(OSError):
    """Free space on the storage volume is below the configured floor."""


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a str if it is a valid DICOM UID, else raise :class:`InvalidUID` naming ``keyword``."""
    if value is None or value == "":
        raise InvalidUID(f"{keyword} is missing")
    text = str(value).rstrip("\x00 ")
    if len(text) > 64:
        raise InvalidUID(f"{keyword} is longer than 64 characters")
    if not _UID_RE.match(text):
        raise InvalidUID(f"{keyword} is not a valid UID: {text[:80]!r}")
    return text


def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The file's path relative to the storage folder: ``<study>/<series>/<sop>.dcm`` (UIDs validated)."""
    parts = (
        validate_uid(study_uid, "StudyInstanceUID"),
        validate_uid(series_uid, "SeriesInstanceUID"),
        validate_uid(sop_uid, "SOPInstanceUID") + ".dcm",
    )
    return "/".join(parts)


def free_bytes(path: Path) -> int:
    """Free space available to this process on the volume holding ``path`` (or its nearest parent)."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(storage_dir: Path, needed: int, floor_bytes: int) -> None:
    """Raise :class:`OutOfSpace` if writing ``needed`` bytes would leave less than ``floor_bytes`` free."""
    free = free_bytes(storage_dir)
    if free - needed < floor_bytes:
        raise OutOfSpace(
            f"storage {storage_dir} has {free // (1 << 20)} MiB free; "
            f"floor is {floor_bytes // (1 << 20)} MiB (listener.min_free_space_mb)"
        )


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries: a rename, link or unlink in it is durable once this returns)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFile:
    """A complete, fsynced temporary file beside its target, not yet visible under the target name.

    :meth:`publish` renames it into place (and fsyncs the folders that need it); :meth:`discard`
    removes it. The C-STORE path publishes inside the index transaction, just before its commit, so
    that a crash leaves either nothing or a renamed file whose row is one commit away.
    """

    def __init__(self, tmp: str, target: Path, created: bool, fsync: bool, sync_folder: bool) -> None:
        self.tmp, self.target, self.created = tmp, target, created
        self.fsync, self.sync_folder = fsync, sync_folder
        self.published = False

    def publish(self, replace: bool = True) -> Path:
        """Rename into place (idempotent); with ``replace=False`` an existing target raises ``FileExistsError``."""
        if self.published:
            return self.target
        if replace:
            os.replace(self.tmp, self.target)
        else:
            # link() fails if the target exists: no window where a second writer overwrites the first.
            os.link(self.tmp, self.target)
            os.unlink(self.tmp)
        self.published = True
        if self.fsync and (self.sync_folder or self.created):
            folder = self.target.parent
            fsync_dir(folder)
            if self.created:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        return self.target

    def discard(self) -> None:
        """Remove the temporary file if it was not published."""
        if not self.published:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


#: Default permissions of stored files (``listener.file_mode``): owner read/write, group read, so a
#: worker or backup running as another user of the node's group can read them.
DEFAULT_FILE_MODE = 0o640


def stage_file(storage_dir: Path, rel_path: str, chunks: list[bytes] | bytes, fsync: bool = True,
               sync_folder: bool = True, mode: int = DEFAULT_FILE_MODE) -> StagedFile:
    """Write ``chunks`` to a temporary file in the folder of ``storage_dir/rel_path`` and fsync it.

    The file gets permissions ``mode`` (mkstemp creates 0600; the umask does not apply to fchmod).

    ``sync_folder=False`` (the C-STORE path unless ``listener.power_loss_safe``) makes
    :meth:`StagedFile.publish` fsync a folder only when this call created it (and then its parents
    too): the file's bytes are always on disk before the rename, and the rename of a file into an
    existing folder is persisted by the file system's next journal commit (on ext4 at the latest 5 s
    later, or at the next fsync by anyone). That is the same window as the index's commit (SQLite WAL,
    synchronous=NORMAL); a crash of the process loses neither, a power loss may lose the last ones.
    """
    target = (storage_dir / rel_path).resolve()
    root = storage_dir.resolve()
    if root not in target.parents:
        raise InvalidUID(f"refusing to write outside storage: {rel_path!r}")
    folder = target.parent
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".part", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return StagedFile(tmp, target, created, fsync, sync_folder)


def write_atomic(storage_dir: Path, rel_path: str, chunks: list[bytes] | bytes, fsync: bool = True,
                 replace: bool = True, sync_folder: bool = True, mode: int = DEFAULT_FILE_MODE) -> Path:
    """Write ``chunks`` to ``storage_dir/rel_path`` atomically and durably; return the final path.

    The bytes go to a temporary file in the target folder, which is fsynced and renamed over the
    target, then the folder is fsynced: a reader sees the old file, the new file or none, never a
    torn one. With ``replace=False`` an existing target is left alone (and ``FileExistsError`` raised).
    ``sync_folder``, ``mode``: see :func:`stage_file`.
    """
    staged = stage_file(storage_dir, rel_path, chunks, fsync=fsync, sync_folder=sync_folder, mode=mode)
    try:
        return staged.publish(replace=replace)
    finally:
        staged.discard()
