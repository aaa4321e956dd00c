"""A primary and a streaming standby of a test's own, for replica-aware tests.

The primary is a private PostgreSQL (trust on 127.0.0.1, ``wal_level = logical`` so that tests
may create logical slots); the standby is ``pg_basebackup -R`` of it into a second data
directory, started on its own port with ``application_name = standby1``. Lag is injected with
``pg_wal_replay_pause()`` on the standby and released with ``pg_wal_replay_resume()``.
Both run as the postgres OS user (initdb refuses root) and are stopped, data removed, at the end.

Importing this module does not import pytest (bench/bench_replica.py starts the same pair):
only a test that cannot start one reaches conftest's ``missing``.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2

STANDBY_NAME = "standby1"


def unavailable() -> str | None:
    """Why this machine cannot start a primary and a standby, or None."""
    if not glob.glob("/usr/lib/postgresql/*/bin") or not shutil.which("runuser"):
        return "no PostgreSQL server binaries to start a primary and a standby"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg(*cmd: str, cwd: Path) -> None:
    done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")


class Server:
    """One PostgreSQL server of the pair: its port, data directory and log."""

    def __init__(self, bin_dir: Path, root: Path, name: str) -> None:
        self.bin = bin_dir
        self.root = root
        self.data = root / name
        self.log = root / f"{name}.log"
        self.port = _free_port()

    def start(self) -> None:
        _as_pg(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
            cwd=self.root,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "stop",
            ],
            capture_output=True,
            cwd=self.root,
        )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> Any:
        conn = psycopg2.connect(self.url(dbname), connect_timeout=5)
        conn.autocommit = True
        return conn

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()


class ReplicatedPostgres:
    """A private primary with one streaming standby (``standby1``)."""

    def __init__(self) -> None:
        problem = unavailable()
        if problem:
            from tests.integration.conftest import missing  # pytest's skip: tests only

            missing(problem)
        bin_dir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.root = Path(tempfile.mkdtemp(prefix="rb-repl-", dir="/tmp"))
        self.root.chmod(0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.primary = Server(bin_dir, self.root, "primary")
        self.standby = Server(bin_dir, self.root, "standby")
        _as_pg(
            str(bin_dir / "initdb"),
            "-D",
            str(self.primary.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            cwd=self.root,
        )
        with (self.primary.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n"
                "wal_keep_size = 0\nfsync = off\nsynchronous_commit = off\n"
                "wal_receiver_status_interval = 1s\nhot_standby_feedback = off\n"
                # The backfill would wait for a vacuum of its table as it waits for a replica
                # (jobs/backfill/pacing.py), and name the vacuum: the tests ask for the replica.
                "autovacuum = off\n"
            )
        self.primary.start()
        _as_pg(
            str(bin_dir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.data),
            "-R",
            "-X",
            "stream",
            "-d",
            f"application_name={STANDBY_NAME}",
            cwd=self.root,
        )
        self.standby.start()
        self.wait_streaming()

    def wait_streaming(self, timeout_s: float = 30) -> None:
        """Until the primary sees standby1 streaming."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.primary.sql(
                f"SELECT state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
            )
            if rows and rows[0][0] == "streaming":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the standby did not stream:\n{self.standby.log.read_text()[-2000:]}")

    def pause_replay(self) -> None:
        self.standby.sql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.standby.sql("SELECT pg_wal_replay_resume()")

    def lag_bytes(self) -> int | None:
        """How far the standby's replay is behind the primary's WAL, as the primary sees it."""
        rows = self.primary.sql(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
            f"FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def stop(self) -> None:
        self.standby.stop("immediate")
        self.primary.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
