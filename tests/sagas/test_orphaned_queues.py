"""Orphaned queues (``sagas._queues``): the worker's warning, ``sagas queues --orphaned [--delete]``, apps
sharing an exchange, and the renamed-saga-type drill of issue 16, on memory:// and RabbitMQ."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from sagas import App, Event, EventBus, Final, Request, Saga, SagaContext, Service, Start, State, Worker, open_store
from sagas._cli import cli
from sagas._queues import app_name, app_queues, find_orphans
from sagas._store import QueueRegistry
from tests.helpers import wait_for
from transport import Subscription, TransportError

BOOK, CHARGE = "trips.booking.book", "trips.payments.charge"
REQUESTED = "trips.trip.requested"

#: what the participants did: ("book" | "charge", trip id) -> times
effects: Counter[tuple[str, str]] = Counter()


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


def _states() -> list[State]:
    return [
        State("booking", sends=Request(BOOK, fields=("trip_id",)), timeout=30, on_reply="charging"),
        State("charging", sends=Request(CHARGE, fields=("trip_id",)), timeout=30, on_reply="booked"),
        Final("booked"),
    ]


class TripA(Saga):
    """Books a trip, then charges the card."""

    type = "trip_a"
    start = Start(REQUESTED, key="trip_id", to="booking", do=_keep)
    states = _states()


class TripB(Saga):
    """TripA renamed: the same graph under another type name."""

    type = "trip_b"
    start = Start(REQUESTED, key="trip_id", to="booking", do=_keep)
    states = _states()


booking, payments = Service("booking"), Service("payments")


@booking.handles(BOOK)
def book(event: Event) -> None:
    effects[("book", event.payload["trip_id"])] += 1


@payments.handles(CHARGE)
def charge(event: Event) -> None:
    effects[("charge", event.payload["trip_id"])] += 1


V1 = App(booking, payments, sagas=[TripA], exchange="trips")
V2 = App(booking, payments, sagas=[TripB], exchange="trips")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/sagas.db"


@pytest.fixture(autouse=True)
def _no_effects() -> Iterator[None]:
    effects.clear()
    yield
    effects.clear()


def _deploy(app: App, broker_url: str, unique: str, store_url: str, buses: list[object]) -> Worker:
    worker = Worker(app, broker=broker_url, store=store_url, exchange=unique, concurrency=1)
    buses.append(worker)
    return worker


def _booked(store_url: str, saga_type: str, trip: str) -> bool:
    store = open_store(store_url)
    try:
        record = store.find_saga(saga_type, trip)
        return record is not None and record.state == "booked"
    finally:
        store.close()


def _request(bus: EventBus, *trips: str) -> None:
    bus.publish_many([Event(REQUESTED, {"trip_id": t}) for t in trips])


def _drill(broker_url: str, unique: str, store_url: str, buses: list[object], *, procedure: bool) -> str:
    """Deploy A, rename it to B, switch back to A; with ``procedure``, the operator runs
    ``sagas queues --orphaned --delete`` once each deploy is up, as docs/operations.md says. Returns
    what that command printed during the rename."""
    publisher = EventBus(broker_url, exchange=unique)
    buses.append(publisher)
    common = ["--exchange", unique, "--store", store_url, "--broker", broker_url]
    printed = ""
    with _deploy(V1, broker_url, unique, store_url, buses).running():
        _request(publisher, "t1", "t2")
        wait_for(lambda: all(_booked(store_url, "trip_a", t) for t in ("t1", "t2")), what="t1, t2 booked by A")
    with _deploy(V2, broker_url, unique, store_url, buses).running():
        if procedure:
            out = CliRunner().invoke(cli, ["queues", f"{__name__}:V2", *common, "--orphaned", "--delete"])
            assert out.exit_code == 0, out.output
            printed = out.output
        # A's queue, if still bound, collects a copy of each of these start events
        _request(publisher, "t3", "t4")
        wait_for(lambda: all(_booked(store_url, "trip_b", t) for t in ("t3", "t4")), what="t3, t4 booked by B")
    with _deploy(V1, broker_url, unique, store_url, buses).running():
        if procedure:
            out = CliRunner().invoke(cli, ["queues", f"{__name__}:V1", *common, "--orphaned", "--delete"])
            assert out.exit_code == 0, out.output
        _request(publisher, "t5")
        # A's queue is first in, first out: whatever it had collected is started before t5, and each
        # participant's queue (one handler at a time) books and charges in that order too.
        wait_for(lambda: _booked(store_url, "trip_a", "t5"), what="t5 booked by A")
    return printed


def test_without_the_procedure_switching_back_replays_the_old_queue(
    broker_url: str, unique: str, store_url: str, buses: list[object]
) -> None:
    """The hazard of issue 16: A's queue, left bound while B ran, replays t3 and t4 when A comes back,
    and they are booked and charged twice."""
    _drill(broker_url, unique, store_url, buses, procedure=False)
    assert effects[("book", "t3")] == 2
    assert effects[("charge", "t4")] == 2


def test_the_renamed_type_drill_books_each_trip_once(
    broker_url: str, unique: str, store_url: str, buses: list[object]
) -> None:
    """With the documented rename procedure (delete the orphaned queue once the new deploy is up), each
    trip is booked once and each card charged once, across A -> B -> A."""
    printed = _drill(broker_url, unique, store_url, buses, procedure=True)
    assert f"deleted {unique}.saga.trip_a (saga trip_a)" in printed
    trips = ("t1", "t2", "t3", "t4", "t5")
    assert effects == Counter({(what, t): 1 for what in ("book", "charge") for t in trips})
    store = open_store(store_url)
    try:
        assert store.find_saga("trip_a", "t3") is None  # A never saw B's trips
    finally:
        store.close()


def _depth(bus: EventBus, queue: str) -> int:
    info = bus.inspect_queue(queue)
    return -1 if info is None else info.messages


def test_the_worker_warns_about_an_orphaned_queue_with_its_depth(
    broker_url: str, unique: str, store_url: str, buses: list[object]
) -> None:
    """A worker started without A's saga type names A's queue, its depth and what used to consume it."""
    publisher = EventBus(broker_url, exchange=unique)
    buses.append(publisher)
    old = _deploy(V1, broker_url, unique, store_url, buses)
    old.start()
    old.close()  # it stops consuming: A's queue stays, bound
    _request(publisher, "t1", "t2", "t3")
    queue = f"{unique}.saga.trip_a"
    wait_for(lambda: _depth(publisher, queue) == 3, what="3 start events in A's queue")
    with structlog.testing.capture_logs() as logs:
        worker = _deploy(V2, broker_url, unique, store_url, buses)
        worker.start()
        worker.close()
    found = [e for e in logs if e["event"] == "worker.orphaned_queue"]
    assert len(found) == 1
    assert found[0]["log_level"] == "warning"
    assert found[0]["queue"] == queue
    assert found[0]["depth"] == 3
    assert found[0]["consumers"] == 0
    assert found[0]["consumer"] == "saga trip_a"
    assert found[0]["app"] == "booking+payments"
    assert _depth(publisher, queue) == 3  # reported, not touched


def test_the_registry_lists_the_queues_the_worker_declares(unique: str) -> None:
    """What a worker registers is exactly the durable queues it consumes (the saga queue and the
    at-least-once handler queues), with the delay queues it declared."""
    store = open_store("memory://")
    worker = Worker(V1, broker="memory://", store=store, exchange=unique)
    worker.start()
    try:
        assert isinstance(store, QueueRegistry)
        rows = store.registered_queues(unique)
        delays = {d for r in rows for d in r.delay_queues}
        assert {r.queue for r in rows} | delays | {f"{unique}.dead"} == worker.bus.declared_queues
        assert delays
        assert {r.app for r in rows} == {"booking+payments"}
    finally:
        worker.bus.delete_topology()
        worker.close()


# -- several apps on one exchange and one store --------------------------------------------------------

notify = Service("notify")


@notify.handles("trips.notify.send")
def send(event: Event) -> None:
    """A participant of another deployment."""


@notify.handles("trips.notify.sms")
def sms(event: Event) -> None:
    """Renamed away in NOTIFY_V2."""


NOTIFY = App(notify, exchange="trips")
NOTIFY_V2 = App(Service("notify"), sagas=[TripB], exchange="trips")


@pytest.fixture
def made(unique: str) -> Iterator[list[object]]:
    """Workers and buses a memory-only test made: closed, and the exchange's queues deleted, at the end."""
    things: list[object] = []
    yield things
    cleaner = EventBus("memory://", exchange=unique)
    for thing in things:
        bus = getattr(thing, "bus", thing)
        if isinstance(bus, EventBus):
            cleaner.declared_queues |= bus.declared_queues
            bus.close()
    cleaner.delete_topology()
    cleaner.close()


