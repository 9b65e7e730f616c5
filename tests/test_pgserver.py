"""The PostgreSQL fixtures of pgserver.py really give a server and fresh databases."""

from __future__ import annotations

from collections.abc import Callable

import psycopg


def test_pg_db_accepts_a_connection(pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _user_tables(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()


def test_two_databases_are_distinct_and_empty(pg_db: str, make_pg_db: Callable[[], str]) -> None:
    other = make_pg_db()
    assert other != pg_db
    assert _user_tables(pg_db) == []
    assert _user_tables(other) == []

    with psycopg.connect(pg_db) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        conn.execute("CREATE TABLE only_here (id int)")
    with psycopg.connect(other) as conn:
        assert conn.execute("SELECT current_database()").fetchone() != name

    assert _user_tables(pg_db) == [("public", "only_here")]
    assert _user_tables(other) == []
