"""Backfills: batched, resumable UPDATEs walked by a unique key."""
