"""The saga part of the store contract, identical on memory, SQLite and PostgreSQL (``sagas._store``)."""

from __future__ import annotations

import inspect
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sagas import MemoryStore, SagaRecord, SQLiteStore, Store, open_store
from sagas._store import (
    _SAGA_COLUMNS,
    SCHEMA_VERSION,
    DuplicateSaga,
    HistoryEntry,
    Outgoing,
    VersionConflict,
    prefix_upper_bound,
)

if TYPE_CHECKING:
    from private_services import PostgresCluster

T0 = 1_000_000.0
Opener = Callable[[], Store]


def _drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def _opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Yield a function that opens a store of ``kind``, on the same storage at every call."""
    opened: list[Store] = []
    memory = MemoryStore()
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/sagas.db"
    elif kind == "postgres":
        postgres_url: str = request.getfixturevalue("postgres_url")
        schema: str = request.getfixturevalue("unique")
        url = f"{postgres_url}?schema={schema}"
        request.addfinalizer(lambda: _drop_schema(postgres_url, schema))

    def open_again() -> Store:
        store: Store = memory if kind == "memory" else open_store(url)
        opened.append(store)
        return store

    try:
        yield open_again
    finally:
        for store in opened:
            store.close()


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A freshly opened, empty store of each backend."""
    with _opener(request.param, request, tmp_path) as open_again:
        yield open_again()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a durable store; every call opens the same storage again."""
    with _opener(request.param, request, tmp_path) as open_again:
        yield open_again


def _record(
    key: str,
    *,
    saga_id: str | None = None,
    type: str = "trip",
    state: str = "hotel",
    version: int = 1,
    deadline: float | None = None,
    final: bool = False,
    created_at: float = T0,
    data: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> SagaRecord:
    return SagaRecord(
        id=saga_id or f"id-{type}-{key}",
        type=type,
        key=key,
        state=state,
        data=data if data is not None else {"key": key},
        version=version,
        deadline=deadline,
        attempts=1,
        meta=meta if meta is not None else {},
        final=final,
        created_at=created_at,
        updated_at=created_at,
    )


def _entry(record: SagaRecord, from_state: str = "-", reason: str = "test") -> HistoryEntry:
    return HistoryEntry(record.updated_at, f"m-{record.id}-{record.version}", from_state, record.state, reason)


def _insert(
    store: Store, record: SagaRecord, *, inbox: tuple[str, str] | None = None, outbox: list[Outgoing] | None = None
) -> Any:
    return store.save_saga(record, expected_version=None, history=_entry(record), inbox=inbox, outbox=outbox or [])


def _move(
    store: Store,
    record: SagaRecord,
    state: str,
    *,
    inbox: tuple[str, str] | None = None,
    outbox: list[Outgoing] | None = None,
    deadline: float | None = None,
    final: bool = False,
) -> Any:
    previous = record.state
    record.version += 1
    record.state, record.deadline, record.final = state, deadline, final
    record.updated_at += 1
    return store.save_saga(
        record, expected_version=record.version - 1, history=_entry(record, previous), inbox=inbox, outbox=outbox or []
    )


def _out(n: int, routing_key: str = "ocis.trip.book_hotel") -> Outgoing:
    return Outgoing(f"msg-{n}", routing_key, f'{{"n": {n}}}', mandatory=n % 2 == 0)


# -- insert, update, versions ------------------------------------------------------------------------


def test_insert_then_update_with_version_check(store: Store) -> None:
    """A saga is inserted, read back as saved, and updated when the expected version matches."""
    record = _record(
        "t1",
        deadline=T0 + 5,
        data={"nested": {"list": [1, 2.5, "é", None]}},
        meta={"request": {"id": "r1", "type": "ocis.trip.book_hotel", "body": "{}"}},
    )
    _insert(store, record)
    got = store.get_saga(record.id)
    assert got == record
    assert store.find_saga("trip", "t1") == record
    _move(store, record, "car", deadline=T0 + 9)
    got = store.get_saga(record.id)
    assert got is not None
    assert (got.state, got.version, got.deadline, got.final) == ("car", 2, T0 + 9, False)
    assert got == record
    _move(store, record, "completed", final=True)
    got = store.get_saga(record.id)
    assert got is not None
    assert got.final
    assert got.deadline is None
    assert got.version == 3


def test_unknown_saga_is_none(store: Store) -> None:
    """Looking up a saga that does not exist gives None."""
    assert store.get_saga("nope") is None
    assert store.find_saga("trip", "nope") is None
    assert store.saga_history("nope") == []


def test_stale_version_raises_version_conflict_and_writes_nothing(store: Store) -> None:
    """An update naming a version the saga is no longer at fails with VersionConflict, and nothing of
    that transaction (state, history, inbox, outbox) is kept."""
    record = _record("t1")
    _insert(store, record)
    stale = store.get_saga(record.id)
    assert stale is not None
    _move(store, record, "car")
    with pytest.raises(VersionConflict):
        _move(store, stale, "compensated", inbox=("saga:trip", "late-msg"), outbox=[_out(1)])
    got = store.get_saga(record.id)
    assert got is not None
    assert got.state == "car"
    assert got.version == 2
    assert [h.to_state for h in store.saga_history(record.id)] == ["hotel", "car"]
    assert not store.seen("saga:trip", "late-msg")
    assert store.unsent(created_before=time.time() + 60) == []


def test_update_of_a_missing_saga_is_a_version_conflict(store: Store) -> None:
    """Updating a saga that was never inserted is a VersionConflict, not a silent insert."""
    record = _record("t1")
    with pytest.raises(VersionConflict):
        _move(store, record, "car")
    assert store.get_saga(record.id) is None


def test_same_type_and_key_raises_duplicate_saga_and_writes_nothing(store: Store) -> None:
    """A second saga of one type with one key is refused with DuplicateSaga; its inbox and outbox are
    not kept. The same key under another type is a different saga."""
    _insert(store, _record("t1"))
    with pytest.raises(DuplicateSaga):
        _insert(store, _record("t1", saga_id="another-id"), inbox=("saga:trip", "dup-start"), outbox=[_out(1)])
    assert store.get_saga("another-id") is None
    assert not store.seen("saga:trip", "dup-start")
    assert store.unsent(created_before=time.time() + 60) == []
    _insert(store, _record("t1", type="errand"))
    assert store.find_saga("errand", "t1") is not None


# -- history, inbox, outbox ----------------------------------------------------------------------------


def test_history_is_kept_in_order(store: Store) -> None:
    """Every transition's history entry is returned, oldest first."""
    record = _record("t1")
    _insert(store, record)
    for state in ("car", "flight", "undo_car", "undo_hotel"):
        _move(store, record, state)
    _move(store, record, "compensated", final=True)
    history = store.saga_history(record.id)
    assert [(h.from_state, h.to_state) for h in history] == [
        ("-", "hotel"),
        ("hotel", "car"),
        ("car", "flight"),
        ("flight", "undo_car"),
        ("undo_car", "undo_hotel"),
        ("undo_hotel", "compensated"),
    ]
    assert [h.at for h in history] == sorted(h.at for h in history)
    assert history[0] == _entry(_record("t1"))
    assert store.saga_history(_record("other").id) == []


