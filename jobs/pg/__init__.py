"""PostgreSQL plumbing: connections and advisory locks, SQLSTATE classes, backoff."""
