"""The Celery side of runbook: the application, its settings and thin task wrappers."""
