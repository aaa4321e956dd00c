"""How runbook spells its values: durations (2s, 500ms, 1min), sizes (64MB, 1GiB) and rates
(20 = MB/s, 512kB/s), parsed the same way for runbook.toml (jobs/config.py's models, as
pydantic validators) and for command-line options and API arguments (``parse_value``); and
the one-line refusals those models give (``refuse``, ``Refusal``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationInfo
from pydantic_core import PydanticCustomError

from jobs.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min)?\s*$")

OWN_ERROR = "runbook"  # the error type of the lines this module words itself


def refuse(line: str) -> PydanticCustomError:
    """A validation error whose message is ``line`` exactly."""
    return PydanticCustomError(OWN_ERROR, "{line}", {"line": line})


@dataclass(frozen=True)
class Refusal:
    """The one line for a value of the wrong type or range: ``template`` with {key} and {value}."""

    template: str


def duration_ms(value: object, key: str) -> int:
    wrong = f"{key}: expected a duration such as 2s or 500ms, got {value!r}"
    if isinstance(value, bool):
        raise refuse(wrong)
    if isinstance(value, int | float):
        ms = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise refuse(wrong)
        scale = {"ms": 1, "s": 1000, "min": 60000, None: 1}[match.group(2)]
        ms = float(match.group(1)) * scale
    if ms <= 0:
        raise refuse(f"{key}: must be greater than zero, got {value!r}")
    return int(ms)


def milliseconds(value: object, info: ValidationInfo) -> int:
    """Parse 2000, "2s", "500ms" or "1min" into milliseconds."""
    return duration_ms(value, str(info.field_name))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kMGT]i?B|B)?\s*$")
_SIZE_SCALE = {None: 1, "B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_SIZE_SCALE.update({"kiB": 1 << 10, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40})


def size_of(value: object, key: str, what: str, examples: str = "64MB or 1GiB") -> int:
    wrong = f"{key}: expected {what} such as {examples}, got {value!r}"
    if isinstance(value, bool):
        raise refuse(wrong)
    if isinstance(value, int | float):
        size = float(value)
    else:
        match = _SIZE.match(str(value).removesuffix("/s"))
        if not match or match.group(2) not in _SIZE_SCALE:
            raise refuse(wrong)
        size = float(match.group(1)) * _SIZE_SCALE[match.group(2)]
    if size <= 0:
        raise refuse(f"{key}: must be greater than zero, got {value!r}")
    return int(size)


def size_bytes(value: object, info: ValidationInfo) -> int:
    """Parse 67108864, "64MB", "64MiB" or "1GiB" into bytes."""
    return size_of(value, str(info.field_name), "a size")


def rate_bytes(value: object, key: str) -> int:
    # A bare number, written as one or as text (a command line's), is MB a second.
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = f"{value}MB"
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        value = f"{value.strip()}MB"
    return size_of(value, key, "a rate", "20 (MB/s) or 512kB/s")


def rate(value: object, info: ValidationInfo) -> int:
    """Parse a WAL rate: a number of MB a second (20), or "20MB/s", "512kB/s"; bytes/s."""
    return rate_bytes(value, str(info.field_name))


_PARSERS = {
    "duration": duration_ms,
    "size": lambda value, key: size_of(value, key, "a size"),
    "rate": rate_bytes,
}


ValueKind = Literal["duration", "size", "rate"]


def parse_value(kind: ValueKind, value: object, key: str) -> int:
    """A value given outside runbook.toml (a command-line option, an API argument), parsed as
    runbook.toml parses its keys: a duration in ms, a size in bytes, a rate in bytes/s.
    ConfigError naming ``key`` when it is not one."""
    try:
        return int(_PARSERS[kind](value, key))
    except PydanticCustomError as exc:
        raise ConfigError(exc.message()) from None