def test_inbox_row_is_written_with_the_state_change(store: Store) -> None:
    """The message that caused a state change is in the inbox once the change is saved."""
    record = _record("t1")
    _insert(store, record, inbox=("saga:trip", "start-msg"))
    assert store.seen("saga:trip", "start-msg")
    assert not store.seen("saga:errand", "start-msg")
    _move(store, record, "car", inbox=("saga:trip", "reply-msg"))
    assert store.seen("saga:trip", "reply-msg")
    _move(store, record, "flight", inbox=None)  # a deadline: no inbox record
    assert store.get_saga(record.id) is not None


def test_outbox_rows_are_returned_then_unsent_until_marked_sent(store: Store) -> None:
    """save_saga returns its outbox rows; they are unsent until mark_sent, in order, limited. A row is
    stamped with its transition's time (the engine's clock, which the relay compares with)."""
    record = _record("t1")
    before = record.updated_at
    first = _insert(store, record, outbox=[_out(1), _out(2)])
    second = _move(store, record, "car", outbox=[_out(3, "ocis.trip.rent_car")])
    after = record.updated_at
    assert [r.created_at for r in [*first, *second]] == [before, before, after]
    rows = [*first, *second]
    assert [r.message_id for r in rows] == ["msg-1", "msg-2", "msg-3"]
    assert [r.id for r in rows] == sorted({r.id for r in rows})
    assert all(r.saga_id == record.id for r in rows)
    assert [(r.routing_key, r.body, r.mandatory) for r in rows] == [
        ("ocis.trip.book_hotel", '{"n": 1}', False),
        ("ocis.trip.book_hotel", '{"n": 2}', True),
        ("ocis.trip.rent_car", '{"n": 3}', False),
    ]
    assert store.unsent(created_before=after + 1) == rows
    assert store.unsent(created_before=after + 1, limit=2) == rows[:2]
    assert store.unsent(created_before=before - 10) == []
    store.mark_sent([rows[0].id, rows[2].id])
    assert store.unsent(created_before=after + 1) == [rows[1]]
    store.mark_sent([rows[1].id])
    store.mark_sent([])
    assert store.unsent(created_before=after + 1) == []


# -- queries -------------------------------------------------------------------------------------------


def test_due_sagas_are_the_due_ones_by_deadline_within_the_limit(store: Store) -> None:
    """due_sagas(now) returns sagas whose deadline has passed, earliest first, at most `limit`."""
    for key, deadline in (("c", T0 + 3), ("a", T0 + 1), ("later", T0 + 100), ("b", T0 + 2), ("exact", T0 + 10)):
        _insert(store, _record(key, deadline=deadline))
    _insert(store, _record("ended", state="completed", final=True, deadline=None))
    assert [r.key for r in store.due_sagas(T0 + 10, 100)] == ["a", "b", "c", "exact"]
    assert [r.key for r in store.due_sagas(T0 + 10, 2)] == ["a", "b"]
    assert store.due_sagas(T0, 100) == []
    assert [r.key for r in store.due_sagas(T0 + 1000, 100)] == ["a", "b", "c", "exact", "later"]


def test_list_sagas_filters_by_type_state_and_stuck_before(store: Store) -> None:
    """list_sagas filters by type, by state, and by 'stuck': not final, deadline passed or none."""
    _insert(store, _record("t1", deadline=T0 + 10, created_at=T0))
    _insert(store, _record("t2", state="car", deadline=T0 + 50, created_at=T0 + 1))
    _insert(store, _record("t3", state="completed", final=True, created_at=T0 + 2))
    _insert(store, _record("e1", type="errand", deadline=T0 + 5, created_at=T0 + 3))
    _insert(store, _record("e2", type="errand", state="mail", deadline=None, created_at=T0 + 4))

    def keys(**kw: Any) -> list[str]:
        return [r.key for r in store.list_sagas(**kw)]

    assert keys() == ["t1", "t2", "t3", "e1", "e2"]
    assert keys(saga_type="trip") == ["t1", "t2", "t3"]
    assert keys(state="hotel") == ["t1", "e1"]
    assert keys(saga_type="errand", state="hotel") == ["e1"]
    assert keys(stuck_before=T0 + 20) == ["t1", "e1", "e2"]
    assert keys(saga_type="trip", stuck_before=T0 + 20) == ["t1"]
    assert keys(stuck_before=T0) == ["e2"]
    assert keys(limit=2) == ["t1", "t2"]
    assert keys(saga_type="nothing") == []


def test_list_sagas_finds_a_key_pages_and_orders_newest_first(store: Store) -> None:
    """list_sagas filters by business key, orders newest first on request, and pages with offset."""
    for i in range(5):
        _insert(store, _record(f"k{i}", created_at=T0 + i))
    _insert(store, _record("k1", type="errand", created_at=T0 + 9))

    def keys(**kw: Any) -> list[str]:
        return [f"{r.type}/{r.key}" for r in store.list_sagas(**kw)]

    assert keys(key="k1") == ["trip/k1", "errand/k1"]
    assert keys(key="k1", saga_type="errand") == ["errand/k1"]
    assert keys(newest_first=True, limit=2) == ["errand/k1", "trip/k4"]
    assert keys(newest_first=True, limit=2, offset=2) == ["trip/k3", "trip/k2"]
    assert keys(saga_type="trip", limit=2, offset=4) == ["trip/k4"]
    assert keys(offset=10) == []


def test_count_by_state_and_outbox_backlog(store: Store) -> None:
    """count_by_state counts sagas per (type, state); outbox_backlog counts unsent rows and the oldest."""
    assert store.count_by_state() == []
    assert (store.outbox_backlog().unsent, store.outbox_backlog().oldest_created_at) == (0, None)
    _insert(store, _record("a"), outbox=[Outgoing("m1", "ocis.trip.x", "{}", False)])
    _insert(store, _record("b", created_at=T0 + 5), outbox=[Outgoing("m2", "ocis.trip.x", "{}", False)])
    _insert(store, _record("c", state="done", final=True))
    _insert(store, _record("d", type="errand"))
    counts = {(c.type, c.state, c.final): c.count for c in store.count_by_state()}
    assert counts == {("errand", "hotel", False): 1, ("trip", "done", True): 1, ("trip", "hotel", False): 2}
    backlog = store.outbox_backlog()
    assert (backlog.unsent, backlog.oldest_created_at) == (2, T0)
    store.mark_sent([r.id for r in store.unsent(T0)])
    assert store.outbox_backlog().unsent == 1


