"""Linting rendered migration SQL with squawk.

How squawk is run (the choices, and why):

* Alembic's framing is linted as rendered, **without** ``--assume-in-transaction``. The
  offline output wraps each revision in ``BEGIN;`` … ``COMMIT;`` and shows an
  ``autocommit_block()`` as ``COMMIT;`` … ``BEGIN;``, exactly what runs online with
  ``transaction_per_migration``. So squawk sees which statements really run outside a
  transaction (``prefer-robust-stmts`` then warns that they cannot be rerun after a crash),
  and a ``CONCURRENTLY`` left inside one is caught (``ban-concurrent-index-creation-in-
  transaction``); ``--assume-in-transaction`` would add a second, imaginary transaction
  around Alembic's own and flag every ``BEGIN``/``COMMIT`` as ``transaction-nesting``.
* Alembic's bookkeeping (``CREATE TABLE alembic_version``, its ``INSERT``/``UPDATE``) is
  blanked out before linting; blanking keeps squawk's line numbers valid for the rendered SQL.
* ``require-lock-timeout`` is excluded: runbook sets ``lock_timeout`` on every migration
  session. ``require-statement-timeout`` is excluded when the target sets ``statement_timeout``
  (jobs/insight/plan.py excluded_rules says why only then).
* ``ban-add-enum-value`` (opt-in in squawk) is included: an added ENUM value cannot be
  removed, the reason a rollback becomes a restore.
* ``--pg-version`` is the live server's, so version-dependent rules judge the real server.
* squawk 2.x reports every rule as a warning. runbook raises to ``error`` the rules whose
  statement blocks production traffic for a whole table scan or rewrite, or cannot run at all
  (``ERROR_RULES``); ``lint_errors`` counts those.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from jobs.errors import LintFailed, LintUnavailable
from jobs.insight.parse import Statement, is_bookkeeping, statements

SQUAWK_TIMEOUT_S = 120
SQUAWK_INCLUDE = ("ban-add-enum-value",)
SQUAWK_EXCLUDE = ("require-lock-timeout",)

# Rules whose finding means a long lock on a live table, a rewrite, or a statement that fails.
ERROR_RULES = frozenset(
    {
        "syntax-error",
        "require-concurrent-index-creation",
        "require-concurrent-index-deletion",
        "adding-not-nullable-field",
        "adding-foreign-key-constraint",
        "constraint-missing-not-valid",
        "adding-required-field",
        "adding-field-with-default",
        "adding-serial-primary-key-field",
        "changing-column-type",
        "disallowed-unique-constraint",
        "ban-concurrent-index-creation-in-transaction",
        "ban-uncommitted-transaction",
    }
)


class Finding(TypedDict):
    rule: str
    message: str
    help: str | None
    level: str
    line: int | None
    statement: str


# -- lint -------------------------------------------------------------------------------------


def squawk_binary() -> str:
    """The squawk executable next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file():
        return str(beside)
    found = shutil.which("squawk")
    if not found:
        raise LintUnavailable("squawk not found; pip install squawk-cli")
    return found


def lint_text(sql: str, version_table: str = "alembic_version") -> str:
    """``sql`` with Alembic's version-table statements blanked, every position kept."""
    chars = list(sql)
    for stmt in statements(sql):
        if is_bookkeeping(stmt, version_table):
            end = stmt.end + 1 if sql[stmt.end : stmt.end + 1] == ";" else stmt.end
            for i in range(stmt.start, end):
                if chars[i] != "\n":
                    chars[i] = " "
    return "".join(chars)


def _squawk_args(pg_version: str | None, exclude: Iterable[str]) -> list[str]:
    args = ["--reporter", "json", "--no-error-on-unmatched-pattern"]
    args += [f"--include={rule}" for rule in SQUAWK_INCLUDE]
    args += [f"--exclude={rule}" for rule in (*SQUAWK_EXCLUDE, *exclude)]
    if pg_version:
        args.append(f"--pg-version={pg_version}")
    return args


def _run_squawk(files: list[str], cwd: str, args: list[str]) -> list[dict[str, Any]]:
    """squawk's JSON report on ``files``; it exits 1 when it finds something, which is fine."""
    try:
        proc = subprocess.run(
            [squawk_binary(), *args, *files],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=SQUAWK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LintFailed(f"squawk did not finish in {SQUAWK_TIMEOUT_S} s") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[0] if lines else f"exit code {proc.returncode}"
        raise LintFailed(f"squawk gave no report ({why})") from None
    if not isinstance(report, list):
        raise LintFailed("squawk gave no report (unexpected JSON)")
    return report


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


def _statement_at(sql: str, stmts: list[Statement], line: int, column: int) -> str:
    """The statement holding squawk's 0-based (line, column), else that line of ``sql``."""
    lines = sql.split("\n")
    if not 0 <= line < len(lines):
        return ""
    offset = sum(len(x) + 1 for x in lines[:line]) + column
    for stmt in reversed(stmts):
        if stmt.start <= offset <= stmt.end:
            return _one_line(stmt.text)
    return _one_line(lines[line])


def _finding(raw: Mapping[str, Any], sql: str, stmts: list[Statement]) -> Finding:
    rule = str(raw.get("rule_name") or "unknown")
    level = str(raw.get("level") or "warning").lower()
    line, column = raw.get("line"), raw.get("column")
    return Finding(
        rule=rule,
        message=str(raw.get("message") or ""),
        help=raw.get("help"),
        level="error" if rule in ERROR_RULES else level,
        line=line + 1 if isinstance(line, int) else None,
        statement=(
            _statement_at(sql, stmts, line, column)
            if isinstance(line, int) and isinstance(column, int)
            else ""
        ),
    )


def lint(
    scripts: Mapping[str, str],
    *,
    version_table: str = "alembic_version",
    pg_version: str | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, list[Finding]]:
    """squawk's findings for each named SQL script (one squawk run for all of them)."""
    args = _squawk_args(pg_version, exclude)
    keys = list(scripts)
    texts = {key: lint_text(scripts[key], version_table) for key in keys}
    findings: dict[str, list[Finding]] = {key: [] for key in keys}
    if not keys:
        return findings
    with tempfile.TemporaryDirectory(prefix="runbook-lint-") as tmp:
        files = []
        for i, key in enumerate(keys):
            (Path(tmp) / f"{i:04d}.sql").write_text(texts[key], encoding="utf-8")
            files.append(f"{i:04d}.sql")
        report = _run_squawk(files, tmp, args)
    stmts = {key: statements(texts[key]) for key in keys}
    for raw in report:
        try:
            key = keys[int(Path(str(raw.get("file", ""))).stem)]
        except (ValueError, IndexError):
            continue
        findings[key].append(_finding(raw, texts[key], stmts[key]))
    for found in findings.values():
        found.sort(key=lambda f: f["line"] or 0)
    return findings
