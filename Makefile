# runbook's developer commands. Everything runs from the project's own virtualenv (.venv),
# created and kept in step with pyproject.toml by the install stamp below.
#
#   make demo    the whole pipeline against a scratch database, with a real worker
#   make test    lint, then the unit and integration tests (real Postgres, Redis, worker)
#   make lint    ruff check, ruff format --check, mypy
#   make bench   every benchmark (apply, backup/restore, backfill at 2M and 5M rows, the
#                backfill beside a slow standby at 2M rows, a rollout over 100 databases:
#                about 20 minutes)
#   make bench-backfill   the backfill benchmark alone (2M and 5M rows, 3 repeats each;
#                make bench-backfill ROWS=500000 REPEATS=1 for a quick look)
#   make bench-rollout    `runbook rollout` over 100 member databases (two workers) against
#                the shell loop of `alembic upgrade head` (MEMBERS=20 for a quick look;
#                REPEATS=3 for medians)
#   make bench-fleet-scale   a rollout's bookkeeping over 10,000 members already at the
#                revision (MEMBERS=1000 for a look; about 2.5 minutes at 10,000)
#   make bench-replica    a backfill with and without the replica bound, beside a standby
#                whose replay is paused 2 s of every 4 s (2M rows; ROWS=200000 for a look)
#   make browser install Debian's chromium when it is missing (root; the Flower browser test,
#                tests/integration/test_flower_browser.py, skips without it, fails under CI)
#   make clean   remove the virtualenv and caches (backups/ is left alone)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SERVICES_HINT := start it with \`docker compose up -d postgres redis\`

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench bench-backfill bench-rollout bench-fleet-scale bench-replica clean services browser

help:
	@echo "make demo | test | lint | bench | bench-backfill | bench-rollout | bench-replica | clean"

# The install stamp: (re)created when pyproject.toml changes, or when there is no .venv.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(VENV): $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/runbook demo

# One line per missing service. Integration tests then skip locally and fail under CI=true
# (tests/integration/conftest.py decides); unit tests run either way.
services: $(STAMP)
	@for svc in "PostgreSQL 127.0.0.1 5432" "Redis 127.0.0.1 6379"; do \
	  set -- $$svc; \
	  $(BIN)/python -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()' $$2 $$3 2>/dev/null \
	    || echo "$$1 is not running on $$2:$$3; $(SERVICES_HINT) (integration tests skip without it, and fail under CI=true)"; \
	done

# Headless Chromium for tests/integration/test_flower_browser.py: Debian's package (about
# 20-60 s to install; apt-get update first when the package lists are missing).
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null)"; else \
	  apt-cache show chromium >/dev/null 2>&1 || apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; fi

# Two test processes (pytest-xdist), a module to each: integration tests spend most of their
# time waiting on workers and servers, and every test names its own databases, queue and
# config (tests/integration/conftest.py SESSION), so two run side by side. TEST_WORKERS=0 runs
# them in this process alone.
TEST_WORKERS ?= 2
test: $(STAMP) lint services
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# bench_apply.py needs the `bench` extra (mlflow-skinny, for MLflow's migration history).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

# Every benchmark runs even when an earlier one misses its target; the exit code says
# whether any did.
bench: $(BENCH_STAMP)
	@status=0; \
	$(BIN)/python bench/bench_apply.py || status=$$?; \
	$(BIN)/python bench/bench_backup.py || status=$$?; \
	$(MAKE) --no-print-directory bench-backfill || status=$$?; \
	$(MAKE) --no-print-directory bench-rollout || status=$$?; \
	$(MAKE) --no-print-directory bench-replica || status=$$?; \
	exit $$status

# One run of bench/bench_backfill.py (bench/bench_replica.py) per row count in ROWS, all of
# them run; the exit status is the last failing one's. Without ROWS each has its own default.
ROWS ?=
BACKFILL_ROWS := $(or $(ROWS),2000000 5000000)
REPLICA_ROWS := $(or $(ROWS),2000000)
REPEATS ?= 3
bench-backfill: $(STAMP)
	@status=0; for rows in $(BACKFILL_ROWS); do \
	  $(BIN)/python bench/bench_backfill.py --rows $$rows --repeats $(REPEATS) || status=$$?; \
	done; exit $$status

# bench/bench_rollout.py reports and exits 0 whether or not its targets are met (2 when a
# service is missing). MEMBERS: the fleet's size (its default, 100, without it).
MEMBERS ?=
bench-rollout: $(STAMP)
	$(BIN)/python bench/bench_rollout.py $(if $(MEMBERS),--members $(MEMBERS)) $(if $(REPEATS),--repeats $(REPEATS))

bench-fleet-scale: $(STAMP)
	$(BIN)/python bench/bench_fleet_scale.py $(if $(MEMBERS),--members $(MEMBERS))

bench-replica: $(STAMP)
	@status=0; for rows in $(REPLICA_ROWS); do \
	  $(BIN)/python bench/bench_replica.py --rows $$rows || status=$$?; \
	done; exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
