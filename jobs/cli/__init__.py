"""The runbook command."""