def test_history_keeps_who_acted(store: Store) -> None:
    """A history entry keeps its actor: empty for the framework, a name for an operator."""
    record = _record("a")
    _insert(store, record)
    record.version += 1
    entry = HistoryEntry(T0 + 1, "operator:retry:1", "hotel", "hotel", "operator: retry", actor="marie")
    store.save_saga(record, expected_version=1, history=entry, inbox=None, outbox=[])
    assert [h.actor for h in store.saga_history(record.id)] == ["", "marie"]


def test_saved_record_is_copied_in(store: Store) -> None:
    """Changing a record after saving it changes nothing stored."""
    record = _record("t1", data={"items": [1]}, meta={"request": {"id": "r1"}})
    _insert(store, record)
    record.data["items"].append(2)
    record.meta["request"]["id"] = "changed"
    record.state = "elsewhere"
    got = store.get_saga(record.id)
    assert got is not None
    assert (got.state, got.data, got.meta) == ("hotel", {"items": [1]}, {"request": {"id": "r1"}})


def _snapshot_case(store: Store) -> SagaRecord:
    record = _record("t1", deadline=T0, data={"items": [1]}, meta={"request": {"id": "r1"}})
    _insert(store, record)
    return record


def test_records_from_get_find_and_due_are_copies(store: Store, request: pytest.FixtureRequest) -> None:
    """Changing a record returned by get_saga, find_saga or due_sagas (data or meta) changes nothing
    stored."""
    record = _snapshot_case(store)
    for got in (store.get_saga(record.id), store.find_saga("trip", "t1"), *store.due_sagas(T0, 10)):
        assert got is not None
        got.data["items"].append(99)
        got.state = "changed"
        got.meta["request"]["id"] = "changed"
    again = store.get_saga(record.id)
    assert again is not None
    assert (again.state, again.data, again.meta) == ("hotel", {"items": [1]}, {"request": {"id": "r1"}})


def test_records_from_list_sagas_are_copies(store: Store, request: pytest.FixtureRequest) -> None:
    """Changing a record returned by list_sagas changes nothing stored."""
    record = _snapshot_case(store)
    (listed,) = store.list_sagas()
    listed.state = "changed"
    listed.version = 42
    listed.data["items"].append(99)
    again = store.get_saga(record.id)
    assert again is not None
    assert (again.state, again.version, again.data) == ("hotel", 1, {"items": [1]})


# -- durability and SQL specifics ----------------------------------------------------------------------


def test_sagas_survive_closing_and_reopening_the_store(reopen: Opener) -> None:
    """A durable store, closed and opened again on the same storage, still has the sagas, their history
    and their unsent outbox rows."""
    first = reopen()
    record = _record("t1", deadline=T0 + 1)
    rows = _insert(first, record, inbox=("saga:trip", "start-msg"), outbox=[_out(1)])
    _move(first, record, "car", deadline=T0 + 2)
    first.close()
    second = reopen()
    assert second.get_saga(record.id) == record
    assert [h.to_state for h in second.saga_history(record.id)] == ["hotel", "car"]
    assert second.seen("saga:trip", "start-msg")
    assert [r.message_id for r in second.unsent(created_before=time.time() + 60)] == [rows[0].message_id]
    assert [r.key for r in second.due_sagas(T0 + 5, 10)] == ["t1"]
    _move(second, record, "flight")  # and it goes on from the stored version
    assert second.get_saga(record.id) == record


@pytest.mark.postgres
def test_postgres_sagas_survive_a_store_restart(postgres_url: str, unique: str) -> None:
    """A PostgreSQL store closed and reopened on the same schema finds the sagas it had."""
    url = f"{postgres_url}?schema={unique}"
    try:
        first = open_store(url)
        for i in range(3):
            _insert(first, _record(f"t{i}", created_at=T0 + i))
        first.close()
        second = open_store(url)
        try:
            assert [r.key for r in second.list_sagas(saga_type="trip")] == ["t0", "t1", "t2"]
            with pytest.raises(DuplicateSaga):
                _insert(second, _record("t0", saga_id="again"))
        finally:
            second.close()
    finally:
        _drop_schema(postgres_url, unique)


def test_sqlite_finds_due_sagas_through_the_partial_index(tmp_path: Path) -> None:
    """The due query of an engine (its saga types) searches the partial (type, deadline) index: it reads
    the due sagas only, O(due), whatever the number waiting. (Against an index on the deadline alone,
    SQLite chose the (type, state) index, which reads every saga of the type.)"""
    store = open_store(f"sqlite:///{tmp_path}/sagas.db")
    try:
        assert isinstance(store, SQLiteStore)
        for i in range(50):
            _insert(store, _record(f"t{i}", deadline=None if i % 2 else T0 + i))
        db = sqlite3.connect(tmp_path / "sagas.db")
        plan = db.execute(
            f"EXPLAIN QUERY PLAN SELECT {_SAGA_COLUMNS} FROM sagas WHERE deadline IS NOT NULL AND deadline <= ?"
            " AND type IN (?, ?) ORDER BY deadline, id LIMIT ?",
            (T0 + 10, "trip", "errand", 10),
        ).fetchall()
        details = " ".join(str(row[-1]) for row in plan)
        # (the sort that follows orders the due sagas found, not the table)
        assert "SEARCH sagas USING INDEX sagas_due_by_type (type=? AND deadline" in details, details
        assert [r.key for r in store.due_sagas(T0 + 10, 10, types=("trip",))] == ["t0", "t2", "t4", "t6", "t8", "t10"]
    finally:
        store.close()


