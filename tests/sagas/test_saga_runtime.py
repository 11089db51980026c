"""Sagas run by the real worker on a real bus (memory:// and RabbitMQ): participants declared with
``@svc.handles``, replies, compensation, unroutable requests, the reply cache, and deadlines that
survive a restart of the worker."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from examples import postprocessing
from examples.postprocessing import Postprocessing
from sagas import (
    App,
    Event,
    EventBus,
    Failure,
    Final,
    MemoryStore,
    NoReply,
    Request,
    Retry,
    Saga,
    SagaContext,
    SagaRecord,
    Service,
    Start,
    State,
    Step,
    StepSaga,
    Store,
    Worker,
    open_store,
)
from sagas._protocol import REQUEST_ID_HEADER
from tests.helpers import wait_for

HOTEL, CANCEL_HOTEL = "ocis.trip.book_hotel", "ocis.trip.cancel_hotel"
CAR, RETURN_CAR = "ocis.trip.rent_car", "ocis.trip.return_car"
FLIGHT = "ocis.trip.book_flight"
TRIP_REQUESTED = "ocis.trip.requested"
NOBODY = "ocis.nobody.serves_this"
SHIP = "ocis.parcel.ship"


def _keep_trip_id(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data["trip_id"] = ctx.event.payload["trip_id"]


class Trip(StepSaga):
    type = "trip"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [
        Step("hotel", HOTEL, compensation=CANCEL_HOTEL, timeout=5.0),
        Step("car", CAR, compensation=RETURN_CAR, timeout=5.0),
        Step("flight", FLIGHT, timeout=5.0),
    ]


class Lonely(StepSaga):
    """Its only request is one nobody serves; its deadline is far away."""

    type = "lonely"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("ask", NOBODY, timeout=30.0)]


class Booking(StepSaga):
    """One step with a short deadline, so that re-sends happen within a test."""

    type = "booking"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("hotel", HOTEL, timeout=0.3, retries=5)]


class Parcel(StepSaga):
    type = "parcel"
    start = Start("ocis.parcel.sent", key="parcel_id")
    steps = [Step("ship", SHIP, timeout=0.5, retries=5)]


def make_worker(buses: list[object], app: App, url: str, **kw: Any) -> Worker:
    kw.setdefault("store", MemoryStore())
    kw.setdefault("timer_interval", 0.05)
    worker = Worker(app, broker=url, **kw)
    buses.append(worker)
    return worker


def make_bus(buses: list[object], url: str, exchange: str) -> EventBus:
    bus = EventBus(url, exchange=exchange)
    buses.append(bus)
    return bus


def _final(store: Store, saga_type: str, key: str) -> SagaRecord | None:
    record = store.find_saga(saga_type, key)
    return record if record is not None and record.final else None


def _states(store: Store, saga_id: str) -> list[str]:
    return [h.to_state for h in store.saga_history(saga_id)]


def test_failing_third_step_compensates_steps_two_then_one(broker_url: str, unique: str, buses: list[object]) -> None:
    """When the third participant answers Failure('no'), the worker runs the compensations of step 2,
    then step 1, and the saga ends compensated."""
    calls: list[tuple[str, str]] = []
    hotels, cars, airline = Service("hotels"), Service("cars"), Service("airline")

    def record(name: str) -> Any:
        def handler(event: Event) -> dict[str, Any]:
            calls.append((name, event.payload["trip_id"]))
            return {name: True}

        return handler

    hotels.handles(HOTEL, name="book")(record("book_hotel"))
    hotels.handles(CANCEL_HOTEL, name="cancel")(record("cancel_hotel"))
    cars.handles(CAR, name="rent")(record("rent_car"))
    cars.handles(RETURN_CAR, name="give_back")(record("return_car"))

    @airline.handles(FLIGHT)
    def book_flight(event: Event) -> dict[str, Any]:
        calls.append(("book_flight", event.payload["trip_id"]))
        raise Failure("no")

    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    app = App(hotels, cars, airline, sagas=[Trip], exchange=unique)
    with make_worker(buses, app, broker_url, store=store).running():
        bus.publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "trip", "t1"), what="the trip saga to end")
    assert saga.state == "compensated"
    assert [name for name, _ in calls] == ["book_hotel", "rent_car", "book_flight", "return_car", "cancel_hotel"]
    assert {trip for _, trip in calls} == {"t1"}
    assert _states(store, saga.id) == ["hotel", "car", "flight", "undo_car", "undo_hotel", "compensated"]
    assert store.saga_history(saga.id)[3].reason == "no"


@pytest.mark.parametrize(
    ("name", "size", "outcome", "path"),
    [
        ("report.pdf", 10, "continue", ["scanning", "checking", "finishing", "done"]),
        ("eicar.com", 10, "delete", ["scanning", "reverting", "finishing", "done"]),
        ("huge.iso", 5000, "abort", ["scanning", "checking", "reverting", "finishing", "done"]),
    ],
    ids=["clean", "eicar", "oversized"],
)
def test_postprocessing_outcomes(
    broker_url: str,
    unique: str,
    buses: list[object],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    size: int,
    outcome: str,
    path: list[str],
) -> None:
    """The post-processing example: a clean upload continues, an infected one is deleted and an oversized
    one aborted (both reverted first), each ending 'done' after storage says the upload is ready."""
    monkeypatch.setenv("POLICY_MAX_SIZE", "1000")
    monkeypatch.setenv("FAIL_RATE", "0")
    monkeypatch.setenv("DROP_RATE", "0")
    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    finished: list[Event] = []
    watcher = Service("watcher")
    watcher.on(postprocessing.FINISHED, name="finished")(finished.append)
    app = App(
        postprocessing.antivirus,
        postprocessing.policies,
        postprocessing.storage,
        watcher,
        sagas=[Postprocessing],
        exchange=unique,
    )
    with make_worker(buses, app, broker_url, store=store).running():
        bus.publish(
            Event("ocis.storage.bytes_received", {"upload_id": "u1", "name": name, "size": size, "user": "marie"})
        )
        saga = wait_for(lambda: _final(store, "postprocessing", "u1"), what="the upload's saga to end")
        wait_for(lambda: finished, what="ocis.postprocessing.finished")
    assert saga.state == "done"
    assert saga.data["outcome"] == outcome
    assert _states(store, saga.id) == path
    (event,) = finished
    assert event.payload == {"upload_id": "u1", "outcome": outcome}
    assert event.correlation_id == saga.id


def test_postprocessing_of_several_uploads_at_once(
    broker_url: str, unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clean, infected and oversized uploads published together each reach their own outcome."""
    monkeypatch.setenv("POLICY_MAX_SIZE", "1000")
    monkeypatch.setenv("FAIL_RATE", "0")
    monkeypatch.setenv("DROP_RATE", "0")
    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    uploads = {"clean": ("a.txt", 10), "eicar": ("EICAR-test.txt", 20), "big": ("movie.mkv", 1001)}
    app = App(
        postprocessing.antivirus,
        postprocessing.policies,
        postprocessing.storage,
        sagas=[Postprocessing],
        exchange=unique,
    )
    with make_worker(buses, app, broker_url, store=store).running():
        bus.publish_many(
            [
                Event("ocis.storage.bytes_received", {"upload_id": upload_id, "name": n, "size": s, "user": "marie"})
                for upload_id, (n, s) in uploads.items()
            ]
        )
        wait_for(lambda: all(_final(store, "postprocessing", u) for u in uploads), what="three sagas to end")
    records = {u: store.find_saga("postprocessing", u) for u in uploads}
    outcomes = {u: record.data["outcome"] for u, record in records.items() if record is not None}
    assert outcomes == {"clean": "continue", "eicar": "delete", "big": "abort"}