def _start(app: App, store: object, unique: str, made: list[object]) -> Worker:
    worker = Worker(app, broker="memory://", store=store, exchange=unique)  # type: ignore[arg-type]
    made.append(worker)
    worker.start()
    return worker


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[str]:
    """The URL of one store several apps share: memory (one object), SQLite, PostgreSQL (own schema)."""
    if request.param == "memory":
        yield "memory://"
        return
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/s.db"
        return
    url = request.getfixturevalue("postgres_url")
    yield f"{url}?schema={unique}"
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')


def test_another_apps_queues_are_never_orphaned(shared_store: str, unique: str, made: list[object]) -> None:
    """Two deployments share the exchange and the store. The trips app is stopped, its queue holds a
    message and has no consumer: the notify app, started later, reports none of trips' queues; later each
    app reports only the queues it left behind itself."""
    store = open_store(shared_store)
    bus = EventBus("memory://", exchange=unique)
    made.append(bus)
    _start(V1, store, unique, made).bus.close()
    _request(bus, "t1")
    _start(NOTIFY, store, unique, made).bus.close()
    assert find_orphans(store, bus, NOTIFY, unique) == []
    assert find_orphans(store, bus, V1, unique) == []  # (trips itself still declares all of them)
    # trips v2 drops its saga types; TripB is run by notify v2 now: only trip_a is orphaned for trips
    trips_v2 = App(booking, payments, exchange="trips")
    _start(trips_v2, store, unique, made).bus.close()
    _start(NOTIFY_V2, store, unique, made).bus.close()
    assert [o.record.queue for o in find_orphans(store, bus, trips_v2, unique)] == [f"{unique}.saga.trip_a"]
    orphans_of_notify = find_orphans(store, bus, NOTIFY_V2, unique)
    assert {o.record.queue for o in orphans_of_notify} == {f"{unique}.notify.send", f"{unique}.notify.sms"}
    assert {o.record.app for o in orphans_of_notify} == {"notify"}
    store.close()