def test_two_workers_fire_one_due_deadline_once(reopen: Opener) -> None:
    """Two engines on one SQLite file or PostgreSQL schema (two connections, as two workers have) both
    see a due saga; the version check lets exactly one of them re-send its request."""
    from sagas import Event, Final, Request, Saga, SagaEngine, Start, State

    class Waiter(Saga):
        type = "waiter"
        start = Start("ocis.waiter.started", key="k", to="waiting")
        states = [
            State("waiting", sends=Request("ocis.waiter.ping"), timeout=1.0, retries=3, on_reply="done"),
            Final("done"),
        ]

    now = [T0]
    first, second = reopen(), reopen()
    a = SagaEngine([Waiter], first, clock=lambda: now[0])
    b = SagaEngine([Waiter], second, clock=lambda: now[0])
    a.handle("waiter", Event("ocis.waiter.started", {"k": "x"}))
    now[0] += 5
    due_a, due_b = first.due_sagas(now[0], 10), second.due_sagas(now[0], 10)
    assert [r.key for r in due_a] == [r.key for r in due_b] == ["x"]
    rows = a.fire(due_a[0])
    with pytest.raises(VersionConflict):
        b.fire(due_b[0])
    assert len(rows) == 1
    (saga,) = first.list_sagas()
    assert saga.attempts == 2
    reasons = [h.reason for h in first.saga_history(saga.id)]
    assert reasons.count("deadline passed: re-sent ocis.waiter.ping (attempt 2)") == 1


def _end_session(postgres_url: str, schema: str) -> None:
    """End the PostgreSQL session of the store on ``schema`` (it names itself ``sagas:<schema>``), as a
    restart would: on the test's private cluster only."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        (pid,) = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (f"sagas:{schema}",)
        ).fetchone() or (None,)
        assert pid is not None, "the store's session names itself after its schema"
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@dataclass
class _Killable:
    """A PostgreSQL store on the test's private cluster, whose session the test may end."""

    store: Store
    url: str
    schema: str

    def end_session(self) -> None:
        _end_session(self.url, self.schema)


@pytest.fixture
def killable(private_postgres: PostgresCluster, unique: str) -> Iterator[_Killable]:
    """A store in a schema of its own on the private cluster (nothing here ends a session of the
    machine's PostgreSQL); closed and dropped after the test."""
    url = private_postgres.url
    store = open_store(f"{url}?schema={unique}")
    try:
        yield _Killable(store, url, unique)
    finally:
        store.close()
        _drop_schema(url, unique)


@pytest.mark.postgres
def test_postgres_store_reconnects_after_its_session_is_killed(killable: _Killable) -> None:
    """When PostgreSQL drops the store's session (a restart), the call that meets it fails and the next
    one reconnects and works (on the session's private cluster: nothing here ends a session of the machine's)."""
    import psycopg

    store = killable.store
    store.remember("c", "m1")
    killable.end_session()
    with pytest.raises(psycopg.OperationalError):
        store.seen("c", "m1")
    assert store.seen("c", "m1")
    store.remember("c", "m2")
    assert store.seen("c", "m2")


@pytest.mark.postgres
def test_a_group_whose_session_is_killed_fails_whole_and_writes_nothing(killable: _Killable) -> None:
    """A group (one transaction) whose session dies between two writes fails as a whole: the write after
    the break does not reconnect and commit on its own (an inbox record without the saga it belongs
    with), and the first write is gone with the transaction. Outside the group, the store reconnects."""
    import psycopg

    store = killable.store

    def group_with_a_break() -> None:
        with store.group():
            store.remember("c", "before-the-break")
            killable.end_session()
            # as the saga pipeline does: each message in a part of its own, a failing part skipped
            try:
                with store.group():
                    store.remember("c", "meets-the-break")
            except psycopg.OperationalError:
                pass
            with store.group():
                store.remember("c", "after-the-break")

    with pytest.raises(psycopg.OperationalError):
        group_with_a_break()
    assert not store.seen("c", "after-the-break")
    assert not store.seen("c", "meets-the-break")
    assert not store.seen("c", "before-the-break")
    store.remember("c", "later")
    assert store.seen("c", "later")


@pytest.mark.postgres
def test_a_group_whose_last_part_meets_a_killed_session_raises_instead_of_committing_nothing(
    killable: _Killable,
) -> None:
    """psycopg ends a ``transaction()`` block on a broken connection without COMMIT and without an
    error when nothing raised inside it. The saga pipeline catches each message's failure inside its
    group: when the session dies during the last message, the group's block ends without an error, the
    earlier messages' writes are gone, and the pipeline would publish their requests and ack them (a
    request for a saga that was never committed). The group must raise instead."""
    import psycopg

    store = killable.store

    def group_whose_last_part_meets_the_break() -> None:
        with store.group():
            with store.group():
                store.remember("c", "before-the-break")
            killable.end_session()
            # as the saga pipeline does: each message in a part of its own, a failing part skipped
            try:
                with store.group():
                    store.remember("c", "meets-the-break")
            except psycopg.OperationalError:
                pass

    with pytest.raises(psycopg.OperationalError):
        group_whose_last_part_meets_the_break()
    assert not store.seen("c", "before-the-break")
    assert not store.seen("c", "meets-the-break")
    store.remember("c", "later")
    assert store.seen("c", "later")


@pytest.mark.postgres
def test_a_group_with_a_failed_statement_whose_error_was_caught_raises(killable: _Killable) -> None:
    """PostgreSQL answers COMMIT of a transaction in which a statement failed with a rollback, and no
    error: a group whose failed statement's error was caught raises, instead of looking committed."""
    import psycopg

    store = killable.store

    def group_with_a_caught_error() -> None:
        with store.group():
            store.remember("c", "before")
            with pytest.raises(psycopg.errors.NumericValueOutOfRange):
                _insert(store, _record("a", version=2**40))  # (the version column is an INTEGER)

    with pytest.raises(psycopg.OperationalError, match="rolled back"):
        group_with_a_caught_error()
    assert not store.seen("c", "before")
    store.remember("c", "later")
    assert store.seen("c", "later")