def test_unroutable_request_fails_the_step_fast(broker_url: str, unique: str, buses: list[object]) -> None:
    """A request no queue is bound to receive fails its step at once, not at its 30 s deadline."""
    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(sagas=[Lonely], exchange=unique), broker_url, store=store).running():
        t0 = time.monotonic()
        bus.publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "lonely", "t1"), timeout=2.0, what="the step to fail")
        elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert saga.state == "compensated"
    assert _states(store, saga.id) == ["ask", "compensated"]
    assert f"no service is bound to receive {NOBODY}" in store.saga_history(saga.id)[-1].reason


def test_dropped_reply_is_asked_again_with_the_same_request_id(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A participant that drops its reply (NoReply) is asked again at the deadline, with the same request
    id, and its reply then completes the saga."""
    seen: list[Event] = []
    hotels = Service("hotels")

    @hotels.handles(HOTEL)
    def book(event: Event) -> dict[str, Any]:
        seen.append(event)
        if len(seen) == 1:
            raise NoReply("lost on the way")
        return {"room": 7}

    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(hotels, sagas=[Booking], exchange=unique), broker_url, store=store).running():
        bus.publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "booking", "t1"), timeout=5.0, what="the booking to complete")
    assert saga.state == "completed"
    assert saga.meta["steps"][0] == {"step": "hotel", "result": {"room": 7}}
    assert len(seen) == 2
    assert seen[0].id == seen[1].id
    assert seen[0].correlation_id == saga.id
    assert any("re-sent" in h.reason for h in store.saga_history(saga.id))


def test_cached_reply_answers_a_repeated_request_without_running_the_work(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A participant with cache_replies=True that gets a request id it already answered replies the same
    reply again, without running its handler a second time."""
    calls: list[Event] = []
    replies: list[Event] = []
    hotels, audit = Service("hotels"), Service("audit")

    @hotels.handles(HOTEL, cache_replies=True)
    def book(event: Event) -> dict[str, Any]:
        calls.append(event)
        return {"room": len(calls)}

    audit.on(HOTEL + ".reply", name="replies")(replies.append)
    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    app = App(hotels, audit, sagas=[Booking], exchange=unique)
    with make_worker(buses, app, broker_url, store=store).running():
        bus.publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "booking", "t1"), what="the booking to complete")
        wait_for(lambda: len(replies) == 1, what="the first reply")
        bus.publish(calls[0])  # the very same request (same id) again
        wait_for(lambda: len(replies) == 2, what="the second reply")
    assert len(calls) == 1
    assert replies[0].id == replies[1].id
    assert replies[0].payload == replies[1].payload == {"ok": True, "result": {"room": 1}, "reason": None}
    assert replies[1].headers["request_id"] == calls[0].id
    after = store.get_saga(saga.id)
    assert after is not None
    assert after.version == saga.version  # the repeated reply changed nothing


