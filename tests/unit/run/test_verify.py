"""Schema fingerprints and the invalid indexes a failed CREATE INDEX CONCURRENTLY leaves, read
from the lines jobs/run/verify.py `schema_lines` returns; no database."""

from __future__ import annotations

import hashlib

from jobs.run.verify import digest, invalid_indexes

# As schema_lines formats an index: 'index ' || pg_get_indexdef() || ' valid=' || indisvalid.
LINES = [
    "index CREATE INDEX ix_ok ON public.orders USING btree (customer_id) valid=true",
    "index CREATE INDEX ix_half ON public.orders USING btree (note) valid=false",
    'index CREATE UNIQUE INDEX "Odd" ON "Shop"."Items" USING btree (code) valid=false',
    "index CREATE INDEX ix_part ON ONLY public.events USING btree (at) valid=false",
    "column public.orders.note text null",
]


def test_only_invalid_indexes_are_named_with_their_schema() -> None:
    assert invalid_indexes(LINES) == ["public.ix_half", '"Shop"."Odd"', "public.ix_part"]
    assert invalid_indexes(LINES[:1] + LINES[-1:]) == []


def test_the_fingerprint_is_the_sha256_of_the_lines_in_order() -> None:
    assert digest(LINES) == hashlib.sha256("\n".join(LINES).encode()).hexdigest()
    assert digest(LINES) != digest(list(reversed(LINES)))  # schema_lines sorts them first
    assert digest([]) == hashlib.sha256(b"").hexdigest()
