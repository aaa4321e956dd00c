"""Knowing before running: plan, lint, drift, doctor, rehearsal."""
