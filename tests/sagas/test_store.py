"""Inbox stores: the same behaviour on memory, SQLite and PostgreSQL (``sagas._store``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagas import (
    ConfigurationError,
    InboxStore,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    StoreError,
    open_store,
)

StoreFactory = Callable[[], InboxStore]


def _drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def _backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Yield a function that opens a store of ``kind``, on the same storage at every call."""
    opened: list[InboxStore] = []
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path}/inbox.db"
    else:
        postgres_url: str = request.getfixturevalue("postgres_url")
        schema: str = request.getfixturevalue("unique")
        url = f"{postgres_url}?schema={schema}"
        request.addfinalizer(lambda: _drop_schema(postgres_url, schema))

    def factory() -> InboxStore:
        store = open_store(url)
        opened.append(store)
        return store

    try:
        yield factory
    finally:
        for store in opened:
            store.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InboxStore]:
    """A freshly opened, empty store of each backend."""
    with _backend(request.param, request, tmp_path) as open_again:
        yield open_again()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a store of each durable backend; every call opens the same storage again."""
    with _backend(request.param, request, tmp_path) as open_again:
        yield open_again


def test_remembered_message_is_seen(store: InboxStore) -> None:
    """A message id remembered for a consumer is then seen for that consumer."""
    store.remember("billing", "m-1")
    assert store.seen("billing", "m-1")


def test_unknown_message_is_not_seen(store: InboxStore) -> None:
    """A message id that was never remembered is not seen."""
    store.remember("billing", "m-1")
    assert not store.seen("billing", "m-2")


def test_empty_store_sees_nothing(store: InboxStore) -> None:
    """A new store has seen no message."""
    assert not store.seen("billing", "m-1")


def test_consumers_are_separate_namespaces(store: InboxStore) -> None:
    """A message id remembered for one consumer is not seen for another."""
    store.remember("billing", "m-1")
    assert not store.seen("shipping", "m-1")


def test_consumer_and_message_id_are_not_concatenated(store: InboxStore) -> None:
    """The pair (consumer, id) is kept apart: ('ab', 'c') does not make ('a', 'bc') seen."""
    store.remember("ab", "c")
    assert not store.seen("a", "bc")


def test_remembering_twice_is_harmless(store: InboxStore) -> None:
    """Remembering the same message twice raises nothing and leaves it seen."""
    store.remember("billing", "m-1")
    store.remember("billing", "m-1")
    assert store.seen("billing", "m-1")


def test_many_messages_are_all_seen(store: InboxStore) -> None:
    """Every one of many remembered messages is seen, and no other."""
    for i in range(200):
        store.remember("billing", f"m-{i}")
    assert all(store.seen("billing", f"m-{i}") for i in range(200))
    assert not store.seen("billing", "m-200")


def test_remembered_message_survives_reopening(reopen: StoreFactory) -> None:
    """A durable store sees, after it is closed and opened again, what it remembered before."""
    first = reopen()
    first.remember("billing", "m-1")
    first.close()
    second = reopen()
    assert second.seen("billing", "m-1")
    assert not second.seen("billing", "m-2")


def test_sqlite_store_survives_close_and_reopen_of_the_same_file(tmp_path: Path) -> None:
    """An SQLite store reopened on the same file sees what was remembered before it was closed."""
    url = f"sqlite:///{tmp_path}/nested/dir/inbox.db"
    first = open_store(url)
    first.remember("billing", "m-1")
    first.close()
    second = open_store(url)
    try:
        assert (tmp_path / "nested" / "dir" / "inbox.db").is_file()
        assert second.seen("billing", "m-1")
    finally:
        second.close()


@given(st.text(max_size=50), st.text(max_size=50), st.text(max_size=50))
def test_sqlite_store_keeps_arbitrary_unicode_ids(consumer: str, message_id: str, other: str) -> None:
    """The SQLite store remembers any consumer and message id text exactly, and no other id."""
    store = open_store("sqlite:///:memory:")
    try:
        store.remember(consumer, message_id)
        assert store.seen(consumer, message_id)
        assert store.seen(consumer, other) is (other == message_id)
    finally:
        store.close()


# --- open_store ----------------------------------------------------------------------------------


def test_open_store_memory_url_gives_a_memory_store() -> None:
    """open_store('memory://') returns a MemoryStore."""
    assert isinstance(open_store("memory://"), MemoryStore)


def test_open_store_sqlite_url_gives_an_sqlite_store_at_the_path(tmp_path: Path) -> None:
    """open_store('sqlite:////abs/path') returns an SQLiteStore on that absolute path."""
    store = open_store(f"sqlite:///{tmp_path}/inbox.db")
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == f"{tmp_path}/inbox.db"
    finally:
        store.close()


def test_open_store_passes_a_store_object_through() -> None:
    """open_store given a store object returns that same object."""
    store = MemoryStore()
    assert open_store(store) is store


def test_open_store_reads_the_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """open_store() without a URL uses SAGAS_STORE_URL."""
    monkeypatch.setenv("SAGAS_STORE_URL", "memory://")
    assert isinstance(open_store(), MemoryStore)


@pytest.mark.parametrize("url", ["redis://localhost/0", "mysql://db/x", "file:///tmp/x.db", "sagas.db"])
def test_open_store_rejects_an_unknown_scheme(url: str) -> None:
    """A URL of an unknown scheme raises ConfigurationError listing the supported ones."""
    with pytest.raises(ConfigurationError, match=r"unknown store URL scheme .*memory://, sqlite:///path"):
        open_store(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://?synchronous=full"])
def test_open_store_rejects_sqlite_without_a_path(url: str) -> None:
    """An sqlite URL without a path raises ConfigurationError showing a correct URL."""
    with pytest.raises(ConfigurationError, match=r"needs a path: sqlite:///sagas\.db"):
        open_store(url)


@pytest.mark.parametrize("mode", ["sometimes", "off", ""])
def test_open_store_rejects_an_unknown_sqlite_synchronous_mode(tmp_path: Path, mode: str) -> None:
    """An sqlite URL with a synchronous mode other than normal, full or extra raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="synchronous must be NORMAL, FULL or EXTRA"):
        open_store(f"sqlite:///{tmp_path}/inbox.db?synchronous={mode}")


