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


# The declarative model of runbook.toml (jobs/config.py _TargetTable, _ConfigFile): each wrong
# value gets runbook's own line, never pydantic's several-line text.

GOOD_URL = 'url = "postgresql://h/db"\n'
WHERE = "target 'x': "


def broken_line(tmp_path: Path, table: str) -> str:
    """The line target x gets for the body of [targets.x] ``table``."""
    settings = load_settings(write(tmp_path, "[targets.x]\n" + table))
    assert not settings.targets, settings.targets
    return settings.broken["x"]


@pytest.mark.parametrize(
    ("table", "line"),
    [
        (GOOD_URL + "lock_retries = -1\n", "lock_retries must be a whole number >= 0, got -1"),
        (GOOD_URL + "lock_retries = 1.0\n", "lock_retries must be a whole number >= 0, got 1.0"),
        (GOOD_URL + 'lock_retries = "3"\n', "lock_retries must be a whole number >= 0, got '3'"),
        (GOOD_URL + "lock_retries = true\n", "lock_retries must be a whole number >= 0, got True"),
        (
            GOOD_URL + "verify_restore_max_bytes = -1\n",
            "verify_restore_max_bytes must be a whole number >= 0, got -1",
        ),
        (GOOD_URL + "keep_backups = 0\n", "keep_backups must be a whole number >= 1, got 0"),
        (
            GOOD_URL + "lock_retry_backoff = -1\n",
            "lock_retry_backoff must be seconds >= 0, got -1",
        ),
        (
            GOOD_URL + "lock_retry_backoff = true\n",
            "lock_retry_backoff must be seconds >= 0, got True",
        ),
        (
            GOOD_URL + "lock_retry_backoff = nan\n",
            "lock_retry_backoff must be seconds >= 0, got nan",
        ),
        (GOOD_URL + 'backup = "yes"\n', "backup must be true or false, got 'yes'"),
        (GOOD_URL + "verify_restore = 0\n", "verify_restore must be true or false, got 0"),
        (
            GOOD_URL + 'require_rehearsal = "no"\n',
            "require_rehearsal must be true or false, got 'no'",
        ),
        (GOOD_URL + "backup_copy_to = 3\n", "backup_copy_to must be a string, got 3"),
        (GOOD_URL + "before_run = [1]\n", "before_run must be a string, got [1]"),
        (GOOD_URL + "after_run = false\n", "after_run must be a string, got False"),
        (GOOD_URL + 'lint_allow = "a"\n', "lint_allow: expected a list of rule names, got 'a'"),
        (
            GOOD_URL + 'lint_allow = ["a", 1]\n',
            "lint_allow: expected a list of rule names, got ['a', 1]",
        ),
        (
            GOOD_URL + 'lock_timeout = "soon"\n',
            "lock_timeout: expected a duration such as 2s or 500ms, got 'soon'",
        ),
        (
            GOOD_URL + "statement_timeout = false\n",
            "statement_timeout: expected a duration such as 2s or 500ms, got False",
        ),
        (GOOD_URL + 'hook_timeout = "0s"\n', "hook_timeout: must be greater than zero, got '0s'"),
        (GOOD_URL + "preflight_wait = -1\n", "preflight_wait: must be greater than zero, got -1"),
        (
            GOOD_URL + 'long_running = "1h"\n',
            "long_running: expected a duration such as 2s or 500ms, got '1h'",
        ),
        (
            GOOD_URL + 'backup_dir = "~rb-no-such-user/b"\n',
            "backup_dir: cannot expand '~rb-no-such-user/b' (unknown user); write the path out",
        ),
        ("", 'give exactly one of url = "..." or url_env = "VAR"'),
        (GOOD_URL + 'url_env = "X"\n', 'give exactly one of url = "..." or url_env = "VAR"'),
        (
            'url_env = "RB_UNIT_UNSET"\n',
            "environment variable RB_UNIT_UNSET (url_env) is not set",
        ),
        (
            'url_env = "RB_UNIT_EMPTY"\n',
            "environment variable RB_UNIT_EMPTY (url_env) is not set",
        ),
        (
            'url_env = "RB_UNIT_MYSQL"\n',
            "URL in $RB_UNIT_MYSQL is not a PostgreSQL URL "
            "(expected postgresql://user:password@host:port/dbname)",
        ),
        (
            'url = "postgresql://h:99999/db"\n',
            "url has an invalid port (expected postgresql://user:password@host:port/dbname)",
        ),
        ("url = 3\n", "url is malformed (expected postgresql://user:password@host:port/dbname)"),
    ],
)
def test_each_wrong_value_is_runbooks_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, line: str
) -> None:
    monkeypatch.delenv("RB_UNIT_UNSET", raising=False)
    monkeypatch.setenv("RB_UNIT_EMPTY", "")
    monkeypatch.setenv("RB_UNIT_MYSQL", "mysql://h/db")
    assert broken_line(tmp_path, table) == WHERE + line


