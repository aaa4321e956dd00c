"""Backups: taken, proven restorable, copied, restored."""
