"""`runbook exporter` refuses a port it cannot use in one line and exit 2, before serving:
not a number, out of range, already taken, or a host that is not this machine's. No database
is needed for that (its one target is on a closed port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def exporter(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.argv = ['runbook', 'exporter', *{list(args)!r}]; from jobs.cli.commands import run; run()"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, RUNBOOK_CONFIG=str(config)),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "runbook.toml"
    path.write_text('[targets.t]\nurl = "postgresql://rb:pw@127.0.0.1:1/db"\n')
    return path


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--port", "abc"), "Invalid value for '--port': 'abc' is not a valid integer range"),
        (("--port", "0"), "Invalid value for '--port': 0 is not in the range 1<=x<=65535"),
        (("--port", "70000"), "Invalid value for '--port': 70000 is not in the range"),
        (("--host", "no-such-host.invalid", "--port", "9"), "cannot listen on no-such-host"),
    ],
)
def test_a_bad_port_or_host_is_one_line_and_exit_2(
    config: Path, args: tuple[str, ...], says: str
) -> None:
    proc = exporter(config, *args)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("runbook: error: ") and says in line, line


def test_a_port_in_use_is_one_line_and_exit_2(config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = exporter(config, "--port", str(port))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"runbook: error: cannot listen on 127.0.0.1:{port} ("), line
    assert "pick a free --port" in line
