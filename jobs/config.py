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
from typing import Annotated, Any, Literal
from urllib.parse import quote, quote_plus

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from jobs.config_values import (
    OWN_ERROR,
    Refusal,
    milliseconds,
    rate,
    refuse,
    size_bytes,
)
from jobs.errors import ConfigError, UnknownTarget
from jobs.pg.url import PgURL, parse

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "runbook"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")

# Passwords seen by this process; redact() removes them from any text leaving it.
_SECRETS: set[str] = set()


def redact(text: str) -> str:
    """Return ``text`` with every known password replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, "***")
    return text


def normalize_url(raw: str, what: str = "database URL") -> PgURL:
    """Parse a PostgreSQL URL and pin the psycopg2 driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which runbook does not ship;
    users paste bare URLs, so they must mean psycopg2. Parsed without SQLAlchemy, as it
    parses (jobs/pg/url.py), so that reading the configuration stays quick.
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
    # Replication (jobs/pg/replication.py): the bounds a backfill waits on and a run checks.
    replicas: str = "check"
    max_replica_lag_ms: int = 2000
    max_replica_lag_bytes: int = 64 << 20
    max_retained_wal_bytes: int = 1 << 30
    max_wal_rate_bytes: int | None = None  # bytes of WAL a second; None: no bound
    throttle_check_ms: int = 250
    max_throttle_ms: int = 30 * 60_000
    replica_wait_ms: int = 5 * 60_000
    replica_urls: tuple[PgURL, ...] = field(default=(), repr=False)

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
    # [groups.NAME] and [control] as written, parsed by jobs/fleet/ when a command or a
    # rollout needs them: a typo there stops only the fleet commands.
    groups_raw: dict[str, Any] = field(default_factory=dict)
    control_raw: dict[str, Any] | None = None
    base_dir: Path = field(default_factory=Path.cwd)

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


# runbook.toml as declarative models. Each key's wrong value gets one line that says what the
# key must hold (a Refusal, jobs/config_values.py, or the validator's own message); _one_line
# turns pydantic's ValidationError, whose text spans several lines, into that line.


def _project_path(value: object, info: ValidationInfo) -> Path:
    """A path as written, relative ones taken from the directory of runbook.toml."""
    try:
        path = Path(str(value)).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        raise refuse(
            f"{info.field_name}: cannot expand {value!r} (unknown user); write the path out"
        ) from None
    base: Path = info.context["base"] if info.context else Path.cwd()
    return path if path.is_absolute() else base / path


def _blank_is_none(value: object) -> object:
    return None if value == "" else value


def _truthy_text(value: object) -> str | None:
    return str(value) if value else None


_Milliseconds = Annotated[int, BeforeValidator(milliseconds)]
_Bytes = Annotated[int, BeforeValidator(size_bytes)]
_Rate = Annotated[int, BeforeValidator(rate)]
_ProjectPath = Annotated[Path, BeforeValidator(_project_path)]
# Program names and the like: whatever TOML value is given, as its text.
_Text = Annotated[str, BeforeValidator(str)]
_OptionalText = Annotated[
    str | None, BeforeValidator(_blank_is_none), Refusal("{key} must be a string, got {value!r}")
]
_Flag = Annotated[bool, Refusal("{key} must be true or false, got {value!r}")]
_Count = Annotated[int, Field(ge=0), Refusal("{key} must be a whole number >= 0, got {value!r}")]
_PositiveCount = Annotated[
    int, Field(ge=1), Refusal("{key} must be a whole number >= 1, got {value!r}")
]


