"""Targets and settings: runbook.toml, or DATABASE_URL alone.

A target's URL (with its password) lives only here, on the side that reads the
configuration. Everything that leaves the process — task arguments, results, the ledger,
logs — names the target instead; ``redact`` scrubs any password that slips into a message.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus

from jobs.errors import ConfigError, UnknownTarget
from jobs.pg.url import PgURL, parse

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "runbook"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min)?\s*$")

# Passwords seen by this process; redact() removes them from any text leaving it.
_SECRETS: set[str] = set()


def redact(text: str) -> str:
    """Return ``text`` with every known password replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, "***")
    return text


def _duration_ms(value: object, what: str) -> int:
    """Parse 2000, "2s", "500ms" or "1min" into milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration such as 2s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        ms = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(f"{what}: expected a duration such as 2s or 500ms, got {value!r}")
        scale = {"ms": 1, "s": 1000, "min": 60000, None: 1}[match.group(2)]
        ms = float(match.group(1)) * scale
    if ms <= 0:
        raise ConfigError(f"{what}: must be greater than zero, got {value!r}")
    return int(ms)


def _names(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: expected a list of rule names, got {value!r}")
    return tuple(value)


def normalize_url(raw: str, what: str = "database URL") -> PgURL:
    """Parse a PostgreSQL URL and pin the psycopg2 driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which runbook does not ship;
    users paste bare URLs, so they must mean psycopg2. Parsed without SQLAlchemy, as it
    parses (jobs/pgurl.py), so that reading the configuration stays quick.
    """
    hint = "expected postgresql://user:password@host:port/dbname"
    try:
        url = parse(raw.strip())
    except ValueError:
        raise ConfigError(f"{what} is malformed ({hint})") from None
    backend = url.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend != "postgresql":
        raise ConfigError(f"{what} is not a PostgreSQL URL ({hint})")
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg2"):
        raise ConfigError(f"{what} names driver {url.drivername!r}; runbook uses psycopg2 ({hint})")
    if not url.database:
        raise ConfigError(f"{what} names no database ({hint})")
    try:
        if url.port is not None and not 0 < url.port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{what} has an invalid port ({hint})") from None
    if url.password:
        _SECRETS.add(str(url.password))
    return url.set(drivername="postgresql+psycopg2")


@dataclass(frozen=True)
class Target:
    """A database runbook may touch, by name."""

    name: str
    url: PgURL = field(repr=False)
    alembic_ini: Path
    backup_dir: Path
    lock_timeout_ms: int = 2000
    lock_retries: int = 8
    lock_retry_backoff_s: float = 0.5
    statement_timeout_ms: int | None = None
    health_url: str | None = None
    backup: bool = True
    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"
    version_table: str = "alembic_version"
    verify_restore: bool = True
    verify_restore_max_bytes: int = 1 << 30
    backup_copy_to: str | None = None
    keep_backups: int = 10
    before_run: str | None = None
    after_run: str | None = None
    hook_timeout_s: float = 60.0
    require_rehearsal: bool = False
    lint_allow: tuple[str, ...] = ()
    preflight_wait_s: float = 30.0
    long_running_s: float = 60.0

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, fit for messages."""
        return self.url.render_as_string(hide_password=True)

    @property
    def where(self) -> str:
        """host:port/db, for messages."""
        return f"{self.url.host or 'localhost'}:{self.url.port or 5432}/{self.url.database}"


@dataclass(frozen=True)
class Settings:
    """Everything runbook reads from its configuration file and the environment."""

    targets: dict[str, Target]
    broker_url: str
    result_backend: str
    queue: str
    source: str
    # Targets whose entry is wrong, each with the one line that says what to fix. They are
    # kept apart so that one typo stops only its own target, not every other one.
    broken: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every configured target's name, broken ones included, sorted."""
        return sorted({*self.targets, *self.broken})

    def require_any(self) -> None:
        """Raise ConfigError when no target at all is configured."""
        if not self.names:
            raise ConfigError(
                f"no targets are configured ({self.source}); add [targets.NAME] to "
                "runbook.toml or set DATABASE_URL"
            )

    def target(self, name: str | None) -> Target:
        """The named target, or the only / ``default`` one when no name is given."""
        if name is None:
            self.require_any()
            if "default" in self.names:
                name = "default"
            elif len(self.names) == 1:
                name = self.names[0]
            else:
                names = ", ".join(self.names)
                raise ConfigError(f"several targets are configured ({names}); pass --target NAME")
        if name in self.broken:
            raise ConfigError(self.broken[name])
        if name not in self.targets:
            known = ", ".join(self.names) or "none"
            raise UnknownTarget(
                f"unknown target {name!r} (configured: {known}); add [targets.{name}] to "
                "runbook.toml or pass one of those"
            )
        return self.targets[name]


# The top-level sections runbook.toml may hold.
_SECTIONS = {"targets"}

_TARGET_KEYS = {
    "url",
    "url_env",
    "alembic_ini",
    "backup_dir",
    "lock_timeout",
    "lock_retries",
    "lock_retry_backoff",
    "statement_timeout",
    "health_url",
    "backup",
    "pg_dump",
    "pg_restore",
    "version_table",
    "verify_restore",
    "verify_restore_max_bytes",
    "backup_copy_to",
    "keep_backups",
    "before_run",
    "after_run",
    "hook_timeout",
    "require_rehearsal",
    "lint_allow",
    "preflight_wait",
    "long_running",
}


def _repo_alembic_ini() -> Path:
    """The alembic.ini of the working directory, else the reference app's next to jobs/."""
    here = Path.cwd() / "alembic.ini"
    return here if here.exists() else Path(__file__).resolve().parent.parent / "alembic.ini"