class _RecordingBus:
    """What the saga pipeline does with the broker: publishes, acks, retries and dead-letters, recorded."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.acked: list[str] = []
        self.given_back: list[str] = []

    def publish_encoded(self, messages: list[tuple[str, bytes, str, bool]]) -> None:
        self.published += [routing_key for routing_key, *_ in messages]

    def ack_many(self, inbounds: list[Any]) -> None:
        self.acked += [i.event.id for i in inbounds]

    def retry(self, inbound: Any, delay: float, error: BaseException | None, **kwargs: Any) -> None:
        self.given_back.append(inbound.event.id)

    def dead_letter(self, inbound: Any, reason: str, error: BaseException | None) -> None:
        self.given_back.append(inbound.event.id)


@pytest.mark.postgres
def test_a_saga_group_whose_session_dies_at_its_last_message_publishes_and_acks_nothing(killable: _Killable) -> None:
    """The saga pipeline applies a batch in one group and skips a message that fails: when PostgreSQL
    drops the session while it applies the last message of the batch, the starts before it are not
    committed, so their requests are not published, nor their messages acked: the batch is given back.
    (Publishing them was a request for a saga that never existed: its reply was for an unknown saga.)"""
    from types import SimpleNamespace

    from sagas._bench import BenchSaga
    from sagas._outbox import OutboxPublisher
    from sagas._saga_engine import SagaEngine
    from sagas._saga_pipeline import SagaPipeline
    from transport import Event

    store = killable.store
    engine = SagaEngine([BenchSaga], store, clock=time.time)
    bus = _RecordingBus()
    outbox = OutboxPublisher(bus, store, engine)  # type: ignore[arg-type]
    pipeline = SagaPipeline(
        {"bench": "bench"}, engine, store, outbox, clock=time.time, timer_interval=1.0, relay_interval=5.0
    )
    subscription = SimpleNamespace(queue="bench", durable=True)
    inbounds = [
        SimpleNamespace(
            subscription=subscription,
            event=Event("bench.orders.placed", {"order": f"o{i}"}),
            attempt=1,
            message_id=f"m{i}",
        )
        for i in range(3)
    ]
    handle = engine.handle

    def handle_then_lose_the_session(saga_type: str, event: Event) -> Any:
        if event.id == inbounds[-1].event.id:  # the last message meets a restart of PostgreSQL
            killable.end_session()
        return handle(saga_type, event)

    engine.handle = handle_then_lose_the_session  # type: ignore[method-assign]
    pipeline.apply("bench", inbounds)  # type: ignore[arg-type]
    assert bus.published == []
    assert bus.acked == []
    assert sorted(bus.given_back) == sorted(i.event.id for i in inbounds)
    assert store.count_sagas() == 0
    engine.handle = handle  # type: ignore[method-assign]
    pipeline.apply("bench", inbounds)  # type: ignore[arg-type]  # (redelivered: the store reconnected)
    assert bus.published == ["bench.stock.reserve"] * 3
    assert sorted(bus.acked) == sorted(i.event.id for i in inbounds)
    assert store.count_sagas() == 3


def test_deadlines_fire_in_one_group_and_a_conflict_skips_only_its_saga(reopen: Opener) -> None:
    """fire_due applies the due sagas in one transaction with a savepoint each: a saga that a message
    moved after the due query is skipped, and the others' firings are committed."""
    from sagas._bench import BenchSaga
    from sagas._saga_engine import SagaEngine
    from transport import Event

    store = reopen()
    now = [T0]
    engine = SagaEngine([BenchSaga], store, clock=lambda: now[0])
    ids = []
    for i in range(3):
        started = engine.handle("bench", Event("bench.orders.placed", {"order": f"o{i}"})).saga
        assert started is not None
        ids.append(started.id)
    now[0] += 60  # past the first step's deadline (30 s)
    due_sagas = store.due_sagas

    def racing_due_sagas(*args: Any, **kwargs: Any) -> list[SagaRecord]:
        found = due_sagas(*args, **kwargs)
        moved = store.get_saga(ids[1])  # a message moves this one before its deadline fires
        assert moved is not None
        moved.version += 1
        store.save_saga(moved, expected_version=moved.version - 1, history=_entry(moved), inbox=None, outbox=[])
        return found

    store.due_sagas = racing_due_sagas  # type: ignore[method-assign]
    rows = engine.fire_due()
    assert sorted(r.saga_id for r in rows) == sorted([ids[0], ids[2]])  # each request sent again
    after = reopen()  # another connection sees what was committed
    records = [after.get_saga(i) for i in ids]
    assert [r.attempts if r else None for r in records] == [2, 1, 2]
    assert [r.version if r else None for r in records] == [2, 2, 2]


def test_a_version_1_store_is_upgraded_when_it_opens(tmp_path: Path) -> None:

    path = tmp_path / "old.db"
    store = SQLiteStore(str(path))
    store.save_saga(
        _record("a", deadline=T0), expected_version=None, history=_entry(_record("a")), inbox=None, outbox=[]
    )
    store.close()
    db = sqlite3.connect(path)  # as version 1 left it
    db.executescript(
        "DROP INDEX sagas_due_by_type; CREATE INDEX sagas_due ON sagas (deadline) WHERE deadline"
        " IS NOT NULL; ALTER TABLE saga_history DROP COLUMN actor;"
        " DELETE FROM schema_version; INSERT INTO schema_version VALUES (1);"
    )
    db.close()
    store = SQLiteStore(str(path))
    assert [r.key for r in store.due_sagas(T0 + 1, 10, types=("trip",))] == ["a"]
    store.close()
    db = sqlite3.connect(path)
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    versions = [r[0] for r in db.execute("SELECT version FROM schema_version")]
    db.close()
    assert "sagas_due_by_type" in indexes
    assert "sagas_due" not in indexes
    assert max(versions) == SCHEMA_VERSION


def test_a_version_2_store_gets_the_history_actor_when_it_opens(tmp_path: Path) -> None:
    """Opening a schema-2 store adds the history's actor column; old entries read with no actor."""

    path = tmp_path / "old.db"
    store = SQLiteStore(str(path))
    _insert(store, _record("a"))
    store.close()
    db = sqlite3.connect(path)  # as version 2 left it
    db.executescript(
        "ALTER TABLE saga_history DROP COLUMN actor; DELETE FROM schema_version; INSERT INTO schema_version VALUES (2);"
    )
    db.close()
    store = SQLiteStore(str(path))
    record = store.get_saga("id-trip-a")
    assert record is not None
    record.version += 1
    entry = HistoryEntry(T0 + 1, "operator:retry:1", "hotel", "hotel", "operator: retry", actor="marie")
    store.save_saga(record, expected_version=1, history=entry, inbox=None, outbox=[])
    assert [h.actor for h in store.saga_history(record.id)] == ["", "marie"]
    store.close()


@pytest.mark.postgres
def test_a_version_2_postgres_store_gets_the_history_actor_when_it_opens(postgres_url: str, unique: str) -> None:
    """On PostgreSQL too, opening a schema-2 store adds the history's actor column."""
    import psycopg
    from psycopg import sql

    url = f"{postgres_url}?schema={unique}"
    try:
        store = open_store(url)
        _insert(store, _record("a"))
        store.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:  # as version 2 left it
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(unique)))
            conn.execute("ALTER TABLE saga_history DROP COLUMN actor")
            conn.execute("UPDATE schema_version SET version = 2")
        store = open_store(url)
        assert [h.actor for h in store.saga_history("id-trip-a")] == [""]
        store.close()
    finally:
        _drop_schema(postgres_url, unique)


