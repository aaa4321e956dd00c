"""Configuration: targets, URLs, durations, redaction (no services needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import load_settings, normalize_url, redact
from jobs.errors import ConfigError, UnknownTarget


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runbook.toml"
    path.write_text(text)
    return path


def test_bare_postgresql_url_means_psycopg2() -> None:
    # SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL.
    for raw in (
        "postgresql://u:pw@h:5433/db",
        "postgres://u:pw@h:5433/db",
        "postgresql+psycopg2://u:pw@h:5433/db",
    ):
        url = normalize_url(raw)
        assert url.drivername == "postgresql+psycopg2"
        assert (url.host, url.port, url.database) == ("h", 5433, "db")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not a url", "malformed"),
        ("postgresql://u@h:notaport/db", "malformed"),
        ("mysql://u@h/db", "not a PostgreSQL URL"),
        ("postgresql+asyncpg://u@h/db", "runbook uses psycopg2"),
        ("postgresql://u@h", "names no database"),
    ],
)
def test_bad_urls_are_refused_without_echoing_them(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        normalize_url(raw.replace("u@", "u:hunter2@"), "url")
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)


def test_redact_removes_known_passwords_in_every_encoding() -> None:
    normalize_url("postgresql://u:p%40ss%2Fw0rd@h/db")
    assert redact("login p@ss/w0rd and p%40ss%2Fw0rd") == "login *** and ***"


def test_targets_from_toml_with_defaults_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROD_URL", "postgresql://app:secret@db.internal/app")
    path = write(
        tmp_path,
        """
[targets.prod]
url_env = "PROD_URL"
alembic_ini = "app/alembic.ini"
backup_dir = "/var/backups/runbook"
lock_timeout = "1500ms"
lock_retries = 3
health_url = "http://127.0.0.1:8000/health"

[targets.staging]
url = "postgresql://app@staging/app"
""",
    )
    settings = load_settings(path)
    prod = settings.target("prod")
    assert prod.alembic_ini == tmp_path / "app" / "alembic.ini"
    assert prod.backup_dir == Path("/var/backups/runbook")
    assert (prod.lock_timeout_ms, prod.lock_retries) == (1500, 3)
    assert prod.health_url == "http://127.0.0.1:8000/health"
    assert "secret" not in repr(prod) and "secret" not in prod.safe_url
    assert settings.target("staging").lock_timeout_ms == 2000
    with pytest.raises(ConfigError, match="several targets are configured"):
        settings.target(None)
    with pytest.raises(UnknownTarget, match="unknown target 'qa'"):
        settings.target("qa")


def test_database_url_alone_defines_the_default_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_CONFIG", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1/app")
    settings = load_settings()
    target = settings.target(None)
    assert target.name == "default"
    assert target.url.database == "app"
    assert target.alembic_ini.name == "alembic.ini"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[targets.x]\nurl = "postgresql://h/db"\nlock_timeout = "0s"\n', "greater than zero"),
        ('[targets.x]\nurl = "postgresql://h/db"\nlock_timeout = "soon"\n', "expected a duration"),
        ('[targets.x]\nurl = "postgresql://h/db"\nlock_retries = -1\n', "whole number >= 0"),
        ('[targets.x]\nurl = "postgresql://h/db"\nbackup = "yes"\n', "true or false"),
        ('[targets.x]\nurl = "postgresql://h/db"\nurl_env = "X"\n', "exactly one of url"),
        ('[targets.x]\nalembic_ini = "a.ini"\n', "exactly one of url"),
        ('[targets."bad name"]\nurl = "postgresql://h/db"\n', "names may hold"),
        ("targets = 3\n", "must be a table"),
        ('[target.x]\nurl = "postgresql://h/db"\n', "unknown section 'target'"),
        ('queue = "q"\n[targets.x]\nurl = "postgresql://h/db"\n', "unknown section 'queue'"),
        ("[targets.x\n", "invalid TOML"),
    ],
)
def test_invalid_configuration_is_one_clear_error(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, body)).target(None)  # a broken target fails when used
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_one_broken_target_leaves_the_others_usable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    body = (
        '[targets.good]\nurl = "postgresql://h/db"\n'
        '[targets.typo]\nurl = "postgresql://h:99999/db"\n'
        '[targets.envless]\nurl_env = "NOT_SET_HERE"\n'
    )
    settings = load_settings(write(tmp_path, body))
    assert settings.target("good").url.database == "db"
    assert settings.names == ["envless", "good", "typo"]
    assert set(settings.broken) == {"typo", "envless"}
    with pytest.raises(ConfigError, match="invalid port"):
        settings.target("typo")
    with pytest.raises(ConfigError, match="NOT_SET_HERE"):
        settings.target("envless")
    with pytest.raises(ConfigError, match="several targets are configured"):
        settings.target(None)
