"""Options given twice: refused in one line before click keeps the last one silently."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    pass

# What to do instead, when an option that takes one value is given more than once.
_REPEAT_HINTS = {
    "--target": "run the command once per target",
    "--to": "give the one revision to reach",
    "--where": "combine the conditions with AND",
    "--key": "a backfill walks one key column",
    "--backup": "restore one backup per run",
}


def _option_values(command: click.Command, args: list[str]) -> dict[click.Option, list[str]]:
    """The options of ``command`` found in ``args``, each with how it was spelled each time,
    read the way click's parser reads them (``--opt v``, ``--opt=v``, ``-tv``; ``--`` ends)."""
    by_name: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                by_name[name] = param
    found: dict[click.Option, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        option = by_name.get(name)
        if option is None:
            continue
        found.setdefault(option, []).append(name)
        attached = "=" in arg if arg.startswith("--") else len(arg) > 2
        if not option.is_flag and not option.count and not attached:
            i += option.nargs  # its value, which may itself look like an option
    return found


def refuse_repeats(command: click.Command, args: list[str], ctx: click.Context) -> None:
    """Refuse an option that takes one value but was given several times: click would keep
    the last one and drop the others without a word."""
    for option, spelled in _option_values(command, args).items():
        if len(spelled) < 2 or option.multiple or option.is_flag or option.count:
            continue
        name = max(option.opts, key=len)
        times = "twice" if len(spelled) == 2 else f"{len(spelled)} times"
        hint = _REPEAT_HINTS.get(name, "give it once")
        raise click.UsageError(f"{name} given {times}; {hint}", ctx=ctx)


class Command(click.Command):
    """A runbook command: refuses repeated single-value options before click parses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeats(self, args, ctx)
        return super().parse_args(ctx, args)


class Group(click.Group):
    command_class = Command
