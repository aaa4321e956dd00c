"""The exporter reads the ledgers as `runbook status` does, with plain psycopg2: a scrape
brings in none of SQLAlchemy, Alembic, pglast, boto3, Celery or kombu (jobs/ledger/read.py
says why), so it costs the queries and little else. And a target nobody listens for reads as
down, with one line, instead of raising into the scrape. No server needed: the port is closed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

NOT_FOR_THE_EXPORTER = ("sqlalchemy", "alembic", "pglast", "boto3", "celery", "kombu", "rich")

SCRAPE = """
import sys
from jobs.config import load_settings
from jobs.metrics.exporter import LedgerCollector
metrics = {m.name: m for m in LedgerCollector(load_settings(sys.argv[1])).collect()}
(up,) = metrics["runbook_target_up"].samples
print(up.labels["target"], float(up.value))
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_scrape_reads_with_psycopg2_alone_and_a_closed_port_is_down(tmp_path: Path) -> None:
    config = tmp_path / "runbook.toml"
    url = f"postgresql://rb:secret@127.0.0.1:{closed_port()}/gone"
    config.write_text(f'[targets.gone]\nurl = "{url}"\n')
    proc = subprocess.run(
        [sys.executable, "-c", SCRAPE, str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    up, modules = proc.stdout.splitlines()
    assert up == "gone 0.0"
    assert "target gone is not scraped: target 'gone': database at 127.0.0.1" in proc.stderr
    assert "secret" not in proc.stderr
    loaded = set(modules.split())
    assert {"prometheus_client", "psycopg2", "jobs"} <= loaded
    assert sorted(loaded & set(NOT_FOR_THE_EXPORTER)) == []
