"""`runbook flower`: Flower with runbook's settings (worker/flower_config.py: the Tasks
page's columns and what a task shows), behind basic auth, keeping its history across
restarts. The command line comes from the dispatcher (jobs/dispatch.py ``flower_command``):
jobs/ never imports Celery.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jobs.cli.options import Command
from jobs.cli.render import friendly
from jobs.errors import FlowerAuthMissing

AUTH_VARIABLE = "FLOWER_BASIC_AUTH"
HOW_TO_SET = f"set {AUTH_VARIABLE}=user:password (several: a,b separated by commas)"


def check_basic_auth(value: str | None) -> None:
    """Flower shows every task's arguments and results: it never runs without a login.
    Flower reads the variable itself; here it is only checked."""
    if not value:
        raise FlowerAuthMissing(f"{AUTH_VARIABLE} is not set; {HOW_TO_SET}")
    for entry in value.split(","):
        user, _, password = entry.partition(":")
        if not user.strip() or not password:
            raise FlowerAuthMissing(
                f"{AUTH_VARIABLE} has an entry without user:password; {HOW_TO_SET}"
            )


def default_db() -> Path:
    """Flower's state file: under the user's state directory (XDG), else ./flower.db."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    folder = Path(state) / "runbook"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path("flower.db")
    return folder / "flower.db"


@click.command(cls=Command)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    help="Flower's state file, kept across restarts [default: ~/.local/state/runbook/flower.db].",
)
@friendly
def flower(address: str, port: int, db: str | None) -> None:
    """Start Flower for runbook's queue: basic auth from FLOWER_BASIC_AUTH (user:password),
    its task history kept in --db, the Tasks page showing arguments and progress."""
    from jobs import dispatch
    from jobs.config import load_settings

    check_basic_auth(os.environ.get(AUTH_VARIABLE))
    path = Path(db) if db else default_db()
    command = dispatch.for_settings(load_settings()).flower_command(address, port, str(path))
    sys.stdout.flush()
    os.execv(command[0], command)