@pytest.mark.postgres
def test_opening_a_current_postgres_store_takes_no_lock_against_running_groups(postgres_url: str, unique: str) -> None:
    """A worker that joins running ones, or an operator tool, opens the store while groups hold row locks
    on its tables. Opening a store whose schema is current runs no DDL, so it neither waits for those
    groups nor deadlocks with them (CREATE INDEX IF NOT EXISTS takes a table lock even when the index
    exists: seen as 'deadlock detected' when the console's tests opened the store beside two workers)."""
    url = f"{postgres_url}?schema={unique}"
    running = open_store(url)
    try:
        with running.group():  # a group in flight: row-exclusive locks on the inbox and the sagas
            _insert(running, _record("busy"), inbox=("saga:trip", "m-busy"))
            opened = ThreadPoolExecutor(1).submit(lambda: open_store(url, create=False))
            joiner = opened.result(timeout=10)  # with the DDL it waited here for the group to end
            assert joiner.get_saga("id-trip-busy") is None  # the group has not committed
        assert joiner.get_saga("id-trip-busy") is not None
        joiner.close()
    finally:
        running.close()
        _drop_schema(postgres_url, unique)


def test_a_duplicate_or_conflict_inside_a_group_leaves_the_group_usable(reopen: Opener) -> None:
    """Inside a group, a duplicate start and a version conflict are refused without leaving anything
    written, and without a database error, so the group goes on and commits the other writes (on
    PostgreSQL, a failed statement would have aborted the whole transaction). SQLite refuses them before
    it writes; PostgreSQL sends the writes first and rolls back to a savepoint of save_saga's own
    (see test_postgres_pipeline.py)."""
    store = reopen()
    first = _record("a")
    store.save_saga(first, expected_version=None, history=_entry(first), inbox=None, outbox=[])
    with store.group():
        twin = _record("a", saga_id="id-other")
        with pytest.raises(DuplicateSaga):
            store.save_saga(twin, expected_version=None, history=_entry(twin), inbox=("c", "m1"), outbox=[])
        stale = _record("a", version=5)
        with pytest.raises(VersionConflict):
            store.save_saga(stale, expected_version=4, history=_entry(stale), inbox=("c", "m2"), outbox=[])
        other = _record("b")
        rows = store.save_saga(
            other,
            expected_version=None,
            history=_entry(other),
            inbox=("c", "m3"),
            outbox=[Outgoing("out-1", "ocis.trip.booked", "{}", False)],
        )
    after = reopen()
    assert after.get_saga("id-other") is None
    assert [r.key for r in after.list_sagas("trip")] == ["a", "b"]
    assert (after.seen("c", "m1"), after.seen("c", "m2"), after.seen("c", "m3")) == (False, False, True)
    assert [r.message_id for r in after.unsent(T0 + 10)] == ["out-1"] == [r.message_id for r in rows]
    after.mark_sent([r.id for r in rows])
    assert after.unsent(T0 + 10) == []


# -- claims: one worker at a time on a de-duplicated message ------------------------------------------


@pytest.fixture(params=BACKENDS)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store of each backend; every call opens the same storage again (as a second worker)."""
    with _opener(request.param, request, tmp_path) as open_again:
        yield open_again


def test_a_claim_held_by_one_worker_is_refused_to_another(shared: Opener) -> None:
    """A live claim is the holder's alone: another owner's claim fails, a second claim by the holder succeeds."""
    a, b = shared(), shared()
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)
    assert not b.claim("hotel.book", "m1", "worker-b", T0 + 31, T0 + 1)
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 32, T0 + 2)
    assert b.claim("hotel.book", "m2", "worker-b", T0 + 30, T0)  # another message
    assert b.claim("car.book", "m1", "worker-b", T0 + 30, T0)  # another handler


def test_an_expired_claim_is_taken_over(shared: Opener) -> None:
    """A claim whose lease ran out (its owner died) goes to the next owner who asks."""
    a, b = shared(), shared()
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)
    assert not b.claim("hotel.book", "m1", "worker-b", T0 + 60, T0 + 30)
    assert b.claim("hotel.book", "m1", "worker-b", T0 + 61, T0 + 31)
    assert not a.claim("hotel.book", "m1", "worker-a", T0 + 62, T0 + 32)


def test_renewing_extends_every_claim_of_its_owner_only(shared: Opener) -> None:
    """renew_claims moves the lease of the owner's claims, and leaves other owners' claims to expire."""
    a, b, c = shared(), shared(), shared()
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)
    assert a.claim("car.book", "m2", "worker-a", T0 + 30, T0)
    assert b.claim("hotel.book", "m3", "worker-b", T0 + 30, T0)
    a.renew_claims("worker-a", T0 + 90)
    assert not c.claim("hotel.book", "m1", "worker-c", T0 + 100, T0 + 60)
    assert not c.claim("car.book", "m2", "worker-c", T0 + 100, T0 + 60)
    assert c.claim("hotel.book", "m3", "worker-c", T0 + 100, T0 + 60)


def test_a_released_claim_is_free_and_only_its_owner_releases_it(shared: Opener) -> None:
    """release drops the owner's claim; a release by another owner leaves it in place."""
    a, b = shared(), shared()
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)
    b.release("hotel.book", "m1", "worker-b")
    assert not b.claim("hotel.book", "m1", "worker-b", T0 + 30, T0)
    a.release("hotel.book", "m1", "worker-a")
    assert b.claim("hotel.book", "m1", "worker-b", T0 + 30, T0)


def test_a_release_in_a_group_commits_with_the_inbox_record(reopen: Opener) -> None:
    """Released inside a group, the claim goes with the group's writes: a failed group keeps it."""
    a, b = reopen(), reopen()
    assert a.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)

    def failed_group() -> None:
        with a.group():
            a.remember("hotel.book", "m1")
            a.release("hotel.book", "m1", "worker-a")
            raise RuntimeError("the store failed")

    with pytest.raises(RuntimeError):
        failed_group()
    assert not b.seen("hotel.book", "m1")
    assert not b.claim("hotel.book", "m1", "worker-b", T0 + 30, T0)
    with a.group():
        a.remember("hotel.book", "m1")
        a.release("hotel.book", "m1", "worker-a")
    assert b.seen("hotel.book", "m1")
    assert b.claim("hotel.book", "m1", "worker-b", T0 + 30, T0)


