"""docker-compose.yml: structure checks that need no Docker engine.

The file is for users' machines; these tests keep its promises (healthy dependencies, Flower
behind basic auth, nothing published beyond localhost, target URL on the worker only).
"""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether written as a mapping or as KEY=VALUE items."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_the_four_services(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", "worker", "flower"}


@pytest.mark.parametrize(
    ("name", "probe"),
    [("postgres", "pg_isready"), ("redis", "redis-cli ping"), ("flower", "/healthcheck")],
)
def test_healthchecks(services: dict[str, Any], name: str, probe: str) -> None:
    assert probe in healthcheck_text(services[name])


def test_worker_waits_for_healthy_postgres_and_redis(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]
    assert isinstance(depends_on, dict), "the long form is needed to require a healthy service"
    for name in ("postgres", "redis"):
        assert depends_on[name]["condition"] == "service_healthy"


def test_flower_requires_basic_auth_from_an_env_var(services: dict[str, Any]) -> None:
    flower = services["flower"]
    command = command_text(flower)
    assert command.startswith("runbook flower "), command
    assert "--basic" not in command, "the login belongs in the environment, not the command"
    # ${VAR:?message}: compose refuses to start without it; no default password.
    auth = environment(flower)["FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]*user:password[^}]*\}", auth), auth


def test_flower_keeps_its_history_in_a_volume(services: dict[str, Any], compose: Any) -> None:
    flower = services["flower"]
    db = re.search(r"--db (\S+)", command_text(flower))
    assert db, command_text(flower)
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in flower["volumes"]}
    assert any(db.group(1).startswith(path + "/") for path in mounts), (db.group(1), mounts)
    assert set(mounts.values()) <= set(compose["volumes"]), "a named volume, not a bind mount"


def test_published_ports_are_bound_to_localhost(services: dict[str, Any]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):  # long syntax
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
    assert published >= 3  # postgres, redis, flower


def test_trust_auth_only_with_loopback_ports(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    if environment(postgres).get("POSTGRES_HOST_AUTH_METHOD") == "trust":
        assert all(str(port).startswith("127.0.0.1:") for port in postgres.get("ports", []))


def test_postgres_creates_the_app_database(services: dict[str, Any]) -> None:
    assert environment(services["postgres"])["POSTGRES_DB"] == "app"


def test_worker(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert command_text(worker) == "runbook worker --loglevel INFO"
    env = environment(worker)
    assert env["DATABASE_URL"] == "postgresql://postgres@postgres:5432/app"
    assert env["RUNBOOK_DEMO_ADMIN_URL"] == "postgresql://postgres@postgres:5432/postgres"
    assert env["CELERY_BROKER_URL"].startswith("redis://redis:6379")
    assert env["CELERY_RESULT_BACKEND"].startswith("redis://redis:6379")
    assert env["RUNBOOK_BACKUP_DIR"] == "/backups"
    assert any(str(volume).endswith(":/backups") for volume in worker["volumes"])


def test_worker_image(services: dict[str, Any]) -> None:
    build = services["worker"]["build"]
    dockerfile = build["dockerfile_inline"]
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.MULTILINE)
    assert "postgresql-client" in dockerfile
    assert "pip install" in dockerfile and re.search(r"pip install .*\.\s*$", dockerfile, re.M)
    # pg_dump refuses a newer server: bookworm's client is 15, so the server must be 15.
    assert "bookworm" in dockerfile
    assert services["postgres"]["image"].split(":")[1].split(".")[0] == "15"


def test_flower_shares_the_worker_image_but_not_the_target_url(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["build"] == services["worker"]["build"]
    assert "CELERY_BROKER_URL" in environment(flower)
    # Targets' URLs live on the worker side only (DESIGN.md, "target").
    assert not any("postgresql://" in value for value in environment(flower).values())


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runbook.toml", "backups"} <= ignored


def test_workers_reconcile_with_a_lease(services: dict[str, Any]) -> None:
    env = environment(services["worker"])
    assert float(env["RUNBOOK_RECONCILE_S"]) > 0
    assert float(env["RUNBOOK_LEASE_S"]) >= 4 * float(env["RUNBOOK_RECONCILE_S"])
    assert int(env["RUNBOOK_MAX_DELIVERIES"]) >= 2
