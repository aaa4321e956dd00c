"""Sample data for the reference schema at its initial revision (w5x6y7z8a9b0).

Seeded before the later revisions run, so that each one meets real rows: monitoring_deadline
events for the ENUM data update, audit logs for the foreign-key change, staffs for the JSONB
fields and a large_table worth batching.

    from migrations.seed import seed
    with engine.begin() as connection:
        seed(connection, large_rows=100_000)

``connection`` is a SQLAlchemy ``Connection`` or a DB-API (psycopg2) connection. The rows go
into the caller's transaction: the caller commits.
"""

from typing import Any

STAFFS = [
    ("Sato Hanako", "hanako.sato@example.com"),
    ("Suzuki Taro", "taro.suzuki@example.com"),
    ("Takahashi Yui", "yui.takahashi@example.com"),
    ("Tanaka Ken", "ken.tanaka@example.com"),
]


def _statements(large_rows: int) -> list[str]:
    # Plain SQL without bind parameters, so it runs the same through SQLAlchemy and psycopg2;
    # the only variable is an int, formatted after int() validation. No '%' anywhere, which
    # psycopg2 would read as a placeholder.
    staff_values = ",\n    ".join(f"('{name}', '{email}')" for name, email in STAFFS)
    return [
        f"INSERT INTO staffs (name, email) VALUES\n    {staff_values}",
        # Two audit entries per staff, spread over the last days.
        """
        INSERT INTO audit_logs (staff_id, action, created_at)
        SELECT s.id, a.action, now() - (n || ' days')::interval
        FROM staffs s
        CROSS JOIN (VALUES ('login', 1), ('update_plan', 2)) AS a(action, n)
        """,
        # Every staff gets one event of each type, monitoring_deadline included: those are
        # the rows that x6y7z8a9b0c1 moves to next_plan_start_date.
        """
        INSERT INTO calendar_events (staff_id, event_type, event_date)
        SELECT s.id, t.event_type::calendar_event_type, current_date + t.days_ahead
        FROM staffs s
        CROSS JOIN (VALUES ('renewal_deadline', 30),
                           ('monitoring_deadline', 14),
                           ('custom', 7)) AS t(event_type, days_ahead)
        """,
        f"""
        INSERT INTO large_table (payload)
        SELECT 'payload-' || g || '-' || md5(g::text)
        FROM generate_series(1, {int(large_rows)}) AS g
        """,
    ]


def seed(connection: Any, large_rows: int = 5000) -> None:
    """Insert sample rows; ``large_rows`` rows go into large_table."""
    if large_rows < 0:
        raise ValueError("large_rows must be >= 0")
    statements = _statements(large_rows)
    if hasattr(connection, "exec_driver_sql"):  # SQLAlchemy Connection
        for statement in statements:
            connection.exec_driver_sql(statement)
    else:  # DB-API connection
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
