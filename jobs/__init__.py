"""runbook: production schema changes for Alembic projects, as queued, resumable jobs.

Domain logic lives here and does not import Celery; the Celery glue is in ``worker/``.
"""

__version__ = "0.1.0"