@pytest.mark.parametrize("mode", ["normal", "full", "EXTRA"])
def test_open_store_accepts_the_sqlite_synchronous_modes(tmp_path: Path, mode: str) -> None:
    """An sqlite URL with synchronous=normal, full or extra (any case) opens a working store."""
    store = open_store(f"sqlite:///{tmp_path}/inbox.db?synchronous={mode}")
    try:
        store.remember("billing", "m-1")
        assert store.seen("billing", "m-1")
    finally:
        store.close()


def test_open_store_reports_an_uncreatable_sqlite_directory_as_store_error(tmp_path: Path) -> None:
    """An sqlite path whose directory cannot be created raises StoreError naming the path."""
    (tmp_path / "afile").touch()
    with pytest.raises(StoreError, match="cannot open the SQLite store"):
        open_store(f"sqlite:///{tmp_path}/afile/sub/inbox.db")


def test_configuration_error_is_a_value_error() -> None:
    """ConfigurationError is a ValueError."""
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        open_store("redis://localhost/0")


@pytest.mark.postgres
def test_postgres_store_keeps_tables_in_the_given_schema(postgres_url: str, unique: str) -> None:
    """open_store with ?schema= creates the inbox table in that schema."""
    import psycopg

    store = open_store(f"{postgres_url}?schema={unique}")
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema == unique
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'inbox'",
                (unique,),
            ).fetchone()
        assert row is not None
    finally:
        store.close()
        _drop_schema(postgres_url, unique)


@pytest.mark.parametrize("schema", ["bad-name", "a;drop", "", "x y", "a.b"])
def test_postgres_store_rejects_an_invalid_schema_name(schema: str) -> None:
    """A schema name other than letters, digits and '_' raises ConfigurationError before connecting."""
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        open_store(f"postgresql://nobody@127.0.0.1:1/none?schema={schema}")
