"""Second copies of a backup, in a directory or an S3-compatible bucket, checked by sha256.

A destination is a directory path or ``s3://bucket/prefix``. The S3 endpoint comes from
``RUNBOOK_S3_ENDPOINT_URL`` (else ``AWS_ENDPOINT_URL``, else AWS itself) and credentials
from the usual AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, …). A copy is written under a temporary name and only appears under its
own once it reads back with the backup's sha256; nothing here ever prints a secret.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from jobs.config import redact
from jobs.errors import CopyError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ENDPOINT_ENV = "RUNBOOK_S3_ENDPOINT_URL"
CHUNK = 1 << 20
_AUTH_CODES = {
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidToken",
    "SignatureDoesNotMatch",
}


def _scrub(text: str) -> str:
    """``text`` without AWS secrets or database passwords, on one line."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return redact(" ".join(text.split()))


def _file_chunks(path: Path) -> Iterator[bytes]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CopyError(f"cannot read {path} ({exc.strerror})") from None
    with fh:
        yield from iter(lambda: fh.read(CHUNK), b"")


def _sha256(chunks: Iterable[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checked(
    chunks: Iterable[bytes], dest: Path, expected: str | None, mismatch: str
) -> tuple[str, int]:
    """Write ``chunks`` to ``dest`` (mode 0600); (sha256, size) of the file as read back.

    The bytes go to a temporary file that is fsynced, re-read and hashed, and takes its
    name only if the digest is ``expected`` (any digest when None); CopyError(``mismatch``)
    otherwise, leaving nothing behind.
    """
    directory = dest.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{dest.name}.", suffix=".partial")
    except OSError as exc:
        raise CopyError(
            f"directory {directory} is not writable ({exc.strerror}); fix its permissions "
            "or choose another place for the copy"
        ) from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise CopyError(
                f"cannot write {dest} ({exc.strerror}); free space or fix {directory}"
            ) from None
        digest, size = _sha256(_file_chunks(tmp))
        if expected is not None and digest != expected:
            raise CopyError(mismatch)
        try:
            os.replace(tmp, dest)
            _fsync_dir(directory)
        except OSError as exc:
            raise CopyError(f"cannot write {dest} ({exc.strerror}); fix {directory}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest, size


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise CopyError(f"backup copy name {name!r} is not a plain file name")


def _source_digest(path: Path, sha256: str) -> int:
    """Size of ``path``; CopyError if it no longer has the recorded ``sha256``."""
    digest, size = _sha256(_file_chunks(path))
    if digest != sha256:
        raise CopyError(
            f"backup {path} does not match its recorded sha256 (changed since it was "
            "taken); not copying it, take a new backup"
        )
    return size


# --- directories ---------------------------------------------------------------------------


def _copy_to_dir(path: Path, directory: Path, sha256: str, name: str) -> dict[str, object]:
    dest = (directory / name).absolute()
    if dest.exists() and dest.samefile(path):
        raise CopyError(
            f"copy destination {directory} is where the backup already is; a second copy "
            "must live in another place"
        )
    mismatch = (
        f"the copy at {dest} does not match the backup's sha256 (the backup changed or "
        f"{directory} is faulty); nothing was kept, take a new backup"
    )
    digest, size = _write_checked(_file_chunks(path), dest, sha256, mismatch)
    return {"location": str(dest), "sha256": digest, "size": size}


# --- S3 ------------------------------------------------------------------------------------


def _split_s3(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of ``s3://bucket/key``."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise CopyError(f"copy destination {url!r} names no bucket; expected s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def _client() -> S3Client:
    endpoint = os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=10, read_timeout=120, retries={"max_attempts": 3, "mode": "standard"}
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise CopyError(
            f"cannot set up the S3 client: {_scrub(str(exc))}; check {ENDPOINT_ENV} and the "
            "AWS_* environment"
        ) from None


@contextmanager
def _s3_errors(client: S3Client, what: str, bucket: str, location: str) -> Iterator[None]:
    """Turn boto errors of the block into one-line CopyErrors naming ``what`` failed."""
    endpoint = client.meta.endpoint_url
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise CopyError(
            f"no S3 credentials for {location}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the worker"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError):
        raise CopyError(
            f"cannot reach the S3 endpoint {endpoint}; check {ENDPOINT_ENV} (or "
            "AWS_ENDPOINT_URL) and the network"
        ) from None
    except (ClientError, S3UploadFailedError) as exc:
        error = exc if isinstance(exc, ClientError) else (exc.__cause__ or exc.__context__)
        if not isinstance(error, ClientError):
            raise CopyError(f"S3 {what} of {location} failed: {_scrub(str(exc))}") from None
        code = str(error.response.get("Error", {}).get("Code", "?"))
        if code == "NoSuchBucket" or (code == "404" and what == "bucket check"):
            raise CopyError(
                f"bucket {bucket} does not exist at {endpoint}; create it or fix the copy "
                "destination"
            ) from None
        if code in _AUTH_CODES:
            raise CopyError(
                f"S3 refused access to bucket {bucket} at {endpoint} ({code}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy"
            ) from None
        if code in ("NoSuchKey", "404"):
            raise CopyError(f"copy {location} does not exist (removed or never written)") from None
        message = str(error.response.get("Error", {}).get("Message", ""))
        raise CopyError(f"S3 {what} of {location} failed ({code}): {_scrub(message)}") from None
    except BotoCoreError as exc:
        raise CopyError(f"S3 {what} of {location} failed: {_scrub(str(exc))}") from None


def object_chunks(client: S3Client, bucket: str, key: str) -> tuple[Iterator[bytes], str | None]:
    """The object's bytes, streamed, and the sha256 recorded in its metadata."""
    response = client.get_object(Bucket=bucket, Key=key)
    return response["Body"].iter_chunks(CHUNK), response.get("Metadata", {}).get("sha256")


def _copy_to_s3(path: Path, url: str, sha256: str, name: str) -> dict[str, object]:
    bucket, prefix = _split_s3(url)
    key = f"{prefix}/{name}" if prefix else name
    location = f"s3://{bucket}/{key}"
    size = _source_digest(path, sha256)
    client = _client()
    with _s3_errors(client, "bucket check", bucket, location):
        client.head_bucket(Bucket=bucket)
    with _s3_errors(client, "upload", bucket, location):
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
    with _s3_errors(client, "read-back", bucket, location):
        chunks, recorded = object_chunks(client, bucket, key)
        digest, stored = _sha256(chunks)
    if digest != sha256 or recorded != sha256 or stored != size:
        with _s3_errors(client, "removal", bucket, location):
            client.delete_object(Bucket=bucket, Key=key)
        raise CopyError(
            f"the copy at {location} does not read back with the backup's sha256; removed "
            "it, check the storage and retry"
        )
    return {"location": location, "sha256": digest, "size": size}


# --- the API -------------------------------------------------------------------------------


def copy_backup(
    path: Path, dest: str, sha256: str, *, name: str | None = None
) -> dict[str, object]:
    """Copy the backup at ``path`` to ``dest`` (directory or s3:// URL) and prove the copy."""
    name = name or path.name
    _check_name(name)
    if dest.startswith("s3://"):
        return _copy_to_s3(path, dest, sha256, name)
    if "://" in dest:
        raise CopyError(
            f"copy destination {_scrub(dest)!r} is neither a directory nor an s3:// URL"
        )
    return _copy_to_dir(path, Path(dest).expanduser(), sha256, name)


def delete_copy(location: str) -> None:
    """Remove a copy (retention); a copy already gone is not an error."""
    if location.startswith("s3://"):
        bucket, key = _split_s3(location)
        client = _client()
        with _s3_errors(client, "removal", bucket, location):
            client.delete_object(Bucket=bucket, Key=key)
        return
    try:
        Path(location).unlink(missing_ok=True)
    except OSError as exc:
        raise CopyError(f"cannot remove the copy {location} ({exc.strerror})") from None


def fetch_copy(location: str, dest_path: Path, *, sha256: str | None = None) -> dict[str, object]:
    """Bring a copy back to ``dest_path`` (mode 0600), checked against ``sha256``.

    Without ``sha256`` an S3 copy is checked against the sha256 in its metadata; a directory
    copy is then only copied (the caller checks the file against its record).
    """
    mismatch = (
        f"copy {location} does not match the backup's sha256 (corrupt or replaced); not using it"
    )
    if location.startswith("s3://"):
        bucket, key = _split_s3(location)
        client = _client()
        with _s3_errors(client, "download", bucket, location):
            chunks, recorded = object_chunks(client, bucket, key)
            digest, size = _write_checked(chunks, dest_path, sha256 or recorded, mismatch)
    else:
        source = Path(location)
        if not source.is_file():
            raise CopyError(f"copy {location} does not exist (removed or never written)")
        digest, size = _write_checked(_file_chunks(source), dest_path, sha256, mismatch)
    return {"path": str(dest_path), "sha256": digest, "size": size}
