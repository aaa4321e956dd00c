"""[groups.NAME] and [control] of runbook.toml: member order, canaries, catalog options, and a
one-line refusal for each mistake (jobs/fleet/groups.py; no services needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import Settings, load_settings
from jobs.errors import ConfigError, NoControlDatabase, UnknownGroup
from jobs.fleet import groups

TARGETS = "".join(
    f'[targets.{name}]\nurl = "postgresql://u@h/{name.replace("-", "_")}"\n'
    for name in ("tenant_b", "tenant_a", "tenant_c", "eu-main", "staging-copy")
)


def settings_of(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "runbook.toml"
    path.write_text(TARGETS + text)
    return load_settings(path)


def names(tmp_path: Path, text: str, group: str = "fleet") -> list[str]:
    s = settings_of(tmp_path, text)
    return [m.name for m in groups.members(s, groups.group(s, group))]


def test_members_follow_the_patterns_in_order_each_sorted_by_name(tmp_path: Path) -> None:
    text = '[groups.fleet]\ntargets = ["eu-main", "tenant_*", "eu-main"]\n'
    assert names(tmp_path, text) == ["eu-main", "tenant_a", "tenant_b", "tenant_c"]


def test_named_canaries_go_first_in_the_order_written(tmp_path: Path) -> None:
    text = (
        '[groups.fleet]\ntargets = ["tenant_*", "staging-copy"]\n'
        'canary = ["staging-copy", "tenant_b"]\n'
    )
    s = settings_of(tmp_path, text)
    found = groups.members(s, groups.group(s, "fleet"))
    assert [(m.name, m.canary) for m in found] == [
        ("staging-copy", True),
        ("tenant_b", True),
        ("tenant_a", False),
        ("tenant_c", False),
    ]


def test_a_broken_member_is_listed_with_its_line_not_raised(tmp_path: Path) -> None:
    text = '[targets.tenant_d]\nurl = "mysql://x@h/d"\n[groups.fleet]\ntargets = ["tenant_*"]\n'
    s = settings_of(tmp_path, text)
    found = {m.name: m for m in groups.members(s, groups.group(s, "fleet"))}
    assert found["tenant_d"].target is None
    assert "not a PostgreSQL URL" in (found["tenant_d"].broken or "")
    assert found["tenant_a"].target is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[groups.fleet]\ntargets = ["nope"]\n', "target 'nope' is not configured"),
        ('[groups.fleet]\ntargets = ["zz_*"]\n', "group 'fleet' has no members"),
        ('[groups.fleet]\ntargets = "tenant_*"\n', "targets must be a list of names"),
        ("[groups.fleet]\n", "give either targets"),
        ('[groups.fleet]\ntargets = ["tenant_*"]\nbakup = false\n', "unknown option 'bakup'"),
        ('[groups.fleet]\ntargets = ["tenant_*"]\nurl = "postgresql://u@h/d"\n', "'url'"),
        ('[groups.fleet]\ntargets = ["tenant_*"]\nbackup = false\n', "applies to a catalog"),
        ('[groups.fleet]\ntargets = ["tenant_*"]\ncanary = ["eu-main"]\n', "canary 'eu-main'"),
        (
            '[groups.fleet]\ncatalog_url = "postgresql://u@h/c"\n',
            "catalog_query",
        ),
        (
            '[groups.fleet]\ncatalog_query = "SELECT name, url FROM t"\n',
            "exactly one of catalog_url or catalog_url_env",
        ),
        (
            '[groups.fleet]\ncatalog_url_env = "RUNBOOK_TEST_NO_SUCH_VAR"\n'
            'catalog_query = "SELECT 1"\n',
            "RUNBOOK_TEST_NO_SUCH_VAR (catalog_url_env) is not set",
        ),
        (
            '[groups.fleet]\ncatalog_url = "postgresql://u@h/c"\ncatalog_query = "SELECT 1"\n'
            'lock_timeout = "soon"\n',
            "lock_timeout",
        ),
    ],
)
def test_each_mistake_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        names(tmp_path, text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unknown_group_names_the_configured_ones(tmp_path: Path) -> None:
    s = settings_of(tmp_path, '[groups.fleet]\ntargets = ["tenant_*"]\n')
    with pytest.raises(UnknownGroup, match=r"unknown group 'flet' \(configured: fleet\)"):
        groups.group(s, "flet")


def test_a_catalog_group_keeps_its_options_for_the_rows(tmp_path: Path) -> None:
    text = (
        '[groups.cat]\ncatalog_url = "postgresql://reader:s3cret@h/catalog"\n'
        'catalog_query = "SELECT name, url FROM tenants WHERE active"\n'
        'backup = false\nlock_timeout = "500ms"\nalembic_ini = "proj/alembic.ini"\n'
    )
    s = settings_of(tmp_path, text)
    g = groups.group(s, "cat")
    assert g.is_catalog and (g.catalog_query or "").startswith("SELECT name, url")
    assert dict(g.options)["backup"] is False
    assert "s3cret" not in repr(g.catalog_url)


def test_the_control_database_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(groups.CONTROL_ENV, raising=False)
    s = settings_of(tmp_path, "")
    assert not groups.has_control(s)
    with pytest.raises(NoControlDatabase, match=r"\[control\] url"):
        groups.control_target(s)
    monkeypatch.setenv(groups.CONTROL_ENV, "postgresql://u@h/control_env")
    assert groups.control_target(s).url.database == "control_env"
    s = settings_of(tmp_path, '[control]\nurl = "postgresql://u@h/control_file"\n')
    assert groups.control_target(s).url.database == "control_file"
    s = settings_of(tmp_path, '[control]\nuri = "postgresql://u@h/c"\n')
    with pytest.raises(ConfigError, match=r"\[control\]: unknown option 'uri'"):
        groups.control_target(s)


def test_a_wrong_section_shape_is_one_line(tmp_path: Path) -> None:
    for text, message in (
        ("groups = 3\n", "'groups' must be a table of [groups.NAME]"),
        ('control = "x"\n', "'control' must be a table: [control] url = ..."),
    ):
        path = tmp_path / "runbook.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
            load_settings(path)