def test_a_version_3_store_gets_the_claims_table_when_it_opens(tmp_path: Path) -> None:
    """Opening a schema-3 store (no claims table) creates it and records the current version."""
    path = tmp_path / "old.db"
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)  # as version 3 left it
    db.executescript("DROP TABLE claims; DELETE FROM schema_version; INSERT INTO schema_version VALUES (3);")
    db.close()
    store = SQLiteStore(str(path))
    assert store.claim("hotel.book", "m1", "worker-a", T0 + 30, T0)
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def _indexes(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sagas'")}


def test_a_version_4_store_gets_the_listing_indexes_when_it_opens(tmp_path: Path) -> None:
    """Opening a schema-4 store adds the keyset listing indexes and drops the (type, state) one they replace."""
    path = tmp_path / "old.db"
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)  # as version 4 left it
    for name in _indexes(db) - {"sagas_due_by_type"}:
        if not name.startswith("sqlite_"):
            db.execute(f"DROP INDEX {name}")
    db.executescript(
        "CREATE INDEX sagas_by_state ON sagas (type, state);"
        "DELETE FROM schema_version; INSERT INTO schema_version VALUES (4);"
    )
    db.close()
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    names = _indexes(db)
    assert "sagas_by_state" not in names
    assert {
        "sagas_by_created",
        "sagas_by_type_created",
        "sagas_by_type_state",
        "sagas_by_state_created",
        "sagas_by_key",
        "sagas_open_by_created",
    } <= names
    db.close()


# -- keyset paging and listing filters -----------------------------------------------------------------


def _page_all(store: Store, newest_first: bool, limit: int, **filters: Any) -> list[str]:
    """Every saga id, page by page with the keyset cursor."""
    ids: list[str] = []
    after: tuple[float, str] | None = None
    while True:
        page = store.list_sagas(limit=limit, newest_first=newest_first, after=after, **filters)
        ids += [r.id for r in page]
        if len(page) < limit:
            return ids
        after = (page[-1].created_at, page[-1].id)


def test_keyset_pages_cover_every_saga_once_in_both_orders_with_ties(store: Store) -> None:
    """Pages by (created_at, id) cursor list every saga exactly once, oldest or newest first, though many
    sagas share a creation time."""
    for i in range(23):
        _insert(store, _record(f"k{i:02d}", saga_id=f"s{(i * 7) % 23:02d}", created_at=T0 + i // 5))
    expected = [r.id for r in store.list_sagas()]
    assert len(expected) == 23
    for limit in (1, 4, 5, 7, 23, 50):
        assert _page_all(store, False, limit) == expected
        assert _page_all(store, True, limit) == expected[::-1]
    # a cursor in the middle of a tie: the rest of the tie, then later sagas
    third = store.list_sagas(limit=3)[-1]
    assert [r.id for r in store.list_sagas(after=(third.created_at, third.id))] == expected[3:]
    assert [r.id for r in store.list_sagas(after=(third.created_at, third.id), newest_first=True)] == expected[:2][::-1]


def test_list_sagas_filters_by_key_prefix_failed_and_creation_time(store: Store) -> None:
    """key_prefix keeps keys that start with it (any characters, LIKE wildcards included); failed keeps sagas
    parked in failed; created_after <= created_at < created_before."""
    keys = ["up-1", "up-2", "up-10", "upload", "u", "up", "up%x", "up_y", "UP-3", "up\\z", "upé", "up\U0010ffff"]
    for i, k in enumerate(keys):
        _insert(store, _record(k, state="failed" if i % 3 == 0 else "hotel", created_at=T0 + i))
    _insert(store, _record("up-1", type="errand", state="failed", created_at=T0 + 100))

    def found(**kw: Any) -> list[str]:
        return [f"{r.type}/{r.key}" for r in store.list_sagas(**kw)]

    def trips(*ks: str) -> list[str]:
        return [f"trip/{k}" for k in ks]

    assert found(key_prefix="up-", saga_type="trip") == trips("up-1", "up-2", "up-10")
    assert found(key_prefix="up-") == [*trips("up-1", "up-2", "up-10"), "errand/up-1"]
    assert found(key_prefix="up%") == trips("up%x")
    assert found(key_prefix="up_") == trips("up_y")
    assert found(key_prefix="up\\") == trips("up\\z")
    assert found(key_prefix="upé") == trips("upé")
    assert found(key_prefix="up\U0010ffff") == trips("up\U0010ffff")
    assert found(key_prefix="up", saga_type="trip") == trips(*[k for k in keys if k.startswith("up")])
    assert found(key_prefix="nothing") == []
    assert found(failed=True, saga_type="trip") == trips(*keys[::3])
    assert found(failed=True, newest_first=True, limit=2) == ["errand/up-1", f"trip/{keys[9]}"]
    assert found(created_after=T0 + 2, created_before=T0 + 5) == trips(*keys[2:5])
    assert found(created_after=T0 + 10) == [*trips(*keys[10:]), "errand/up-1"]
    assert found(created_before=T0 + 1) == trips(keys[0])
    assert found(key_prefix="up-", failed=True, created_after=T0 + 1) == ["errand/up-1"]
    first = store.list_sagas(key_prefix="up", limit=2)
    rest = store.list_sagas(key_prefix="up", after=(first[-1].created_at, first[-1].id))
    assert [r.key for r in first + rest] == [r.key for r in store.list_sagas(key_prefix="up")]
    assert found(key_prefix="up-", offset=1, limit=2) == trips("up-2", "up-10")


def test_prefix_upper_bound_is_the_least_string_after_every_extension() -> None:
    """The bound bumps the last character that can be bumped (skipping surrogates); none is left for an
    empty prefix or one of only U+10FFFF."""
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("") is None


def test_sqlite_lists_through_the_listing_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each listing filter and order is an index search on SQLite, never a scan of the sagas table."""
    store = SQLiteStore(str(tmp_path / "plan.db"))
    db = sqlite3.connect(tmp_path / "plan.db")
    cursor = (T0, "x")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"after": cursor, "newest_first": True}, "sagas_by_created"),
        ({"saga_type": "t", "after": cursor}, "sagas_by_type_created"),
        ({"saga_type": "t", "state": "s", "after": cursor}, "sagas_by_type_state"),
        ({"failed": True, "after": cursor}, "sagas_by_state_created"),
        ({"key_prefix": "up-"}, "sagas_by_key"),
        ({"key": "k"}, "sagas_by_key"),
        ({"created_after": T0, "created_before": T0 + 1}, "sagas_by_created"),
    ]
    plans: list[str] = []
    real = inspect.getattr_static(SQLiteStore, "_execute")

    def explain(self: SQLiteStore, statement: str, params: Any = ()) -> Any:
        plans.append(" ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + statement, params)))
        return real(self, statement, params)

    monkeypatch.setattr(SQLiteStore, "_execute", explain)
    try:
        for filters, index in cases:
            plans.clear()
            store.list_sagas(**filters)
            assert f"INDEX {index}" in plans[0], (filters, plans)
            assert "SCAN sagas" not in plans[0], (filters, plans)
    finally:
        store.close()
        db.close()


@pytest.mark.postgres
def test_postgres_lists_through_the_listing_indexes(
    postgres_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL each listing filter and order of the store's own queries is an index scan (sequential
    scans disabled, to ask whether an index can serve it at all, as the planner does on a big table)."""
    import psycopg

    from sagas import PostgresStore

    store = open_store(f"{postgres_url}?schema={unique}")
    db = psycopg.connect(postgres_url, autocommit=True)
    plans: list[str] = []
    real = inspect.getattr_static(PostgresStore, "_execute")
    to_postgres = inspect.getattr_static(PostgresStore, "_sql")

    def explain(self: PostgresStore, statement: str, params: Any = ()) -> Any:
        rows = db.execute("EXPLAIN " + to_postgres(self, statement), params)
        plans.append("\n".join(str(r[0]) for r in rows))
        return real(self, statement, params)

    try:
        db.execute(f"SET search_path TO {unique}")
        db.execute("SET enable_seqscan = off")
        monkeypatch.setattr(PostgresStore, "_execute", explain)
        cursor = (T0, "x")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"after": cursor, "newest_first": True}, "sagas_by_created"),
            ({"saga_type": "t", "after": cursor}, "sagas_by_type_created"),
            ({"saga_type": "t", "state": "s", "after": cursor}, "sagas_by_type_state|sagas_by_state_created"),
            ({"failed": True, "after": cursor}, "sagas_by_state_created"),
            ({"key_prefix": "up-"}, "sagas_by_key"),
            ({"key": "k"}, "sagas_by_key"),
            ({"created_after": T0, "created_before": T0 + 1}, "sagas_by_created"),
        ]
        for filters, index in cases:
            plans.clear()
            store.list_sagas(**filters)
            # (on an empty table either of two indexes that both serve a filter may win)
            assert any(name in plans[0] for name in index.split("|")), (filters, plans)
            assert "Seq Scan" not in plans[0], (filters, plans)
    finally:
        monkeypatch.undo()
        store.close()
        db.close()
        _drop_schema(postgres_url, unique)


