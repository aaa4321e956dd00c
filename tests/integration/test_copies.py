"""Backup copies in an S3-compatible bucket: moto's standalone server, run as a real process."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from jobs.backups import copies
from jobs.errors import BackupError
from tests.integration.conftest import missing

pytestmark = pytest.mark.integration

ACCESS_KEY = "AKIARUNBOOKTEST00001"
SECRET_KEY = "runbook-test-secret-key-do-not-print"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server of the session's own."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto is not installed; pip install 'moto[server]'")
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                missing(f"moto's S3 server did not start on port {port}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, with the AWS environment pointed at it."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("RUNBOOK_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"runbook-{uuid.uuid4().hex[:12]}"
    client(moto_endpoint).create_bucket(Bucket=bucket)
    return bucket


def client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def moto_auth(endpoint: str, unchecked_requests: str) -> None:
    """Make moto check credentials after ``unchecked_requests`` more requests ("inf": never)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=unchecked_requests.encode(),
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "prod-20250101T000000Z-run1.dump"
    path.write_bytes(os.urandom(12 * 1024 * 1024 + 5))  # above boto3's multipart threshold
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_check_fetch_delete_round_trip(
    s3: str, moto_endpoint: str, backup: tuple[Path, str], tmp_path: Path
) -> None:
    path, sha = backup
    made = copies.copy_backup(path, f"s3://{s3}/prod/backups/", sha)
    location = f"s3://{s3}/prod/backups/{path.name}"
    assert made == {"location": location, "sha256": sha, "size": path.stat().st_size}
    head = client(moto_endpoint).head_object(Bucket=s3, Key=f"prod/backups/{path.name}")
    assert head["Metadata"]["sha256"] == sha

    dest = tmp_path / "again" / path.name
    fetched = copies.fetch_copy(location, dest)  # checked against the object's metadata
    assert fetched == {"path": str(dest), "sha256": sha, "size": path.stat().st_size}
    assert dest.read_bytes() == path.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o600

    copies.delete_copy(location)
    assert client(moto_endpoint).list_objects_v2(Bucket=s3).get("KeyCount") == 0
    copies.delete_copy(location)  # already gone: fine
    with pytest.raises(BackupError, match=f"copy {location} does not exist"):
        copies.fetch_copy(location, tmp_path / "x.dump")


def test_a_bucket_without_prefix_and_another_name(s3: str, backup: tuple[Path, str]) -> None:
    path, sha = backup
    made = copies.copy_backup(path, f"s3://{s3}", sha, name="other.dump")
    assert made["location"] == f"s3://{s3}/other.dump"


def test_a_missing_bucket_is_one_line(
    s3: str, moto_endpoint: str, backup: tuple[Path, str]
) -> None:
    path, sha = backup
    with pytest.raises(BackupError) as err:
        copies.copy_backup(path, "s3://no-such-bucket-runbook/prefix", sha)
    assert str(err.value) == (
        f"bucket no-such-bucket-runbook does not exist at {moto_endpoint}; create it or fix "
        "the copy destination"
    )


def test_a_corrupted_copy_is_detected(
    s3: str, moto_endpoint: str, backup: tuple[Path, str], tmp_path: Path
) -> None:
    path, sha = backup
    location = str(copies.copy_backup(path, f"s3://{s3}/p", sha)["location"])
    # Someone replaces the object (keeping the metadata that claims the old digest).
    client(moto_endpoint).put_object(
        Bucket=s3, Key=f"p/{path.name}", Body=b"not the backup", Metadata={"sha256": sha}
    )
    dest = tmp_path / "back.dump"
    with pytest.raises(BackupError) as err:
        copies.fetch_copy(location, dest, sha256=sha)
    assert str(err.value) == (
        f"copy {location} does not match the backup's sha256 (corrupt or replaced); not using it"
    )
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_bad_credentials_are_one_line_without_secrets(
    s3: str, moto_endpoint: str, backup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = backup
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    moto_auth(moto_endpoint, "0")  # from now on moto checks every request's signature
    try:
        with pytest.raises(BackupError) as err:
            copies.copy_backup(path, f"s3://{s3}/p", sha)
    finally:
        moto_auth(moto_endpoint, "inf")
    message = str(err.value)
    assert message.startswith(f"S3 refused access to bucket {s3} at {moto_endpoint} (")
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert "wrong-secret-value-123" not in message and SECRET_KEY not in message


def test_no_credentials_is_one_line(
    s3: str, backup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = backup
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path.parent / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path.parent / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(BackupError, match=rf"^no S3 credentials for s3://{s3}/p/"):
        copies.copy_backup(path, f"s3://{s3}/p", sha)


def test_an_unreachable_endpoint_is_one_line(
    s3: str, backup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = backup
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RUNBOOK_S3_ENDPOINT_URL", dead)
    with pytest.raises(BackupError) as err:
        copies.copy_backup(path, f"s3://{s3}/p", sha)
    assert str(err.value).startswith(f"cannot reach the S3 endpoint {dead}; check")


def test_a_copy_that_reads_back_wrong_is_removed(
    s3: str, moto_endpoint: str, backup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = backup
    real = copies.object_chunks

    def flipped(client, bucket, key):  # type: ignore[no-untyped-def]
        chunks, recorded = real(client, bucket, key)
        return iter([b"x", *chunks]), recorded

    monkeypatch.setattr(copies, "object_chunks", flipped)
    with pytest.raises(BackupError) as err:
        copies.copy_backup(path, f"s3://{s3}/p", sha)
    assert str(err.value) == (
        f"the copy at s3://{s3}/p/{path.name} does not read back with the backup's sha256; "
        "removed it, check the storage and retry"
    )
    assert client(moto_endpoint).list_objects_v2(Bucket=s3).get("KeyCount") == 0
