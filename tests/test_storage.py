"""Storage: UID validation, paths that cannot escape the storage folder, atomic durable writes."""

from __future__ import annotations

import pytest

from dicomnode.receive import storage


@pytest.mark.parametrize("value", ["1.2.840.10008.5.1.4.1.1.2", "0", "1.0.3", "2.25.123456789012345678901234567890"])
def test_valid_uids(value):
    assert storage.validate_uid(value, "SOPInstanceUID") == value


@pytest.mark.parametrize("value, reason", [
    (None, "missing"), ("", "missing"), ("../../etc/passwd", "not a valid UID"), ("1.2/../3", "not a valid UID"),
    ("1.02.3", "not a valid UID"), ("1..2", "not a valid UID"), ("1.2.", "not a valid UID"), ("1.2.a", "not a valid UID"),
    ("1." + "2" * 70, "longer than 64"),
])
def test_invalid_uids_name_the_attribute(value, reason):
    with pytest.raises(storage.InvalidUID) as err:
        storage.validate_uid(value, "SeriesInstanceUID")
    assert "SeriesInstanceUID" in str(err.value) and reason in str(err.value)


def test_relative_path_is_built_from_uids_only():
    assert storage.relative_path("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"
    with pytest.raises(storage.InvalidUID):
        storage.relative_path("1.2", "..", "1.2.3.4")


def test_write_atomic_leaves_only_the_complete_file(tmp_path):
    path = storage.write_atomic(tmp_path, "1.2/1.3/1.4.dcm", [b"abc", b"def"])
    assert path.read_bytes() == b"abcdef"
    assert [p.name for p in path.parent.iterdir()] == ["1.4.dcm"]
    storage.write_atomic(tmp_path, "1.2/1.3/1.4.dcm", b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        storage.write_atomic(tmp_path, "1.2/1.3/1.4.dcm", b"other", replace=False)
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["1.4.dcm"]


def test_write_atomic_refuses_to_leave_the_storage_folder(tmp_path):
    with pytest.raises(storage.InvalidUID):
        storage.write_atomic(tmp_path / "store", "../outside.dcm", b"x")
    assert not (tmp_path / "outside.dcm").exists()


def test_free_space_floor(tmp_path):
    storage.check_free_space(tmp_path, 1024, 0)
    with pytest.raises(storage.OutOfSpace, match="min_free_space_mb"):
        storage.check_free_space(tmp_path, 1024, 1 << 62)