class _TargetTable(BaseModel):
    """One [targets.NAME] table, keyed as the user spells it; durations in milliseconds.

    Validate with ``context={"base": <directory of runbook.toml>}``: relative paths start
    there.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: _Text | None = None
    url_env: _Text | None = None
    alembic_ini: _ProjectPath | None = None
    backup_dir: _ProjectPath | None = None
    lock_timeout: _Milliseconds = 2000
    lock_retries: _Count = 8
    lock_retry_backoff: Annotated[
        float, Field(ge=0), Refusal("{key} must be seconds >= 0, got {value!r}")
    ] = 0.5
    statement_timeout: _Milliseconds | None = None
    health_url: Annotated[str | None, BeforeValidator(_truthy_text)] = None
    backup: _Flag = True
    pg_dump: _Text = "pg_dump"
    pg_restore: _Text = "pg_restore"
    version_table: _Text = "alembic_version"
    verify_restore: _Flag = True
    verify_restore_max_bytes: _Count = 1 << 30
    backup_copy_to: _OptionalText = None
    keep_backups: _PositiveCount = 10
    before_run: _OptionalText = None
    after_run: _OptionalText = None
    hook_timeout: _Milliseconds = 60_000
    require_rehearsal: _Flag = False
    lint_allow: Annotated[
        list[str], Refusal("{key}: expected a list of rule names, got {value!r}")
    ] = []
    preflight_wait: _Milliseconds = 30_000
    long_running: _Milliseconds = 60_000
    replicas: Annotated[
        Literal["check", "ignore", "require"],
        Refusal('{key} must be "check", "ignore" or "require", got {value!r}'),
    ] = "check"
    max_replica_lag: _Milliseconds = 2000
    max_replica_lag_bytes: _Bytes = 64 << 20
    max_retained_wal: _Bytes = 1 << 30
    max_wal_rate: _Rate | None = None
    throttle_check: _Milliseconds = 250
    max_throttle: _Milliseconds = 30 * 60_000
    replica_wait: _Milliseconds = 5 * 60_000
    replica_urls: Annotated[
        list[str], Refusal("{key}: expected a list of PostgreSQL URLs, got {value!r}")
    ] = []

    # Parsed by normalize_url once the keys above are valid; the password stays on this side.
    _url: PgURL | None = PrivateAttr(default=None)
    _replica_urls: tuple[PgURL, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _one_database(self) -> _TargetTable:
        if (self.url is None) == (self.url_env is None):
            raise refuse('give exactly one of url = "..." or url_env = "VAR"')
        if self.url_env is not None:
            raw = os.environ.get(self.url_env)
            if not raw:
                raise refuse(f"environment variable {self.url_env} (url_env) is not set")
            what = f"URL in ${self.url_env}"
        else:
            raw, what = self.url, "url"
        try:
            self._url = normalize_url(str(raw), what)
            self._replica_urls = tuple(
                normalize_url(u, f"replica_urls[{i}]") for i, u in enumerate(self.replica_urls)
            )
        except ConfigError as exc:
            raise refuse(str(exc)) from None
        return self

    def target(self, name: str) -> Target:
        assert self._url is not None  # set by _one_database
        return Target(
            name=name,
            url=self._url,
            alembic_ini=(self.alembic_ini or _repo_alembic_ini()).absolute(),
            backup_dir=(self.backup_dir or _default_backup_dir()).absolute(),
            lock_timeout_ms=self.lock_timeout,
            lock_retries=self.lock_retries,
            lock_retry_backoff_s=self.lock_retry_backoff,
            statement_timeout_ms=self.statement_timeout,
            health_url=self.health_url,
            backup=self.backup,
            pg_dump=self.pg_dump,
            pg_restore=self.pg_restore,
            version_table=self.version_table,
            verify_restore=self.verify_restore,
            verify_restore_max_bytes=self.verify_restore_max_bytes,
            backup_copy_to=self.backup_copy_to,
            keep_backups=self.keep_backups,
            before_run=self.before_run,
            after_run=self.after_run,
            hook_timeout_s=self.hook_timeout / 1000,
            require_rehearsal=self.require_rehearsal,
            lint_allow=tuple(self.lint_allow),
            preflight_wait_s=self.preflight_wait / 1000,
            long_running_s=self.long_running / 1000,
            replicas=self.replicas,
            max_replica_lag_ms=self.max_replica_lag,
            max_replica_lag_bytes=self.max_replica_lag_bytes,
            max_retained_wal_bytes=self.max_retained_wal,
            max_wal_rate_bytes=self.max_wal_rate,
            throttle_check_ms=self.throttle_check,
            max_throttle_ms=self.max_throttle,
            replica_wait_ms=self.replica_wait,
            replica_urls=self._replica_urls,
        )


class _ConfigFile(BaseModel):
    """runbook.toml's top level: [targets.NAME] tables, each validated on its own; [groups.NAME]
    and [control] for fleets (jobs/fleet/groups.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    targets: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    control: dict[str, Any] | None = None


_TARGET_KEYS = set(_TargetTable.model_fields)
# The top-level sections runbook.toml may hold.
_SECTIONS = set(_ConfigFile.model_fields)


def _unknown_keys(error: ValidationError) -> list[str]:
    """The keys a model refused as unknown (extra="forbid"), sorted."""
    return sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")


def _one_line(error: ValidationError, raw: dict[str, object]) -> str:
    """The first thing wrong in target table ``raw``, as one line: an unknown key first, then
    the keys in the order _TargetTable declares them, then the URL."""
    unknown = _unknown_keys(error)
    if unknown:
        known = ", ".join(sorted(_TARGET_KEYS))
        return f"unknown option {unknown[0]!r} (known: {known})"
    first = error.errors(include_url=False)[0]
    if first["type"] == OWN_ERROR:
        return str(first["msg"])
    key = str(first["loc"][0])
    refusals = [m for m in _TargetTable.model_fields[key].metadata if isinstance(m, Refusal)]
    template = refusals[0].template if refusals else "{key} is not valid, got {value!r}"
    return template.format(key=key, value=raw[key])


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
    try:
        table = _TargetTable.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_one_line(exc, raw)}") from None
    return table.target(name)


