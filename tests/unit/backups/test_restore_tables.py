"""Which entries of a backup's TOC belong to a table (``runbook restore --table``), read from
the SQL pg_restore --schema-only prints for them; no archive, no database."""

from __future__ import annotations

import pytest

from jobs.backups.restore import HEADER, RestoreError
from jobs.backups.restore_tables import _belongs_to, _Entry, _parse_names, _select_entries

# What pg_restore --schema-only prints for a table with a serial key, an index, a comment on
# that index, grants, a check, a trigger and a foreign key to it from another table; plus a
# table whose name starts like it.
SCHEMA_ONLY = """\
-- Name: items; Type: TABLE; Schema: public; Owner: app
CREATE TABLE public.items (id integer NOT NULL, name text, CONSTRAINT named CHECK (name <> ''));
-- Name: items_id_seq; Type: SEQUENCE; Schema: public; Owner: app
CREATE SEQUENCE public.items_id_seq AS integer START WITH 1 INCREMENT BY 1;
-- Name: items_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: app
ALTER SEQUENCE public.items_id_seq OWNED BY public.items.id;
-- Name: items_archive; Type: TABLE; Schema: public; Owner: app
CREATE TABLE public.items_archive (id integer NOT NULL);
-- Name: orders; Type: TABLE; Schema: shop; Owner: -
CREATE TABLE shop.orders (id integer NOT NULL, item_id integer);
-- Name: items id; Type: DEFAULT; Schema: public; Owner: app
ALTER TABLE ONLY public.items ALTER COLUMN id SET DEFAULT nextval('public.items_id_seq'::regclass);
-- Name: items items_pkey; Type: CONSTRAINT; Schema: public; Owner: app
ALTER TABLE ONLY public.items
    ADD CONSTRAINT items_pkey PRIMARY KEY (id);
-- Name: items_archive items_archive_pkey; Type: CONSTRAINT; Schema: public; Owner: app
ALTER TABLE ONLY public.items_archive
    ADD CONSTRAINT items_archive_pkey PRIMARY KEY (id);
-- Name: items_name_idx; Type: INDEX; Schema: public; Owner: app
CREATE INDEX items_name_idx ON public.items USING btree (name);
-- Name: INDEX items_name_idx; Type: COMMENT; Schema: public; Owner: app
COMMENT ON INDEX public.items_name_idx IS 'by name';
-- Name: items stamp; Type: TRIGGER; Schema: public; Owner: app
CREATE TRIGGER stamp BEFORE UPDATE ON public.items FOR EACH ROW EXECUTE FUNCTION public.stamp();
-- Name: COLUMN items.name; Type: COMMENT; Schema: public; Owner: app
COMMENT ON COLUMN public.items.name IS 'what it is called';
-- Name: orders orders_item_fk; Type: FK CONSTRAINT; Schema: shop; Owner: -
ALTER TABLE ONLY shop.orders
    ADD CONSTRAINT orders_item_fk FOREIGN KEY (item_id) REFERENCES public.items(id);
-- Name: TABLE items; Type: ACL; Schema: public; Owner: app
GRANT SELECT ON TABLE public.items TO reader;
-- Name: SEQUENCE items_id_seq; Type: ACL; Schema: public; Owner: app
GRANT ALL ON SEQUENCE public.items_id_seq TO reader;
-- Name: TABLE items_archive; Type: ACL; Schema: public; Owner: app
GRANT SELECT ON TABLE public.items_archive TO reader;
"""


def entries() -> list[_Entry]:
    """SCHEMA_ONLY cut into entries as jobs/backups/restore_tables.py `_schema_entries` does."""
    heads = list(HEADER.finditer(SCHEMA_ONLY))
    found = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(SCHEMA_ONLY)
        body = SCHEMA_ONLY[m.end() : end].strip()
        owner = "" if m.group(4) == "-" else m.group(4)
        found.append(_Entry(m.group(2), m.group(1), m.group(3), owner, body))
    return found


