"""A backfill key's name in SQL, and what to say when the one asked for cannot be walked."""

from __future__ import annotations

from jobs.backfill.keys import KEY_TYPES, Table, _choose, _Column, quote


def test_a_key_is_quoted_as_postgresql_reads_it() -> None:
    assert quote("id") == '"id"'
    assert quote("Key") == '"Key"'
    assert quote('odd"name') == '"odd""name"'


def column(
    name: str, type_: str = "integer", *, not_null: bool = True, unique: bool = True
) -> _Column:
    return _Column(name=name, type=type_, not_null=not_null, unique=unique)


def test_only_a_unique_not_null_column_of_a_walkable_type_is_usable() -> None:
    assert all(column("k", t).usable for t in KEY_TYPES)
    assert not column("k", not_null=False).usable  # rows with a NULL key would be skipped
    assert not column("k", unique=False).usable
    assert not column("k", "timestamp with time zone").usable


def test_the_message_names_the_usable_keys_or_says_there_is_none() -> None:
    table = Table(oid=1, name="public.good")
    columns = [column("id", "bigint"), column("n", unique=False), column("code", "uuid")]
    assert _choose(columns, table) == "choose --key id or code"
    assert _choose([column("n", unique=False)], table) == (
        "table public.good has no usable key (no primary key or unique NOT NULL column of type "
        "smallint, integer, bigint, uuid, text, character varying); add one"
    )
