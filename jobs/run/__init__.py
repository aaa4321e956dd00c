"""A run: the coordinator and what it calls on the way (verify, preflight, hooks, leases)."""