def test_request_repeated_while_its_handler_runs_is_not_worked_twice(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """With cache_replies=True, a copy of a request that arrives while the first is still being handled
    (a slow participant past the saga's deadline) does not run the work a second time."""
    calls: list[Event] = []
    second_call = threading.Event()
    replies: list[Event] = []
    hotels, audit = Service("hotels"), Service("audit")

    @hotels.handles(HOTEL, cache_replies=True)
    def book(event: Event) -> dict[str, Any]:
        calls.append(event)
        if len(calls) == 1:
            second_call.wait(2.0)  # slow work; returns early only if the work is started again meanwhile
        else:
            second_call.set()
        return {"room": 1}

    audit.on(HOTEL + ".reply", name="replies")(replies.append)
    bus = make_bus(buses, broker_url, unique)
    request = Event(HOTEL, {"trip_id": "t1"})
    with make_worker(buses, App(hotels, audit, exchange=unique), broker_url).running():
        bus.publish(request)
        wait_for(lambda: calls, what="the first call")
        bus.publish(request)  # the saga's deadline re-sends it while the first is still running
        wait_for(lambda: len(replies) == 2, what="both requests answered")
    assert len(calls) == 1


def test_deadline_fires_after_a_worker_restart(
    broker_url: str, unique: str, buses: list[object], tmp_path: Path
) -> None:
    """Deadlines live in the store: a deadline that passed while no worker ran is fired by the next
    worker on that store, which re-sends the same request; the participant's reply then ends the saga."""
    couriers = Service("couriers")
    shipped: list[Event] = []

    @couriers.handles(SHIP)
    def ship(event: Event) -> dict[str, Any]:
        shipped.append(event)
        return {"tracking": "z1"}

    participant = App(couriers, exchange=unique)
    with make_worker(buses, participant, broker_url).running():
        pass  # declares the participant's durable queue, then goes away: the request is routable
    url = f"sqlite:///{tmp_path}/sagas.db"
    reader = open_store(url)
    try:
        bus = make_bus(buses, broker_url, unique)
        with make_worker(buses, App(sagas=[Parcel], exchange=unique), broker_url, store=url).running():
            bus.publish(Event("ocis.parcel.sent", {"parcel_id": "p1"}))
            waiting = wait_for(lambda: reader.find_saga("parcel", "p1"), what="the saga to send its request")
        down = reader.get_saga(waiting.id)
        assert down is not None
        assert down.state == "ship"
        assert down.attempts == 1
        deadline = down.deadline
        assert deadline is not None
        request_id = down.meta["request"]["id"]
        wait_for(lambda: time.time() > deadline, what="the deadline to pass while no worker runs")
        still = reader.get_saga(waiting.id)
        assert still is not None
        assert still.attempts == 1

        with make_worker(buses, App(sagas=[Parcel], exchange=unique), broker_url, store=url).running():
            fired = wait_for(
                lambda: (s := reader.get_saga(waiting.id)) and s.attempts >= 2 and s,
                timeout=3.0,
                what="the new worker to fire the deadline",
            )
            assert fired.state == "ship"
            history = reader.saga_history(waiting.id)
            assert [h.to_state for h in history][:2] == ["ship", "ship"]
            assert history[1].reason == f"deadline passed: re-sent {SHIP} (attempt 2)"
            sent = [
                row[0]
                for row in sqlite3.connect(tmp_path / "sagas.db")
                .execute("SELECT message_id FROM outbox WHERE saga_id = ? ORDER BY id", (waiting.id,))
                .fetchall()
            ]
            assert sent[:2] == [request_id, request_id]
            with make_worker(buses, participant, broker_url, concurrency=1).running():
                done = wait_for(lambda: _final(reader, "parcel", "p1"), what="the parcel saga to complete")
        assert done.state == "completed"
        assert done.meta["steps"][-1] == {"step": "ship", "result": {"tracking": "z1"}}
        assert {e.id for e in shipped} == {request_id}
        assert len(shipped) == 1  # the copies of one request id were answered from the reply cache
    finally:
        reader.close()


class Holiday(Saga):
    """A state-machine saga whose one request has no on_failure."""

    type = "holiday"
    start = Start("ocis.holiday.cancelled", key="id", to="cancelling_hotel")
    states = [
        State("cancelling_hotel", sends=Request(CANCEL_HOTEL), timeout=30.0, retries=5, on_reply="done"),
        Final("done"),
    ]


def test_a_participant_exception_fails_the_saga_with_its_type_and_message(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A KeyError in a participant, once its retries are spent, becomes a failure reply whose reason
    names the exception type and message; the saga (no on_failure) fails at once with that reason."""
    hotels, runs = Service("hotels"), list[str]()

    @hotels.handles(CANCEL_HOTEL, retry=Retry(attempts=2, initial=0.05, maximum=0.05))
    def cancel(event: Event) -> dict[str, Any]:
        runs.append(event.id)
        return {"name": event.payload["passenger_name"]}

    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(hotels, sagas=[Holiday], exchange=unique), broker_url, store=store).running():
        bus.publish(Event("ocis.holiday.cancelled", {"id": "h1"}))
        saga = wait_for(lambda: _final(store, "holiday", "h1"), what="the saga to fail")
    assert (saga.state, saga.meta["failed_from"]) == ("failed", "cancelling_hotel")
    assert saga.meta["reason"] == "KeyError: 'passenger_name'"
    assert store.saga_history(saga.id)[-1].reason == "KeyError: 'passenger_name'"
    assert len(runs) == 2  # the handler's two attempts, and no re-sent request


def test_messages_that_move_no_saga_are_logged_with_their_reason_and_counted(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A duplicate start is logged at info, a reply for an unknown saga at warning, and a start event
    without its key is refused (dead-lettered) at warning; the pipeline counts each outcome."""
    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    worker = make_worker(buses, App(sagas=[Parcel], exchange=unique), broker_url, store=store)
    with worker.running(), structlog.testing.capture_logs() as logs:
        bus.publish(Event("ocis.parcel.sent", {"parcel_id": "p1"}))
        wait_for(lambda: _final(store, "parcel", "p1"), what="the parcel saga to end")  # (nobody ships)
        again = Event("ocis.parcel.sent", {"parcel_id": "p1"})
        keyless = Event("ocis.parcel.sent", {"parcelid": "p1"})
        stray = Event(
            SHIP + ".reply",
            {"ok": True, "result": {}},
            correlation_id="f" * 32,
            headers={REQUEST_ID_HEADER: "0" * 32},
        )
        for event in (again, keyless, stray):
            bus.publish(event)
        pipeline = worker.sagas
        assert pipeline is not None
        wait_for(lambda: sum(pipeline.outcomes.values()) >= 4 or None, what="the three messages")
    assert pipeline.outcomes == {"moved": 1, "duplicate-start": 1, "refused": 1, "unknown-saga": 1}
    handled = {e["event_id"]: e for e in logs if e.get("event") in ("message.ignored", "message.dead_lettered")}
    assert (handled[again.id]["event"], handled[again.id]["log_level"]) == ("message.ignored", "info")
    assert handled[again.id]["kind"] == "duplicate-start"
    assert (handled[keyless.id]["event"], handled[keyless.id]["log_level"]) == ("message.dead_lettered", "warning")
    assert handled[keyless.id]["kind"] == "refused"
    assert handled[keyless.id]["reason"] == "start event without a usable key: the payload has no 'parcel_id'"
    assert handled[keyless.id]["outcome"] == "dead-letter"
    assert (handled[stray.id]["log_level"], handled[stray.id]["kind"]) == ("warning", "unknown-saga")