def test_an_unknown_key_comes_first_and_lists_the_known_ones(tmp_path: Path) -> None:
    line = broken_line(tmp_path, 'lock_timeout = "x"\nzz = 1\nlock_timout = 2\n')
    assert line.startswith(WHERE + "unknown option 'lock_timout' (known: after_run, alembic_ini, ")
    assert line.endswith(", verify_restore_max_bytes, version_table)")


def test_every_refusal_names_its_key_in_one_line(tmp_path: Path) -> None:
    """Whatever key is given a value of the wrong kind, the line says which and what it must
    hold: no key falls through to pydantic's own wording."""
    from jobs.config import _TARGET_KEYS

    for key in sorted(_TARGET_KEYS - {"url", "url_env"}):
        for wrong in ("{ a = 1 }", "-7", '"-"', "[true]"):
            settings = load_settings(write(tmp_path, f"[targets.x]\n{GOOD_URL}{key} = {wrong}\n"))
            line = settings.broken.get("x")
            if line is None:  # a value this key takes as text or as a path
                continue
            assert line.startswith(f"{WHERE}{key}"), line
            assert "\n" not in line and "Input should" not in line and "is not valid" not in line


def test_a_table_maps_onto_target_with_durations_in_seconds(tmp_path: Path) -> None:
    table = (
        'url = "postgresql://u:pw@h:6000/db"\nalembic_ini = "a/alembic.ini"\n'
        'lock_timeout = 1500\nstatement_timeout = "1min"\nhook_timeout = "2.5s"\n'
        'preflight_wait = "500ms"\nlong_running = 90\nlock_retry_backoff = 2\n'
        'backup_copy_to = ""\nhealth_url = ""\nlint_allow = ["adding-field-with-default"]\n'
        'pg_dump = "/opt/pg/bin/pg_dump"\nkeep_backups = 1\nverify_restore = false\n'
    )
    target = load_settings(write(tmp_path, "[targets.x]\n" + table)).target("x")
    assert target.url.drivername == "postgresql+psycopg2" and target.url.port == 6000
    assert target.alembic_ini == tmp_path / "a" / "alembic.ini"
    assert (target.lock_timeout_ms, target.statement_timeout_ms) == (1500, 60_000)
    assert (target.hook_timeout_s, target.preflight_wait_s, target.long_running_s) == (
        2.5,
        0.5,
        0.09,
    )
    assert target.lock_retry_backoff_s == 2.0 and isinstance(target.lock_retry_backoff_s, float)
    assert (target.backup_copy_to, target.health_url) == (None, None)
    assert target.lint_allow == ("adding-field-with-default",)
    assert (target.pg_dump, target.keep_backups, target.verify_restore) == (
        "/opt/pg/bin/pg_dump",
        1,
        False,
    )
    assert (target.lock_retries, target.backup, target.version_table) == (
        8,
        True,
        "alembic_version",
    )


