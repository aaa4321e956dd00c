"""Backup copies into a directory: written 0600, fsynced, read back by sha256; no services."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from jobs.backups import copies
from jobs.errors import BackupError


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "backups" / "prod-20250101T000000Z-run1.dump"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * copies.CHUNK + 17))
    path.chmod(0o600)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_copy_to_a_directory_round_trip(backup: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = backup
    dest = tmp_path / "elsewhere" / "nested"  # created on demand
    made = copies.copy_backup(path, str(dest), sha)
    copy = dest / path.name
    assert made == {"location": str(copy), "sha256": sha, "size": path.stat().st_size}
    assert copy.read_bytes() == path.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600
    assert leftovers(dest) == []

    restored = tmp_path / "restored" / "back.dump"
    fetched = copies.fetch_copy(str(copy), restored, sha256=sha)
    assert fetched == {"path": str(restored), "sha256": sha, "size": path.stat().st_size}
    assert restored.read_bytes() == path.read_bytes()
    assert restored.stat().st_mode & 0o777 == 0o600

    copies.delete_copy(str(copy))
    assert not copy.exists()
    copies.delete_copy(str(copy))  # already gone: fine


def test_copy_under_another_name(backup: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = backup
    made = copies.copy_backup(path, str(tmp_path / "c"), sha, name="renamed.dump")
    assert made["location"] == str(tmp_path / "c" / "renamed.dump")
    with pytest.raises(BackupError, match="not a plain file name"):
        copies.copy_backup(path, str(tmp_path / "c"), sha, name="../escape.dump")


def test_a_backup_that_changed_is_not_copied(backup: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = backup
    dest = tmp_path / "c"
    with pytest.raises(BackupError) as err:
        copies.copy_backup(path, str(dest), "0" * 64)
    assert "does not match the backup's sha256" in str(err.value)
    assert "\n" not in str(err.value)
    assert list(dest.iterdir()) == []  # neither the copy nor a temporary file is left


def test_an_unwritable_directory_is_one_line(backup: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = backup
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackupError) as err:
        copies.copy_backup(path, str(blocker / "sub"), sha)
    assert str(err.value) == (
        f"directory {blocker / 'sub'} is not writable (Not a directory); fix its permissions "
        "or choose another place for the copy"
    )


def test_the_backups_own_directory_is_not_a_second_copy(backup: tuple[Path, str]) -> None:
    path, sha = backup
    with pytest.raises(BackupError, match="where the backup already is"):
        copies.copy_backup(path, str(path.parent), sha)


def test_a_corrupt_copy_is_not_fetched(backup: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = backup
    made = copies.copy_backup(path, str(tmp_path / "c"), sha)
    copy = Path(str(made["location"]))
    data = bytearray(copy.read_bytes())
    data[100] ^= 0xFF
    copy.write_bytes(bytes(data))
    dest = tmp_path / "restored" / "back.dump"
    with pytest.raises(BackupError) as err:
        copies.fetch_copy(str(copy), dest, sha256=sha)
    assert str(err.value) == (
        f"copy {copy} does not match the backup's sha256 (corrupt or replaced); not using it"
    )
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_a_missing_copy_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="does not exist"):
        copies.fetch_copy(str(tmp_path / "gone.dump"), tmp_path / "x.dump")


def test_unknown_schemes_are_refused(backup: tuple[Path, str]) -> None:
    path, sha = backup
    with pytest.raises(BackupError, match="neither a directory nor an s3:// URL"):
        copies.copy_backup(path, "gs://bucket/prefix", sha)
    with pytest.raises(BackupError, match="names no bucket"):
        copies.copy_backup(path, "s3:///prefix", sha)