def names(chosen: list[_Entry]) -> list[str]:
    return [f"{e.kind}: {e.name}" for e in chosen]


def test_names_are_schema_qualified_with_public_by_default() -> None:
    assert _parse_names(["items", "shop.orders", "a.b.c"]) == [
        ("items", "public", "items"),
        ("shop.orders", "shop", "orders"),
        ("a.b.c", "a.b", "c"),
    ]


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([], "no table to restore was named; pass --table NAME"),
        (["shop."], "table name 'shop.' is empty; pass NAME or SCHEMA.NAME"),
        ([""], "table name '' is empty"),
    ],
)
def test_no_name_or_an_empty_one_is_refused(tables: list[str], message: str) -> None:
    with pytest.raises(RestoreError, match=message):
        _parse_names(tables)


def test_an_entry_is_listed_the_way_pg_restore_list_shows_it() -> None:
    by_kind = {(e.kind, e.name): e for e in entries()}
    assert by_kind[("TABLE", "items")].key == "TABLE public items app"
    assert by_kind[("TABLE", "orders")].key == "TABLE shop orders"  # no owner: none printed


def test_what_belongs_to_a_table_is_read_from_its_sql_not_its_name() -> None:
    mine = _belongs_to("public.items")
    bodies = {e.name: e.body for e in entries()}
    for name in (
        "items id",
        "items items_pkey",
        "items_name_idx",
        "items stamp",
        "COLUMN items.name",
        "TABLE items",
        "items_id_seq",  # the OWNED BY entry comes last of the two with this name
    ):
        assert mine.search(bodies[name]), name
    for name in ("items_archive items_archive_pkey", "TABLE items_archive", "INDEX items_name_idx"):
        assert not mine.search(bodies[name]), name  # a longer name, or names no table
    assert not mine.search("ALTER TABLE ONLY public.itemsXother ADD CONSTRAINT c CHECK (true)")
    assert _belongs_to("public.it.ms").search("ALTER TABLE public.it.ms ADD x") is not None
    assert _belongs_to("public.it.ms").search("ALTER TABLE public.itXms ADD x") is None


def test_a_dropped_table_comes_back_with_all_its_parts_and_the_keys_to_it() -> None:
    chosen = _select_entries(
        entries(),
        {"public.items": ("public", "items")},
        exists={"shop.orders": True},
        constraints=set(),
    )
    assert names(chosen) == [
        "TABLE: items",
        "SEQUENCE OWNED BY: items_id_seq",
        "DEFAULT: items id",
        "CONSTRAINT: items items_pkey",
        "INDEX: items_name_idx",
        "TRIGGER: items stamp",
        "COMMENT: COLUMN items.name",
        "FK CONSTRAINT: orders orders_item_fk",
        "ACL: TABLE items",
        # Named by the sequence or index they belong to, not by the table:
        "SEQUENCE: items_id_seq",
        "COMMENT: INDEX items_name_idx",
        "ACL: SEQUENCE items_id_seq",
    ]


def test_a_foreign_key_is_not_added_twice_nor_to_a_table_that_is_gone() -> None:
    def fks(exists: dict[str, bool], constraints: set[tuple[str, str]]) -> list[str]:
        chosen = _select_entries(
            entries(), {"public.items": ("public", "items")}, exists, constraints
        )
        return [e.name for e in chosen if e.kind == "FK CONSTRAINT"]

    assert fks({"shop.orders": True}, set()) == ["orders orders_item_fk"]
    assert fks({"shop.orders": True}, {("shop.orders", "orders_item_fk")}) == []
    assert fks({"shop.orders": False}, set()) == []
    assert fks({}, set()) == []


def test_nothing_is_chosen_when_no_table_is_recreated() -> None:
    assert _select_entries(entries(), {}, {"shop.orders": True}, set()) == []
