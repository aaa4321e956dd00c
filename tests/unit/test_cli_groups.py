"""The commands live in modules named like jobs/api's (jobs/cli/runs.py, backups.py,
backfills.py, targets.py; fleet.py for jobs/api/rollouts.py; exporter.py for jobs/metrics/) and jobs/cli/commands.py registers them on its one group: none may
be left out, and each must refuse a repeated option as the group's own commands do."""

from __future__ import annotations

import click

from jobs.cli import backfills, backups, commands, exporter, fleet, flower, runs, targets
from jobs.cli.options import Command


def defined_in(module: object) -> dict[str, click.Command]:
    return {
        command.name: command
        for command in vars(module).values()
        if isinstance(command, click.Command) and command.name
    }


def test_every_command_of_the_role_modules_is_registered() -> None:
    defined: dict[str, click.Command] = {}
    for module in (runs, backups, backfills, targets, exporter, flower, fleet):
        found = defined_in(module)
        assert not set(found) & set(defined), module
        defined.update(found)
    registered = dict(commands.cli.commands)
    assert {name: registered.get(name) for name in defined} == defined
    assert set(registered) - set(defined) == {"worker", "demo"}


def test_every_command_refuses_repeated_options() -> None:
    for name, command in commands.cli.commands.items():
        assert isinstance(command, Command), name