def test_a_queue_another_app_still_lists_is_not_orphaned(unique: str, made: list[object]) -> None:
    """trip_b moves from the trips app to notify v2: while notify v2's latest start lists its queue, it is
    not orphaned for trips, though nothing consumes it right now."""
    store = open_store("memory://")
    bus = EventBus("memory://", exchange=unique)
    made.append(bus)
    _start(V2, store, unique, made).bus.close()
    _start(NOTIFY_V2, store, unique, made).bus.close()
    trips_v3 = App(booking, payments, exchange="trips")
    _start(trips_v3, store, unique, made).bus.close()
    assert find_orphans(store, bus, trips_v3, unique) == []
    _start(NOTIFY, store, unique, made).bus.close()  # notify drops trip_b too: now it is orphaned, for both
    assert [o.record.queue for o in find_orphans(store, bus, trips_v3, unique)] == [f"{unique}.saga.trip_b"]
    assert [o.record.queue for o in find_orphans(store, bus, NOTIFY, unique)] == [f"{unique}.saga.trip_b"]


def test_a_queue_with_a_consumer_is_not_orphaned(unique: str, made: list[object]) -> None:
    """An older worker of the same app that still reads A's queue (a rolling deploy) keeps it off the list."""
    store = open_store("memory://")
    old = _start(V1, store, unique, made)
    new = _start(V2, store, unique, made)
    assert find_orphans(store, new.bus, V2, unique) == []
    old.bus.close()
    assert [o.record.queue for o in find_orphans(store, new.bus, V2, unique)] == [f"{unique}.saga.trip_a"]


def test_a_worker_forgets_a_queue_that_is_gone(unique: str, made: list[object]) -> None:
    """A registry row whose queue no longer exists is dropped by the next worker of that app."""
    store = open_store("memory://")
    _start(V1, store, unique, made).bus.close()
    bus = EventBus("memory://", exchange=unique)
    made.append(bus)
    assert bus.delete_queue(f"{unique}.saga.trip_a") == 0
    assert isinstance(store, QueueRegistry)
    assert f"{unique}.saga.trip_a" in {r.queue for r in store.registered_queues(unique)}
    _start(V2, store, unique, made)
    assert f"{unique}.saga.trip_a" not in {r.queue for r in store.registered_queues(unique)}


def test_an_app_is_named_by_its_services() -> None:
    """The registry's app name survives renaming a saga type; an app of sagas only is named by them."""
    assert app_name(V1) == app_name(V2) == "booking+payments"
    assert app_name(App(sagas=[TripB])) == "sagas:trip_b"
    assert [r.queue for r in app_queues(V1, "x")] == ["x.booking.book", "x.payments.charge", "x.saga.trip_a"]


