"""The PostgreSQL store sends a group's statements in pipeline mode: round trips per group, counted on
the wire (libpq's trace of the store's connection), and a version conflict or a duplicate start found
after the call's writes were sent leaves nothing of them."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from typing import IO, Any

import pytest

from sagas import SagaRecord, open_store
from sagas._store import DuplicateSaga, HistoryEntry, Outgoing, PostgresStore, VersionConflict

pytestmark = pytest.mark.postgres

T0 = 1_000_000.0


class _Wire:
    """Counts the round trips of the store's connection in libpq's trace of its messages: a Sync (or a
    simple Query) waits for the server's ReadyForQuery; a Flush sent while none is awaited waits for the
    results of what was sent before it (a read in pipeline mode). A Flush sent while a Sync is awaited
    waits for nothing more."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.conn: Any = None

    def attach(self, conn: Any) -> Any:
        self.conn = conn
        self._trace()
        return conn

    def _trace(self) -> None:
        from psycopg import pq

        self.conn.pgconn.trace(self.file.fileno())
        self.conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def round_trips(self) -> int:
        """The round trips since the last call."""
        self.conn.pgconn.untrace()  # (writes out what libpq buffered)
        self.file.seek(0)
        lines = self.file.read().decode(errors="replace").splitlines()
        self.file.seek(0)
        self.file.truncate()
        self._trace()
        trips = awaited = 0
        for line in lines:
            side, _, message = [*line.split("\t"), "", ""][:3]
            kind = message.split(" ")[0]
            if side == "F" and kind in ("Sync", "Query"):
                trips, awaited = trips + 1, awaited + 1
            elif side == "F" and kind == "Flush" and not awaited:
                trips += 1
            elif side == "B" and kind == "ReadyForQuery":
                awaited -= 1
        return trips


