"""`runbook exporter`: Prometheus metrics from every configured target's ledger and the
control database's rollouts (jobs/metrics/), read at each scrape."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from jobs.cli.options import Command
from jobs.cli.render import err, friendly
from jobs.lazy import lazy_callable

# prometheus_client and the readers load when the command runs, not for `runbook --help`
# (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from jobs.config import load_settings
else:
    load_settings = lazy_callable("jobs.config", "load_settings")


@click.command(cls=Command)
@click.option(
    "--port", default=9808, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface).",
)
@friendly
def exporter(port: int, host: str) -> None:
    """Serve Prometheus metrics on /metrics: runs, steps and backfill progress, read from every
    target's ledger at each scrape, and the rollouts of the control database, if there is one."""
    from jobs.fleet import groups
    from jobs.metrics.exporter import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings()
    control = groups.has_control(settings)
    if not control:  # a fleet's exporter may name the control database alone
        settings.require_any()
    thread = serve(settings, host, port)
    served = [*settings.names, *(["the control database's rollouts"] if control else [])]
    err.print(f"runbook exporter: serving http://{host}:{port}/metrics for {', '.join(served)}")
    thread.join()
