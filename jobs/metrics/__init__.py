"""`runbook exporter`: Prometheus metrics read from the targets' ledgers at each scrape."""
