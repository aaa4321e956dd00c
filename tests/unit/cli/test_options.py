"""Options given twice: found the way click's parser reads the arguments, refused in one line."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from jobs.cli.options import Command, Group, _option_values, refuse_repeats


@click.command(cls=Command)
@click.option("--target", "-t")
@click.option("--where")
@click.option("--set", "set_sql", multiple=True)
@click.option("--wait/--no-wait", default=False)
@click.option("--verbose", "-v", count=True)
@click.option("--pair", nargs=2)
def backfill(**_: object) -> None:
    """A command shaped like runbook's: single-value, repeatable, flag, count, two-value."""
    click.echo("ran")


def spelled(args: list[str]) -> dict[str, list[str]]:
    """Each option found in ``args``, by its name, with how it was spelled each time."""
    return {option.name or "": names for option, names in _option_values(backfill, args).items()}


def test_every_spelling_of_an_option_is_found() -> None:
    args = ["--target", "a", "--target=b", "-tc", "-t", "d", "--where", "x"]
    assert spelled(args) == {"target": ["--target", "--target", "-t", "-t"], "where": ["--where"]}


def test_a_value_that_looks_like_an_option_is_a_value() -> None:
    # `--set "--where"`: the value of --set, not a second --where.
    assert spelled(["--set", "--where", "--where", "a IS NULL"]) == {
        "set_sql": ["--set"],
        "where": ["--where"],
    }
    # --pair takes two values, both skipped.
    assert spelled(["--pair", "--where", "--where", "--where", "x"]) == {
        "pair": ["--pair"],
        "where": ["--where"],
    }


def test_flags_counts_and_secondary_names_take_no_value() -> None:
    found = spelled(["--wait", "--where", "x", "--no-wait", "-v", "--where", "y", "-v"])
    assert found == {
        "wait": ["--wait", "--no-wait"],
        "where": ["--where", "--where"],
        "verbose": ["-v", "-v"],
    }


def test_arguments_and_what_follows_a_double_dash_are_not_options() -> None:
    assert spelled(["-", "name", "--unknown", "--where", "x", "--", "--where", "y"]) == {
        "where": ["--where"]
    }


def refusal(args: list[str]) -> str:
    ctx = click.Context(backfill, info_name="backfill")
    with pytest.raises(click.UsageError) as refused:
        refuse_repeats(backfill, args, ctx)
    assert refused.value.ctx is ctx
    return refused.value.message


def test_a_single_value_option_given_twice_is_refused_with_what_to_do_instead() -> None:
    assert refusal(["--where", "a", "--where=b"]) == (
        "--where given twice; combine the conditions with AND"
    )
    assert refusal(["-t", "a", "--target", "b", "-tc"]) == (
        "--target given 3 times; run the command once per target"
    )
    assert refusal(["--pair", "a", "b", "--pair", "c", "d"]) == "--pair given twice; give it once"


def test_repeatable_options_flags_and_counts_may_repeat() -> None:
    ctx = click.Context(backfill, info_name="backfill")
    refuse_repeats(
        backfill, ["--set", "a = 1", "--set", "b = 2", "-v", "-v", "--wait", "--wait"], ctx
    )


def test_a_runbook_command_refuses_before_click_keeps_the_last_value() -> None:
    group = Group(commands={"backfill": backfill})
    result = CliRunner().invoke(group, ["backfill", "--where", "a", "--where", "b"])
    assert result.exit_code == 2 and "ran" not in result.output
    assert "Error: --where given twice; combine the conditions with AND" in result.output
    assert CliRunner().invoke(group, ["backfill", "--where", "a"]).output == "ran\n"
