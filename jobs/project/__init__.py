"""The Alembic project: its scripts and revisions, and running its env.py."""
