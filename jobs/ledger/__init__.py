"""The ledger: runbook's own schema in each target, one module per table family."""