def _default_backup_dir() -> Path:
    return Path(os.environ.get("RUNBOOK_BACKUP_DIR", "backups")).absolute()


def _build_target(name: str, raw: dict[str, object], base: Path) -> Target:
    where = f"target {name!r}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: names may hold letters, digits, '_', '.', '-' only")
    unknown = sorted(set(raw) - _TARGET_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {unknown[0]!r} (known: {', '.join(sorted(_TARGET_KEYS))})"
        )
    if ("url" in raw) == ("url_env" in raw):
        raise ConfigError(f'{where}: give exactly one of url = "..." or url_env = "VAR"')
    if "url_env" in raw:
        var = str(raw["url_env"])
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"{where}: environment variable {var} (url_env) is not set")
        url = normalize_url(value, f"{where}: URL in ${var}")
    else:
        url = normalize_url(str(raw["url"]), f"{where}: url")

    def path(key: str, default: Path) -> Path:
        value = raw.get(key)
        if value is None:
            return default
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (base / p)

    def integer(key: str, default: int, minimum: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}: {key} must be a whole number >= {minimum}, got {value!r}")
        return value

    backoff = raw.get("lock_retry_backoff", 0.5)
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or backoff < 0:
        raise ConfigError(f"{where}: lock_retry_backoff must be seconds >= 0, got {backoff!r}")

    def flag(key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value

    def optional_text(key: str) -> str | None:
        value = raw.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value

    backup = flag("backup", True)
    statement_timeout = raw.get("statement_timeout")
    return Target(
        name=name,
        url=url,
        alembic_ini=path("alembic_ini", _repo_alembic_ini()).absolute(),
        backup_dir=path("backup_dir", _default_backup_dir()).absolute(),
        lock_timeout_ms=_duration_ms(raw.get("lock_timeout", "2s"), f"{where}: lock_timeout"),
        lock_retries=integer("lock_retries", 8, 0),
        lock_retry_backoff_s=float(backoff),
        statement_timeout_ms=(
            None
            if statement_timeout is None
            else _duration_ms(statement_timeout, f"{where}: statement_timeout")
        ),
        health_url=str(raw["health_url"]) if raw.get("health_url") else None,
        backup=backup,
        pg_dump=str(raw.get("pg_dump", "pg_dump")),
        pg_restore=str(raw.get("pg_restore", "pg_restore")),
        version_table=str(raw.get("version_table", "alembic_version")),
        verify_restore=flag("verify_restore", True),
        verify_restore_max_bytes=integer("verify_restore_max_bytes", 1 << 30, 0),
        backup_copy_to=optional_text("backup_copy_to"),
        keep_backups=integer("keep_backups", 10, 1),
        before_run=optional_text("before_run"),
        after_run=optional_text("after_run"),
        hook_timeout_s=_duration_ms(raw.get("hook_timeout", "60s"), f"{where}: hook_timeout")
        / 1000,
        require_rehearsal=flag("require_rehearsal", False),
        lint_allow=_names(raw.get("lint_allow", []), f"{where}: lint_allow"),
        preflight_wait_s=_duration_ms(raw.get("preflight_wait", "30s"), f"{where}: preflight_wait")
        / 1000,
        long_running_s=_duration_ms(raw.get("long_running", "60s"), f"{where}: long_running")
        / 1000,
    )


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read runbook.toml (``RUNBOOK_CONFIG`` or ./runbook.toml), else ``DATABASE_URL``."""
    explicit = path or os.environ.get("RUNBOOK_CONFIG")
    config_path = Path(explicit or "runbook.toml").expanduser()
    broker = os.environ.get("CELERY_BROKER_URL", DEFAULT_BROKER)
    backend = os.environ.get("CELERY_RESULT_BACKEND", broker)
    queue = os.environ.get("RUNBOOK_QUEUE", DEFAULT_QUEUE)
    targets: dict[str, Target] = {}
    broken: dict[str, str] = {}
    unreadable = "; make it a readable file or point RUNBOOK_CONFIG at one"
    try:
        present = config_path.exists()
    except OSError as exc:  # a directory on the way that may not be searched
        raise ConfigError(f"{config_path}: cannot be read ({exc.strerror}){unreadable}") from None
    if present:
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML ({exc}); fix the file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{config_path}: is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{config_path}: cannot be read ({exc.strerror}){unreadable}"
            ) from None
        unknown = sorted(set(data) - _SECTIONS)
        if unknown:  # a typo such as [target.prod] would otherwise configure nothing, silently
            raise ConfigError(
                f"{config_path}: unknown section {unknown[0]!r} (known: "
                f"{', '.join(sorted(_SECTIONS))}); targets go in [targets.NAME]"
            )
        raw_targets = data.get("targets", {})
        if not isinstance(raw_targets, dict):
            raise ConfigError(f"{config_path}: 'targets' must be a table of [targets.NAME]")
        for name, raw in raw_targets.items():
            try:
                if not isinstance(raw, dict):
                    raise ConfigError(f"{config_path}: [targets.{name}] must be a table")
                targets[name] = _build_target(name, raw, config_path.parent.absolute())
            except ConfigError as exc:
                broken[name] = str(exc)
        source = str(config_path)
    elif explicit:
        raise ConfigError(f"configuration file {config_path} does not exist (RUNBOOK_CONFIG)")
    else:
        source = "DATABASE_URL"
        if os.environ.get("DATABASE_URL"):
            try:
                targets["default"] = _build_target(
                    "default", {"url_env": "DATABASE_URL"}, Path.cwd()
                )
            except ConfigError as exc:
                broken["default"] = str(exc)
    return Settings(
        targets=targets,
        broker_url=broker,
        result_backend=backend,
        queue=queue,
        source=source,
        broken=broken,
    )
