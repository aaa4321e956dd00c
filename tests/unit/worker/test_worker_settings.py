"""The worker parses runbook.toml again only when it changed (worker/settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import settings as worker_settings


def test_the_same_file_is_parsed_once_and_an_edit_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runbook.toml"
    path.write_text('[targets.a]\nurl = "postgresql://u@h/a"\n')
    monkeypatch.setenv("RUNBOOK_CONFIG", str(path))
    first = worker_settings.current()
    assert worker_settings.current() is first
    replaced = tmp_path / "new.toml"  # as tests and editors write it: a new file moved over
    replaced.write_text(
        '[targets.a]\nurl = "postgresql://u@h/a"\n[targets.b]\nurl = "postgresql://u@h/b"\n'
    )
    replaced.replace(path)
    assert worker_settings.current().names == ["a", "b"]
    monkeypatch.setenv("RUNBOOK_QUEUE", "another-queue")  # the environment counts too
    assert worker_settings.current().queue == "another-queue"
