"""Clocks: a step of the host's clock, back or forward, inside a running worker neither stalls the
deadlines nor fires them all at once (the worker's turns run on the monotonic clock, its deadlines on a
steady clock that slews towards its reference); on PostgreSQL the reference is the database's clock.
The host's clock is never changed: the tests inject one into the worker."""

from __future__ import annotations

import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from sagas import App, Event, EventBus, Final, MemoryStore, NoReply, Request, Saga, Service, Start, State, Worker
from sagas._clock import SteadyClock
from tests.helpers import wait_for

# -- the steady clock ------------------------------------------------------------------------------------


class _Clocks:
    """A monotonic clock and a reference clock that the test moves, and steps."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.ref = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.ref += seconds


@pytest.mark.parametrize("step", [-300.0, 300.0])
def test_a_steady_clock_never_jumps_and_slews_to_a_stepped_reference(step: float) -> None:
    c = _Clocks()
    clock = SteadyClock(lambda: c.ref, lambda: c.mono, resync=10.0, max_slew=0.05)
    assert clock() == c.ref
    c.ref += step  # the host's clock is stepped
    last = clock()
    rates = []
    for _ in range(1000):  # 10,000 s
        c.advance(10.0)
        now = clock()
        rates.append((now - last) / 10.0)
        last = now
    assert min(rates) >= 0.95 - 1e-9  # never back, never stalled
    assert max(rates) <= 1.05 + 1e-9  # never a jump forward
    assert abs(clock() - c.ref) < 1e-6  # caught up: 300 s at 5 % takes 6,000 s
    assert rates[-1] == pytest.approx(1.0)


def test_a_steady_clock_keeps_running_when_its_reference_fails() -> None:
    c = _Clocks()
    failing = [False]

    def reference() -> float:
        if failing[0]:
            raise ConnectionError("the database is restarting")
        return c.ref

    clock = SteadyClock(reference, lambda: c.mono, resync=1.0)
    failing[0] = True
    start = clock()
    c.advance(30.0)
    assert clock() == pytest.approx(start + 30.0)


# -- a running worker whose host clock is stepped ----------------------------------------------------------

ASK, WAIT = "clock.pings.ask", "clock.pings.waited"
asked: dict[str, int] = {}


class Ping(Saga):
    """A request whose first copy the participant does not answer: only the deadline's re-send gets a
    reply. And a state that waits 30 s for an event that never comes."""

    type = "clock_ping"
    start = [
        Start("clock.pings.requested", key="id", to="asking"),
        Start("clock.waits.requested", key="id", to="waiting"),
    ]
    correlate = {WAIT: "id"}
    states = [
        State("asking", sends=Request(ASK), timeout=0.5, retries=5, backoff=1.0, on_reply="answered"),
        State("waiting", timeout=30.0, on={WAIT: "answered"}, on_timeout="timed_out"),
        Final("answered"),
        Final("timed_out"),
    ]


class Short(Saga):
    type = "clock_short"
    start = Start("clock.shorts.requested", key="id", to="waiting")
    correlate = {WAIT: "id"}
    states = [
        State("waiting", timeout=0.5, on={WAIT: "done"}, on_timeout="timed_out"),
        Final("done"),
        Final("timed_out"),
    ]


pings = Service("pings")


@pings.handles(ASK)
def ask(event: Event) -> None:
    asked[event.id] = asked.get(event.id, 0) + 1
    if asked[event.id] == 1:
        raise NoReply("the first copy is lost")


class _SteppedHostClock:
    """The host's wall clock, as the worker reads it, with a step the test sets."""

    def __init__(self) -> None:
        self.step = 0.0

    def __call__(self) -> float:
        return time.time() + self.step


@pytest.fixture
def stepped(
    broker_url: str, unique: str, buses: list[object]
) -> Iterator[tuple[_SteppedHostClock, Worker, EventBus, MemoryStore]]:
    asked.clear()
    host = _SteppedHostClock()
    store = MemoryStore()
    app = App(pings, sagas=[Ping, Short], exchange=unique)
    worker = Worker(app, broker=broker_url, store=store, clock=host, timer_interval=0.05)
    buses.append(worker)
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    with worker.running():
        yield host, worker, bus, store


def _state(store: MemoryStore, saga_type: str, key: str) -> str:
    record = store.find_saga(saga_type, key)
    return "" if record is None else record.state


def test_a_backward_step_of_the_host_clock_stalls_no_deadline(
    stepped: tuple[_SteppedHostClock, Worker, EventBus, MemoryStore],
) -> None:
    """The host clock steps back 300 s in a running worker; a saga started after it is re-sent at its
    0.5 s deadline and completes (it waited for the 300 s before)."""
    host, _, bus, store = stepped
    host.step = -300.0
    bus.publish(Event("clock.pings.requested", {"id": "p1"}))
    wait_for(lambda: _state(store, "clock_ping", "p1") == "answered", timeout=10, what="the re-sent request answered")
    record = store.find_saga("clock_ping", "p1")
    assert record is not None
    assert any(h.reason.startswith("deadline passed: re-sent") for h in store.saga_history(record.id))


def test_a_forward_step_of_the_host_clock_fires_no_deadline_early(
    stepped: tuple[_SteppedHostClock, Worker, EventBus, MemoryStore],
) -> None:
    """The host clock steps forward 300 s in a running worker: a saga waiting 30 s for an event does not
    time out at once, while a saga with a 0.5 s deadline started after the step times out on time
    (the timers ran)."""
    host, _, bus, store = stepped
    bus.publish(Event("clock.waits.requested", {"id": "w1"}))
    wait_for(lambda: _state(store, "clock_ping", "w1") == "waiting", timeout=10, what="the saga waiting")
    host.step = 300.0
    bus.publish(Event("clock.shorts.requested", {"id": "s1"}))
    wait_for(lambda: _state(store, "clock_short", "s1") == "timed_out", timeout=10, what="the short deadline")
    assert _state(store, "clock_ping", "w1") == "waiting"


# -- PostgreSQL: the database's clock ---------------------------------------------------------------------


@pytest.mark.postgres
def test_on_postgresql_the_deadlines_follow_the_database_clock(
    monkeypatch: pytest.MonkeyPatch, broker_url: str, postgres_url: str, unique: str, buses: list[object]
) -> None:
    from psycopg import connect, sql

    """The host's clock is an hour ahead (a worker on a badly set host): a worker on PostgreSQL reads
    its deadlines from the database's clock; on SQLite, from the host's."""
    ahead: Any = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
    ahead.time = lambda: time.time() + 3600.0
    monkeypatch.setattr("sagas._worker.time", ahead)
    app = App(pings, sagas=[Ping], exchange=unique)
    on_postgres = Worker(app, broker=broker_url, store=f"{postgres_url}?schema={unique}")
    buses.append(on_postgres)
    on_sqlite = Worker(app, broker=broker_url, store="memory://")
    buses.append(on_sqlite)
    try:
        with on_postgres.running(), on_sqlite.running():
            database_time = on_postgres.store.database_time()  # type: ignore[attr-defined]
            assert abs(on_postgres.now() - database_time) < 5.0
            assert abs(on_sqlite.now() - (time.time() + 3600.0)) < 5.0
    finally:
        with connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))
