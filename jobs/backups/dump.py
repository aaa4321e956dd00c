"""Backups with pg_dump: taken before a run changes anything, and checked before trusted.

Connection details reach pg_dump through libpq environment variables, never its argv
(which any local user can read in ``ps``). The ledger schema is excluded, so restoring a
backup can never rewind the record of the run that restores it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from jobs.backups.leftovers import partial_path
from jobs.config import Target, redact
from jobs.errors import BackupError


def libpq_env(target: Target) -> dict[str, str]:
    """The environment that points libpq tools at ``target``."""
    url = target.url
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGDATABASE"] = str(url.database)
    if url.host:
        env["PGHOST"] = url.host
    if url.port:
        env["PGPORT"] = str(url.port)
    if url.username:
        env["PGUSER"] = url.username
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    for key, var in (("sslmode", "PGSSLMODE"), ("sslrootcert", "PGSSLROOTCERT")):
        value = url.query.get(key)
        if isinstance(value, str):
            env[var] = value
    env["PGAPPNAME"] = f"runbook:{target.name}"
    return env


def tool(target: Target, name: str, configured: str) -> str:
    found = shutil.which(configured)
    if not found:
        raise BackupError(
            f"{name} not found (looked for {configured!r}); install the PostgreSQL client "
            f'tools or set {name.replace("-", "_")} = "/path/to/{name}" for target '
            f"{target.name!r}"
        )
    return found


def _major(version_output: str) -> int | None:
    match = re.search(r"(\d+)(?:\.\d+)?", version_output)
    return int(match.group(1)) if match else None


def check_prerequisites(target: Target, server_version_num: int) -> None:
    """Fail early, before enqueueing, when a backup could not be taken."""
    pg_dump = tool(target, "pg_dump", target.pg_dump)
    tool(target, "pg_restore", target.pg_restore)
    try:
        out = subprocess.run(
            [pg_dump, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise BackupError(f"pg_dump at {pg_dump} does not run ({exc.strerror})") from None
    if out.returncode != 0:
        raise BackupError(f"pg_dump at {pg_dump} does not run (exit {out.returncode})")
    major = _major(out.stdout)
    server_major = server_version_num // 10000
    if major is None or major < server_major:
        raise BackupError(
            f"pg_dump {major or '?'} cannot dump a PostgreSQL {server_major} server; install "
            f"the version {server_major} client or set pg_dump for target {target.name!r}"
        )
    _check_dir_writable(target)


def _check_dir_writable(target: Target) -> None:
    directory = target.backup_dir
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".runbook-probe-"):
            pass
    except OSError as exc:
        raise BackupError(
            f"backup_dir {directory} is not writable ({exc.strerror}); fix its permissions "
            f"or set backup_dir for target {target.name!r}"
        ) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_entries(target: Target, path: Path) -> int:
    """Number of entries ``pg_restore --list`` reads from a dump; BackupError if it cannot."""
    pg_restore = tool(target, "pg_restore", target.pg_restore)
    out = subprocess.run(
        [pg_restore, "--list", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no output"])[0]
        raise BackupError(f"pg_restore --list cannot read {path}: {redact(first)}")
    return sum(1 for line in out.stdout.splitlines() if line and not line.startswith(";"))


def archive_tables(target: Target, path: Path) -> set[str]:
    """The tables ("schema.name") a dump holds, from ``pg_restore --list``."""
    pg_restore = tool(target, "pg_restore", target.pg_restore)
    out = subprocess.run(
        [pg_restore, "--list", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise BackupError(f"pg_restore --list cannot read {path}; the backup is corrupt")
    found = set()
    for line in out.stdout.splitlines():
        # "215; 1259 16390 TABLE public staffs postgres"
        match = re.match(r"^\d+; \d+ \d+ TABLE (\S+) (\S+) ", line)
        if match:
            found.add(f"{match.group(1)}.{match.group(2)}")
    return found


def new_backup_file(
    target: Target, run_id: str, delivery: int | None = None
) -> tuple[Path, Path, str]:
    """Create the run's empty backup file, mode 0600, in backup_dir, under its partial name
    (jobs/backups/leftovers.py) until ``finish_backup_file``; (partial path, final path, time)."""
    _check_dir_writable(target)
    now = datetime.now(UTC)
    final = target.backup_dir / f"{target.name}-{now.strftime('%Y%m%dT%H%M%SZ')}-{run_id}.dump"
    path = partial_path(final, delivery)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise BackupError(f"cannot create {path} ({exc.strerror}); check backup_dir") from None
    os.fchmod(fd, 0o600)
    os.close(fd)
    return path, final, now.isoformat()


def finish_backup_file(partial: Path, final: Path) -> None:
    """Give a complete, proven dump its backup name (atomically: a file under the final name
    is always whole)."""
    try:
        os.replace(partial, final)
    except OSError as exc:
        raise BackupError(f"cannot rename {partial} to {final} ({exc.strerror})") from None