# -- the console's reads: last reasons, a saga's outbox rows ------------------------------------------


def test_last_reasons_gives_each_sagas_latest_history_entry(store: Store) -> None:
    """One call gives the latest history entry of each saga asked for that has one; ids that are not
    there are left out; a list longer than one statement's chunk is read whole."""
    a, b = _record("a"), _record("b", created_at=T0 + 1)
    _insert(store, a)
    _insert(store, b)
    _move(store, a, "flight")
    record = store.get_saga(a.id)
    assert record is not None
    record.version += 1
    record.state = "failed"
    store.save_saga(
        record,
        expected_version=record.version - 1,
        history=HistoryEntry(T0 + 9, "m-op", "flight", "failed", "boom <script>", "marie"),
        inbox=None,
        outbox=[],
    )
    last = store.last_reasons([a.id, b.id, "nope", a.id])
    assert set(last) == {a.id, b.id}
    assert last[a.id] == HistoryEntry(T0 + 9, "m-op", "flight", "failed", "boom <script>", "marie")
    assert last[b.id].to_state == "hotel"
    assert last[b.id].reason == "test"
    many = [_record(f"k{i}", created_at=T0 + 10 + i) for i in range(520)]
    with store.group():
        for r in many:
            _insert(store, r)
    assert len(store.last_reasons([r.id for r in many])) == 520
    assert store.last_reasons([]) == {}


def test_outbox_rows_lists_a_sagas_messages_newest_first_with_their_sending(store: Store) -> None:
    """A saga's outbox rows, newest first up to the limit, say which were sent; other sagas' rows are
    not listed."""
    a, b = _record("a"), _record("b")
    rows = _insert(store, a, outbox=[_out(1), _out(2)])
    _insert(store, b, outbox=[_out(3)])
    rows += _move(store, a, "flight", outbox=[_out(4, "ocis.trip.book_flight")])
    store.mark_sent([rows[0].id])
    listed = store.outbox_rows(a.id)
    assert [o.row.message_id for o in listed] == ["msg-4", "msg-2", "msg-1"]
    assert [o.sent_at is not None for o in listed] == [False, False, True]
    assert listed[0].row.routing_key == "ocis.trip.book_flight"
    assert listed[0].row.body == '{"n": 4}'
    assert listed[0].row.saga_id == a.id
    assert [o.row.message_id for o in store.outbox_rows(a.id, limit=2)] == ["msg-4", "msg-2"]
    assert [o.row.message_id for o in store.outbox_rows(b.id)] == ["msg-3"]
    assert store.outbox_rows("nope") == []


def test_a_version_5_store_gets_the_outbox_index_when_it_opens(tmp_path: Path) -> None:
    """Opening a schema-5 store adds the index of the outbox on saga_id and keeps its rows."""
    path = tmp_path / "old.db"
    store = SQLiteStore(str(path))
    saga = _record("a")
    _insert(store, saga, outbox=[_out(1)])
    store.close()
    db = sqlite3.connect(path)  # as version 5 left it
    db.executescript("DROP INDEX outbox_by_saga; DELETE FROM schema_version; INSERT INTO schema_version VALUES (5);")
    db.close()
    store = SQLiteStore(str(path))
    assert [o.row.message_id for o in store.outbox_rows(saga.id)] == ["msg-1"]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'")}
    assert "outbox_by_saga" in names
    plan = " ".join(
        str(r) for r in db.execute("EXPLAIN QUERY PLAN SELECT id FROM outbox WHERE saga_id = 'x' ORDER BY id DESC")
    )
    assert "outbox_by_saga" in plan
    db.close()


@pytest.mark.postgres
def test_postgres_reads_last_reasons_and_outbox_rows_through_indexes(postgres_url: str, unique: str) -> None:
    """On PostgreSQL (sequential scans off) the outbox rows of a saga read outbox_by_saga, and the last
    reasons read the history's primary key."""
    import psycopg

    store = open_store(f"{postgres_url}?schema={unique}")
    db = psycopg.connect(postgres_url, autocommit=True)
    try:
        db.execute(f"SET search_path TO {unique}")
        db.execute("SET enable_seqscan = off")
        plan = " ".join(
            str(r[0]) for r in db.execute("EXPLAIN SELECT id FROM outbox WHERE saga_id = 'x' ORDER BY id DESC LIMIT 5")
        )
        assert "outbox_by_saga" in plan
        plan = " ".join(
            str(r[0])
            for r in db.execute(
                "EXPLAIN SELECT h.reason FROM saga_history h WHERE h.saga_id IN ('a', 'b')"
                " AND h.seq = (SELECT max(l.seq) FROM saga_history l WHERE l.saga_id = h.saga_id)"
            )
        )
        assert "saga_history_pkey" in plan
        assert "Seq Scan" not in plan
    finally:
        store.close()
        db.close()
        _drop_schema(postgres_url, unique)
