"""What libpq tools are given to reach a target, and reading their versions; no database."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jobs.backups.dump import _major, libpq_env, sha256_file, tool
from jobs.config import Target, normalize_url
from jobs.errors import BackupError


def target(url: str) -> Target:
    return Target(
        name="prod",
        url=normalize_url(url),
        alembic_ini=Path("/nowhere/alembic.ini"),
        backup_dir=Path("/nowhere"),
    )


def test_libpq_gets_the_url_and_nothing_of_the_callers_own_pg_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPASSWORD", "someone-elses")
    monkeypatch.setenv("PGSERVICE", "elsewhere")
    monkeypatch.setenv("KEEP_ME", "1")
    env = libpq_env(
        target(
            "postgresql://app:p%40ss@db.internal:6432/prod?sslmode=verify-full&sslrootcert=/ca.pem"
        )
    )
    pg = {k: v for k, v in env.items() if k.startswith("PG")}
    assert pg == {
        "PGDATABASE": "prod",
        "PGHOST": "db.internal",
        "PGPORT": "6432",
        "PGUSER": "app",
        "PGPASSWORD": "p@ss",  # decoded: libpq reads it as is
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": "/ca.pem",
        "PGAPPNAME": "runbook:prod",
    }
    assert env["KEEP_ME"] == "1"


def test_what_the_url_leaves_out_libpq_defaults() -> None:
    pg = {k for k in libpq_env(target("postgresql:///prod")) if k.startswith("PG")}
    assert pg == {"PGDATABASE", "PGAPPNAME"}


def test_a_client_tools_major_version() -> None:
    assert _major("pg_dump (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+2)") == 16
    assert _major("pg_dump (PostgreSQL) 9.6.24") == 9
    assert _major("no version here") is None


def test_a_missing_tool_says_how_to_configure_it() -> None:
    with pytest.raises(BackupError) as missing:
        tool(target("postgresql:///prod"), "pg_dump", "/nowhere/pg_dump")
    assert str(missing.value) == (
        "pg_dump not found (looked for '/nowhere/pg_dump'); install the PostgreSQL client tools "
        "or set pg_dump = \"/path/to/pg_dump\" for target 'prod'"
    )


def test_a_files_sha256(tmp_path: Path) -> None:
    path = tmp_path / "b.dump"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # over one read's worth
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