# -- the command --------------------------------------------------------------------------------------


def test_queues_command_lists_deletes_and_refuses(
    broker_url: str, unique: str, store_url: str, buses: list[object]
) -> None:
    """`sagas queues` lists the app's queues; --orphaned lists A's queue with its depth; --delete removes
    it unless something consumes it (kept, exit 1); it is gone afterwards."""
    publisher = EventBus(broker_url, exchange=unique)
    buses.append(publisher)
    old = _deploy(V1, broker_url, unique, store_url, buses)
    old.start()
    old.close()
    _request(publisher, "t1", "t2")
    queue = f"{unique}.saga.trip_a"
    wait_for(lambda: _depth(publisher, queue) == 2, what="2 start events in A's queue")
    new = _deploy(V2, broker_url, unique, store_url, buses)
    new.start()
    new.close()
    runner = CliRunner()
    common = ["--exchange", unique, "--store", store_url, "--broker", broker_url]
    listed = runner.invoke(cli, ["queues", f"{__name__}:V2", *common])
    assert listed.exit_code == 0, listed.output
    assert f"{unique}.saga.trip_b" in listed.output
    assert "saga trip_b" in listed.output
    orphaned = runner.invoke(cli, ["queues", f"{__name__}:V2", *common, "--orphaned", "--json"])
    assert orphaned.exit_code == 0, orphaned.output
    (row,) = json.loads(orphaned.output)
    assert (row["queue"], row["depth"], row["consumers"], row["consumer"]) == (queue, 2, 0, "saga trip_a")
    reader = EventBus(broker_url, exchange=unique)
    buses.append(reader)
    reader.consume([Subscription(queue, TripA.definition().patterns)], lambda inbound: None)
    busy = runner.invoke(cli, ["queues", f"{__name__}:V2", *common, "--orphaned", "--delete"])
    assert busy.exit_code == 0, busy.output  # with a consumer it is not orphaned at all
    assert "no orphaned queues" in busy.output
    assert _depth(publisher, queue) >= 0
    reader.close()
    deleted = runner.invoke(cli, ["queues", f"{__name__}:V2", *common, "--orphaned", "--delete"])
    assert deleted.exit_code == 0, deleted.output
    assert f"deleted {queue} (saga trip_a): 2 message(s) dropped" in deleted.output
    assert publisher.inspect_queue(queue) is None
    after = runner.invoke(cli, ["queues", f"{__name__}:V2", *common, "--orphaned"])
    assert "no orphaned queues" in after.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--delete"], "--delete removes orphaned queues only: add --orphaned"),
        (["--orphaned", "--store", "sqlite:////nonexistent/dir/s.db"], "no SQLite store"),
    ],
)
def test_queues_command_usage_mistakes(args: list[str], message: str, store_url: str) -> None:
    """A usage mistake is `error: ...` on stderr and exit 2, with no traceback."""
    open_store(store_url).close()
    result = CliRunner().invoke(cli, ["queues", f"{__name__}:V2", "--store", store_url, *args])
    assert result.exit_code == 2
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.output


def test_queues_command_says_when_the_broker_does_not_answer(store_url: str) -> None:
    """An unreachable broker is `error: ...` and exit 2 (as for every command), not an empty list."""
    open_store(store_url).close()
    result = CliRunner().invoke(
        cli, ["queues", f"{__name__}:V2", "--store", store_url, "--broker", "amqp://guest:guest@127.0.0.1:1//"]
    )
    assert result.exit_code == 2
    assert "error: the broker amqp://guest:***@127.0.0.1:1// does not answer" in result.stderr


def test_a_broker_that_refuses_the_look_does_not_stop_the_worker(
    unique: str, made: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker error while looking at the registry's queues (a user without the permission, say) is
    logged as worker.queue_check_failed, and the worker starts and consumes."""
    store = open_store("memory://")
    _start(V1, store, unique, made).bus.close()

    def refuse(self: EventBus, queue: str) -> None:
        raise TransportError(f"the broker refused to inspect queue {queue!r}: ACCESS_REFUSED")

    monkeypatch.setattr(EventBus, "inspect_queue", refuse)
    with structlog.testing.capture_logs() as logs:
        worker = _start(V2, store, unique, made)
    assert worker.started
    (failed,) = [e for e in logs if e["event"] == "worker.queue_check_failed"]
    assert "ACCESS_REFUSED" in failed["error"]
    assert failed["log_level"] == "warning"