def test_every_kind_of_broken_target_stays_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RB_UNIT_UNSET", raising=False)
    body = (
        '[targets.good]\nurl = "postgresql://h/db"\nlock_retries = 2\n'
        '[targets.typo]\nurl = "postgresql://h/db"\nlock_timout = "2s"\n'
        '[targets.wrong]\nurl = "postgresql://h/db"\nbackup = "no"\n'
        '[targets.envless]\nurl_env = "RB_UNIT_UNSET"\n'
        '[targets."bad name"]\nurl = "postgresql://h/db"\n'
        "[targets]\nscalar = 3\n"
    )
    config = write(tmp_path, body)
    settings = load_settings(config)
    assert list(settings.targets) == ["good"] and settings.target("good").lock_retries == 2
    assert settings.broken == {
        "typo": settings.broken["typo"],
        "wrong": "target 'wrong': backup must be true or false, got 'no'",
        "envless": "target 'envless': environment variable RB_UNIT_UNSET (url_env) is not set",
        "bad name": "target 'bad name': names may hold letters, digits, '_', '.', '-' only",
        "scalar": f"{config}: [targets.scalar] must be a table",
    }
    assert settings.broken["typo"].startswith("target 'typo': unknown option 'lock_timout'")
    for name in settings.broken:
        with pytest.raises(ConfigError) as err:
            settings.target(name)
        assert str(err.value) == settings.broken[name]


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (
            "b = 1\na = 2\n",
            "unknown section 'a' (known: control, groups, targets); targets go in [targets.NAME]",
        ),
        ("targets = []\n", "'targets' must be a table of [targets.NAME]"),
    ],
)
def test_the_file_level_refusals_name_the_file(tmp_path: Path, body: str, line: str) -> None:
    config = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert str(err.value) == f"{config}: {line}"


def test_the_environment_names_broker_backend_and_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, "[targets.x]\n" + GOOD_URL)
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "RUNBOOK_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(config)
    assert (settings.broker_url, settings.result_backend, settings.queue) == (
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0",
        "runbook",
    )
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://b:1/2")
    monkeypatch.setenv("RUNBOOK_QUEUE", "q")
    settings = load_settings(config)
    assert (settings.broker_url, settings.result_backend, settings.queue) == (
        "redis://b:1/2",
        "redis://b:1/2",
        "q",
    )
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://r:1/3")
    assert load_settings(config).result_backend == "redis://r:1/3"


def test_a_bad_database_url_alone_is_a_broken_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_CONFIG", raising=False)
    monkeypatch.setenv("DATABASE_URL", "mysql://h/db")
    settings = load_settings()
    assert settings.source == "DATABASE_URL" and settings.names == ["default"]
    with pytest.raises(ConfigError, match=r"^target 'default': URL in \$DATABASE_URL is not a"):
        settings.target(None)
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigError, match="no targets are configured"):
        load_settings().require_any()


def test_a_value_given_outside_the_file_is_parsed_as_the_file_parses_it() -> None:
    from jobs.config_values import parse_value

    assert parse_value("duration", "2s", "--max-replica-lag") == 2000
    assert parse_value("duration", "30min", "--max-throttle") == 1_800_000
    assert parse_value("size", "1MB", "--max-retained-wal") == 1_000_000
    assert parse_value("size", "64MiB", "--max-replica-lag-bytes") == 64 << 20
    assert parse_value("rate", "20", "--max-wal-rate") == 20_000_000  # MB/s, as in the file
    assert parse_value("rate", 2.5, "max_wal_rate") == 2_500_000
    assert parse_value("rate", "512kB/s", "--max-wal-rate") == 512_000
    for kind, value, line in [
        ("duration", "soon", "--max-throttle: expected a duration such as 2s or 500ms, got 'soon'"),
        ("size", "lots", "--max-retained-wal: expected a size such as 64MB or 1GiB, got 'lots'"),
        (
            "rate",
            "fast",
            "--max-wal-rate: expected a rate such as 20 (MB/s) or 512kB/s, got 'fast'",
        ),
        ("duration", "0", "--max-throttle: must be greater than zero, got '0'"),
    ]:
        key = line.split(":")[0]
        with pytest.raises(ConfigError) as refused:
            parse_value(kind, value, key)  # type: ignore[arg-type]
        assert str(refused.value) == line
