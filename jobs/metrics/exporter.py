"""The Prometheus collector over every configured target's ledger (and the control database's
rollouts, when there is one), and its HTTP server.

No background polling: each scrape of /metrics calls ``LedgerCollector.collect``, which reads
the ledgers then and there (jobs/metrics/facts.py), so a value is never older than the scrape
and an exporter nobody scrapes asks the databases nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from jobs.config import Settings
from jobs.errors import ExporterUnavailable
from jobs.metrics import facts
from jobs.metrics.families import families

log = logging.getLogger("runbook.exporter")


class LedgerCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._down: dict[str, str | None] = {}  # each source's last reason for being down

    def describe(self) -> list[GaugeMetricFamily]:
        # Nothing is read when the collector is registered, only at scrapes.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        found = facts.read_all(self.settings)
        control = facts.read_control(self.settings)
        for f in found:  # a line when a target goes down or comes back, not at every scrape
            self._note(f"target {f.target}", f.error)
        if control is not None:
            self._note("the control database", control.error)
        yield from families(found, control=control)

    def _note(self, what: str, error: str | None) -> None:
        if self._down.get(what, "") != error:
            if error:
                log.warning("%s is not scraped: %s", what, error)
            elif what in self._down:
                log.warning("%s is scraped again", what)
        self._down[what] = error


def serve(settings: Settings, host: str, port: int) -> threading.Thread:
    """Serve /metrics on ``host``:``port`` in a thread; ExporterUnavailable when it cannot
    listen there (the port is taken, the host is not this machine's)."""
    registry = CollectorRegistry()
    registry.register(LedgerCollector(settings))
    try:
        _server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ExporterUnavailable(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick a free --port "
            "or another --host"
        ) from None
    return thread
