"""Reads done ahead for a group of saga messages (sagas._prefetch): one statement each for the group,
each answer given once, and what the group wrote read from the store after that."""

from __future__ import annotations

import threading
from typing import Any

from sagas import App, Event, EventBus, MemoryStore, SagaContext, Service, Start, Step, StepSaga, Store, Worker
from sagas._prefetch import GroupReads
from sagas._store import HistoryEntry, SagaRecord
from tests.helpers import wait_for


def _saga(store: Store, saga_id: str, key: str, state: str = "waiting") -> SagaRecord:
    record = SagaRecord(id=saga_id, type="trip", key=key, state=state, data={}, created_at=1.0, updated_at=1.0)
    store.save_saga(
        record, expected_version=None, history=HistoryEntry(1.0, "m", "-", state, "test"), inbox=None, outbox=()
    )
    return record


def test_each_read_is_answered_ahead_once_then_by_the_store(any_store: Store) -> None:
    _saga(any_store, "s1", "k1")
    _saga(any_store, "s2", "k2")
    any_store.remember("saga:trip", "m-old")
    reads = GroupReads(any_store, "saga:trip", ["m-old", "m-new"], ["s1", "nobody"], [("trip", "k2"), ("trip", "k9")])
    assert reads.seen("saga:trip", "m-old") is True
    assert reads.seen("saga:trip", "m-new") is False
    any_store.remember("saga:trip", "m-new")  # (the group recorded it: a copy of it in the group is a duplicate)
    assert reads.seen("saga:trip", "m-new") is True
    assert reads.seen("saga:other", "m-old") is False  # (another consumer's inbox: the store)
    first = reads.get_saga("s1")
    assert first is not None
    assert first.key == "k1"
    assert reads.get_saga("nobody") is None
    assert reads.find_saga("trip", "k9") is None
    _saga(any_store, "s9", "k9")  # (a start in the group made it)
    again = reads.find_saga("trip", "k9")
    assert again is not None
    assert again.id == "s9"


def test_a_saga_given_by_id_is_read_from_the_store_by_key_after_it(any_store: Store) -> None:
    _saga(any_store, "s1", "k1")
    reads = GroupReads(any_store, "saga:trip", [], ["s1"], [("trip", "k1")])
    given = reads.get_saga("s1")
    assert given is not None
    given.state, given.version = "moved", given.version + 1  # (the engine moves what it is given, and saves it)
    any_store.save_saga(
        given, expected_version=0, history=HistoryEntry(2.0, "m2", "waiting", "moved", "test"), inbox=None, outbox=()
    )
    by_key = reads.find_saga("trip", "k1")
    assert by_key is not None
    assert by_key.state == "moved"


# -- the pipeline reads a group ahead ----------------------------------------------------------------------


class _Reads:
    """A store that counts the reads of one message and of many."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.single = 0
        self.many = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _one(self, name: str, *args: Any) -> Any:
        with self.lock:
            self.single += 1
        return getattr(self._store, name)(*args)

    def _all(self, name: str, *args: Any) -> Any:
        with self.lock:
            self.many += 1
        return getattr(self._store, name)(*args)

    def seen(self, *args: Any) -> Any:
        return self._one("seen", *args)

    def get_saga(self, *args: Any) -> Any:
        return self._one("get_saga", *args)

    def find_saga(self, *args: Any) -> Any:
        return self._one("find_saga", *args)

    def answers(self, *args: Any) -> Any:
        return self._all("answers", *args)

    def get_sagas(self, *args: Any) -> Any:
        return self._all("get_sagas", *args)

    def find_sagas(self, *args: Any) -> Any:
        return self._all("find_sagas", *args)


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data["trip"] = ctx.event.payload["trip"]


class Trip(StepSaga):
    type = "trip"
    start = Start("ocis.trip.requested", key="trip", do=_keep)
    steps = [Step("hotel", "ocis.trip.book_hotel", timeout=30)]


def test_the_saga_messages_of_a_group_are_read_ahead_not_one_by_one(unique: str) -> None:
    hotels = Service("hotels")
    hotels.handles("ocis.trip.book_hotel", name="book")(lambda e: {"room": 1})
    store = _Reads(MemoryStore())
    worker = Worker(App(hotels, sagas=[Trip], exchange=unique), broker="memory://", store=store)
    bus = EventBus("memory://", exchange=unique)
    n = 60
    try:
        worker.start()
        bus.publish_many([Event("ocis.trip.requested", {"trip": f"t{i}"}) for i in range(n)])
        with worker.running():
            wait_for(lambda: store.count_sagas(final=True) == n, timeout=30.0, what="every trip booked")
    finally:
        worker.close()
        bus.close()
    # each of the 2n saga messages would read its inbox record and its saga: 4n reads one by one
    assert store.single == 0
    assert 0 < store.many < n