def target_from_table(name: str, raw: dict[str, object], base: Path) -> Target:
    """A target from a [targets.NAME]-shaped table (a catalog group's row, jobs/fleet/groups.py,
    or the control database); ConfigError with the table's one line when it is wrong."""
    return _build_target(name, raw, base)


def target_keys() -> set[str]:
    """The keys a [targets.NAME] table may hold."""
    return set(_TARGET_KEYS)


_UNREADABLE = "; make it a readable file or point RUNBOOK_CONFIG at one"


def _read_toml(config_path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: invalid TOML ({exc}); fix the file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{config_path}: is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot be read ({exc.strerror}){_UNREADABLE}") from None


def _file_targets(config_path: Path) -> tuple[dict[str, Target], dict[str, str], _ConfigFile]:
    """The targets of runbook.toml, apart from them the broken ones with their line, and the
    file's sections as read."""
    data = _read_toml(config_path)
    try:
        config = _ConfigFile.model_validate(data)
    except ValidationError as exc:
        unknown = _unknown_keys(exc)
        if unknown:  # a typo such as [target.prod] would otherwise configure nothing, silently
            raise ConfigError(
                f"{config_path}: unknown section {unknown[0]!r} (known: "
                f"{', '.join(sorted(_SECTIONS))}); targets go in [targets.NAME]"
            ) from None
        where = str(exc.errors()[0]["loc"][0])
        shape = (
            "a table: [control] url = ..." if where == "control" else f"a table of [{where}.NAME]"
        )
        raise ConfigError(f"{config_path}: '{where}' must be {shape}") from None
    targets: dict[str, Target] = {}
    broken: dict[str, str] = {}
    for name, raw in config.targets.items():
        try:
            if not isinstance(raw, dict):
                raise ConfigError(f"{config_path}: [targets.{name}] must be a table")
            targets[name] = _build_target(name, raw, config_path.parent.absolute())
        except ConfigError as exc:
            broken[name] = str(exc)
    return targets, broken, config


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read runbook.toml (``RUNBOOK_CONFIG`` or ./runbook.toml), else ``DATABASE_URL``."""
    explicit = path or os.environ.get("RUNBOOK_CONFIG")
    config_path = Path(explicit or "runbook.toml").expanduser()
    broker = os.environ.get("CELERY_BROKER_URL", DEFAULT_BROKER)
    targets: dict[str, Target] = {}
    broken: dict[str, str] = {}
    sections = _ConfigFile()
    try:
        present = config_path.exists()
    except OSError as exc:  # a directory on the way that may not be searched
        raise ConfigError(f"{config_path}: cannot be read ({exc.strerror}){_UNREADABLE}") from None
    if present:
        targets, broken, sections = _file_targets(config_path)
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
        result_backend=os.environ.get("CELERY_RESULT_BACKEND", broker),
        queue=os.environ.get("RUNBOOK_QUEUE", DEFAULT_QUEUE),
        source=source,
        broken=broken,
        groups_raw=sections.groups,
        control_raw=sections.control,
        base_dir=config_path.parent.absolute() if present else Path.cwd(),
    )
