"""The line preflight says about sessions in the way, from the rows of its lock query
(jobs/run/preflight.py `blockers`); no database."""

from __future__ import annotations

from jobs.run.preflight import _describe


def session(pid: int, age: int, relation: str = "public.orders") -> dict[str, object]:
    return {
        "pid": pid,
        "who": "app",
        "state": "idle in transaction",
        "age": age,
        "relation": relation,
    }


def test_the_oldest_session_is_named_and_the_others_counted() -> None:
    # blockers() orders them oldest first.
    assert _describe([session(4242, 930)]) == (
        "session 4242 (app, idle in transaction, 930s) holds a lock on public.orders"
    )
    assert _describe([session(4242, 930), session(77, 12, "public.items"), session(78, 3)]) == (
        "session 4242 (app, idle in transaction, 930s) holds a lock on public.orders (and 2 more)"
    )