@pytest.fixture
def traced(postgres_url: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PostgresStore, _Wire]]:
    """A PostgreSQL store in a schema of its own whose connection's messages are traced."""
    import psycopg
    from psycopg import sql

    stack = ExitStack()
    wire = _Wire(stack.enter_context(tempfile.TemporaryFile()))  # noqa: SIM115 - closed by the stack
    connect = psycopg.connect
    monkeypatch.setattr(psycopg, "connect", lambda *a, **kw: wire.attach(connect(*a, **kw)))
    store = open_store(f"{postgres_url}?schema={unique}")
    assert isinstance(store, PostgresStore)
    wire.round_trips()  # (from here on)
    try:
        yield store, wire
    finally:
        store.close()
        stack.close()
        with connect(postgres_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


def _record(key: str, version: int = 1, state: str = "hotel") -> SagaRecord:
    return SagaRecord(
        id=f"id-{key}", type="trip", key=key, state=state, data={"key": key}, version=version, attempts=1,
        created_at=T0, updated_at=T0 + version,
    )  # fmt: skip


def _entry(record: SagaRecord, message_id: str) -> HistoryEntry:
    return HistoryEntry(record.updated_at, message_id, "-", record.state, "test")


def _outs(key: str, n: int) -> list[Outgoing]:
    return [Outgoing(f"out-{key}-{i}", "ocis.trip.book", "{}", False) for i in range(n)]


def test_a_saga_group_takes_three_round_trips_per_message_and_one_to_commit(
    traced: tuple[PostgresStore, _Wire],
) -> None:
    """A group of ten saga messages, each in a part of its own as the saga pipeline applies them (inbox
    read, saga read, save with history, inbox record and two outbox rows): one round trip per read, one
    per save, one for the commit. (Each statement was a round trip of its own: 9 per message.)"""
    store, wire = traced
    for i in range(10):
        store.save_saga(_record(f"k{i}"), expected_version=None, history=_entry(_record(f"k{i}"), f"s{i}"),
                        inbox=None, outbox=[])  # fmt: skip
    wire.round_trips()
    rows = []
    with store.group():
        for i in range(10):
            with store.group():
                assert not store.seen("saga:trip", f"m{i}")
                current = store.get_saga(f"id-k{i}")
                assert current is not None
                moved = _record(f"k{i}", version=2, state="car")
                rows += store.save_saga(
                    moved, expected_version=1, history=_entry(moved, f"m{i}"), inbox=("saga:trip", f"m{i}"),
                    outbox=_outs(f"k{i}", 2),
                )  # fmt: skip
    assert wire.round_trips() == 3 * 10 + 1
    assert len({r.id for r in rows}) == 20
    assert [r.message_id for r in store.unsent(T0 + 10)] == [r.message_id for r in rows]
    wire.round_trips()
    store.mark_sent([r.id for r in rows])
    assert wire.round_trips() == 1
    assert store.unsent(T0 + 10) == []


def test_a_settle_group_and_a_batch_of_claims_with_their_reads_take_round_trips_by_batch_not_by_message(
    traced: tuple[PostgresStore, _Wire],
) -> None:
    """What a handler's settle writes (inbox records, cached replies, releases of claims) commits in one
    round trip; a turn's claims (one statement, committed) and their inbox and reply-cache reads take as
    many round trips for 100 messages as for 10."""
    store, wire = traced
    few = [("svc.h", f"m{i}") for i in range(10)]
    assert store.claim_many(few, "w1", T0 + 30, T0) == set(few)
    claim_trips = wire.round_trips()
    assert store.answers(few, few) == (set(), {})
    read_trips = wire.round_trips()
    with store.group():
        for i in range(10):
            store.remember("svc.h", f"m{i}")
            store.cache_reply("svc.h", f"m{i}", f"reply-{i}")
            store.release("svc.h", f"m{i}", "w1")
    assert wire.round_trips() == 1
    many = [("svc.g", f"m{i}") for i in range(100)]
    assert store.claim_many(many, "w1", T0 + 30, T0) == set(many)
    assert wire.round_trips() == claim_trips <= 2
    assert store.answers(many, many) == (set(), {})
    assert wire.round_trips() == read_trips <= 2
    assert store.answers([("svc.h", "m3")], [("svc.h", "m3")]) == ({("svc.h", "m3")}, {("svc.h", "m3"): "reply-3"})


def test_a_conflict_or_duplicate_found_after_the_writes_were_sent_leaves_nothing_of_them(
    traced: tuple[PostgresStore, _Wire],
) -> None:
    """In a group, save_saga sends its statements before it reads the row count that tells a conflict:
    a version conflict (also one whose history entry's sequence is taken, a database error) and a
    duplicate start raise, leave no history entry, inbox record or outbox row, and the group goes on and
    commits the rest."""
    store, _ = traced
    first = _record("a")
    store.save_saga(first, expected_version=None, history=_entry(first, "s-a"), inbox=None, outbox=[])
    moved = _record("a", version=2, state="car")
    store.save_saga(moved, expected_version=1, history=_entry(moved, "m-a"), inbox=None, outbox=[])
    with store.group():
        stale = _record("a", version=2, state="undo")  # (sequence 2 of its history is taken)
        with pytest.raises(VersionConflict):
            store.save_saga(stale, expected_version=1, history=_entry(stale, "m1"), inbox=("c", "m1"),
                            outbox=_outs("m1", 2))  # fmt: skip
        ahead = _record("a", version=7, state="undo")
        with pytest.raises(VersionConflict):
            store.save_saga(ahead, expected_version=6, history=_entry(ahead, "m2"), inbox=("c", "m2"),
                            outbox=_outs("m2", 1))  # fmt: skip
        twin = SagaRecord(id="id-twin", type="trip", key="a", state="hotel", data={}, version=1)
        with pytest.raises(DuplicateSaga):
            store.save_saga(twin, expected_version=None, history=_entry(twin, "m3"), inbox=("c", "m3"),
                            outbox=_outs("m3", 1))  # fmt: skip
        other = _record("b")
        rows = store.save_saga(other, expected_version=None, history=_entry(other, "m4"), inbox=("c", "m4"),
                               outbox=_outs("b", 1))  # fmt: skip
    saga = store.get_saga("id-a")
    assert saga is not None
    assert (saga.state, saga.version) == ("car", 2)
    assert [(h.message_id, h.to_state) for h in store.saga_history("id-a")] == [("s-a", "hotel"), ("m-a", "car")]
    assert store.get_saga("id-twin") is None
    assert store.saga_history("id-twin") == []
    assert [store.seen("c", m) for m in ("m1", "m2", "m3", "m4")] == [False, False, False, True]
    assert [r.message_id for r in store.unsent(T0 + 10)] == ["out-b-0"] == [r.message_id for r in rows]


def test_a_group_reads_its_inbox_records_and_sagas_ahead_in_round_trips_by_group_not_by_message(
    traced: tuple[PostgresStore, _Wire],
) -> None:
    """The first reads of a group of saga messages (inbox records, sagas by key and by id: GroupReads)
    take as many round trips for 10 messages as for 1, inside the group; each message's save one."""
    from sagas._prefetch import GroupReads

    store, wire = traced
    for i in range(10):
        record = _record(f"k{i}")
        store.save_saga(record, expected_version=None, history=_entry(record, f"s{i}"), inbox=("saga:trip", f"s{i}"),
                        outbox=[])  # fmt: skip
    wire.round_trips()
    with store.group():
        one = GroupReads(store, "saga:trip", ["s0"], ["id-k2"], [("trip", "k0")])
        trips_for_one = wire.round_trips()
        found = GroupReads(
            store,
            "saga:trip",
            [f"s{i}" for i in range(3)] + [f"m{i}" for i in range(7)],
            ["id-k2", "id-x", *(f"id-k{i}" for i in range(5, 10))],
            [("trip", "k0"), ("trip", "k1"), ("trip", "nope")],
        )
        assert wire.round_trips() == trips_for_one <= 3
        for i in range(10):
            moved = _record(f"k{i}", version=2, state="car")
            store.save_saga(moved, expected_version=1, history=_entry(moved, f"m{i}"), inbox=("saga:trip", f"m{i}"),
                            outbox=_outs(f"k{i}", 1))  # fmt: skip
        assert wire.round_trips() == 10
    assert wire.round_trips() == 1
    assert one.seen("saga:trip", "s0") is True
    assert [found.seen("saga:trip", m) for m in ("s0", "s2", "m0")] == [True, True, False]
    by_key = found.find_saga("trip", "k1")
    assert by_key is not None
    assert (by_key.id, by_key.version) == ("id-k1", 1)  # (read before the move)
    by_id = found.get_saga("id-k2")
    assert by_id is not None
    assert by_id.key == "k2"
    assert found.get_saga("id-x") is None
