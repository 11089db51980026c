"""The queue registry in the store (schema 9): the durable queues each app declared, on memory, SQLite
and PostgreSQL alike (``sagas._store``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sagas import SQLiteStore, Store, open_store
from sagas._store import SCHEMA_VERSION, QueueRecord, QueueRegistry


@pytest.fixture
def registry(any_store: Store) -> Store:
    """An empty store of each backend (PostgreSQL in its own schema)."""
    return any_store


def _rec(queue: str, app: str = "app1", at: float = 1.0, exchange: str = "ex") -> QueueRecord:
    return QueueRecord(exchange, queue, app, f"saga {queue}", ("a.start", "a.#"), (f"{queue}.delay.1000",), at)


def test_registered_queues_round_trip_per_exchange(registry: Store) -> None:
    """What a worker registers comes back whole, by queue then app, and only for its exchange."""
    assert isinstance(registry, QueueRegistry)
    registry.register_queues([_rec("ex.saga.b"), _rec("ex.saga.a"), _rec("ex.saga.a", app="app0")])
    registry.register_queues([_rec("other.saga.a", exchange="other")])
    got = registry.registered_queues("ex")
    assert [(r.queue, r.app) for r in got] == [("ex.saga.a", "app0"), ("ex.saga.a", "app1"), ("ex.saga.b", "app1")]
    assert got[0] == _rec("ex.saga.a", app="app0")
    assert [r.queue for r in registry.registered_queues("other")] == ["other.saga.a"]
    assert registry.registered_exchanges() == ["ex", "other"]


def test_registering_again_refreshes_the_row(registry: Store) -> None:
    """A second start of the app updates declared_at (and what consumes it) instead of adding a row."""
    assert isinstance(registry, QueueRegistry)
    registry.register_queues([_rec("ex.saga.a", at=1.0)])
    registry.register_queues([QueueRecord("ex", "ex.saga.a", "app1", "saga A2", ("x.#",), (), 5.0)])
    assert registry.registered_queues("ex") == [QueueRecord("ex", "ex.saga.a", "app1", "saga A2", ("x.#",), (), 5.0)]


def test_forget_queue_drops_one_apps_row_only(registry: Store) -> None:
    """Forgetting a queue for one app leaves another app's row of the same queue."""
    assert isinstance(registry, QueueRegistry)
    registry.register_queues([_rec("ex.saga.a"), _rec("ex.saga.a", app="app2")])
    registry.forget_queue("ex", "ex.saga.a", "app1")
    registry.forget_queue("ex", "ex.saga.zzz", "app1")  # nothing to forget: no error
    assert [(r.queue, r.app) for r in registry.registered_queues("ex")] == [("ex.saga.a", "app2")]


def test_the_registry_survives_reopening(tmp_path: Path) -> None:
    """Rows are durable on SQLite: a worker started later reads what an earlier one registered."""
    path = str(tmp_path / "s.db")
    store = SQLiteStore(path)
    store.register_queues([_rec("ex.saga.a")])
    store.close()
    store = SQLiteStore(path)
    assert [r.queue for r in store.registered_queues("ex")] == ["ex.saga.a"]
    store.close()


def test_an_older_store_gets_the_registry_when_it_opens(tmp_path: Path) -> None:
    """Opening a store of schema 6 (before the registry) creates the table and records version 9."""
    path = tmp_path / "old.db"
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)  # as version 6 left it
    db.executescript("DROP TABLE queue_registry; DELETE FROM schema_version; INSERT INTO schema_version VALUES (6);")
    db.close()
    store = SQLiteStore(str(path))
    store.register_queues([_rec("ex.saga.a")])
    assert [r.queue for r in store.registered_queues("ex")] == ["ex.saga.a"]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 9
    db.close()


@pytest.mark.postgres
def test_an_older_postgres_store_gets_the_registry_when_it_opens(postgres_url: str, unique: str) -> None:
    """The same upgrade from schema 6 on PostgreSQL."""
    import psycopg

    url = f"{postgres_url}?schema={unique}"
    open_store(url).close()
    try:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{unique}".queue_registry')
            conn.execute(f'DELETE FROM "{unique}".schema_version')
            conn.execute(f'INSERT INTO "{unique}".schema_version VALUES (6)')
        store = open_store(url)
        assert isinstance(store, QueueRegistry)
        store.register_queues([_rec("ex.saga.a")])
        assert [r.queue for r in store.registered_queues("ex")] == ["ex.saga.a"]
        store.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(f'SELECT max(version) FROM "{unique}".schema_version').fetchone()
            assert row is not None
            assert row[0] == SCHEMA_VERSION
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')
