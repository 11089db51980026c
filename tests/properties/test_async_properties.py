"""Property tests with ``async def`` participants: the harness runs them on its virtual-time loop.

The trip saga's properties (test_saga_properties) hold unchanged with async participants that sleep,
some longer than the saga's 5 s deadline, mixed with a sync one; a slow async participant does each
request's work once and its reply cache answers the re-sent copies; and a run replays exactly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from sagas import App, Event, Failure, Service
from sagas.testing import Drop, FaultSchedule, Harness, NotVirtual
from sagas.testing.strategies import fault_schedules
from tests.properties import test_concurrency_properties as concurrency
from tests.properties.test_saga_properties import EFFECTS, SagaFaults, Trip, _effect, book_flight

hotels, cars, flights = Service("hotels"), Service("cars"), Service("flights")


def _pause(event: Event) -> float:
    """How long a participant takes for a trip: 0, 2, 4 or 6 virtual seconds (trip-3 outwaits the
    saga's 5 s deadline, so its request is re-sent while the first call still runs)."""
    return float(int(str(event.payload["trip"]).rsplit("-", 1)[1]) % 4) * 2.0


@hotels.handles("travel.hotels.book")
async def book_hotel(event: Event) -> dict[str, Any]:
    await asyncio.sleep(_pause(event))
    return _effect("book_hotel", event)


@hotels.handles("travel.hotels.cancel")
async def cancel_hotel(event: Event) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    return _effect("cancel_hotel", event)


@cars.handles("travel.cars.rent")
async def rent_car(event: Event) -> dict[str, Any]:
    await asyncio.sleep(_pause(event) / 2)
    if event.payload.get("fail") == "car":
        raise Failure("no car left")
    return _effect("rent_car", event)


@cars.handles("travel.cars.return")
async def return_car(event: Event) -> dict[str, Any]:
    (result,) = await asyncio.gather(asyncio.sleep(1.0, _effect("return_car", event)))
    return result


flights.handles("travel.flights.book")(book_flight)  # (sync, beside the async ones)

async_app = App(hotels, cars, flights, sagas=[Trip])


class AsyncSagaFaults(SagaFaults):
    """The trip saga's fault properties, with async participants."""

    app = async_app
    scenario = "sagas with async participants under any fault schedule (hypothesis)"


TestAsyncSagaFaults = AsyncSagaFaults.TestCase


# -- a participant slower than the saga's deadline ----------------------------------------------------

#: how long the async hotel takes, in virtual seconds
SLEEP = [0.0]
slow_hotels = Service("hotels")


@slow_hotels.handles("travel.hotels.book")
async def book(event: Event) -> dict[str, Any]:
    concurrency.RAN.append(("book", event.id))
    await asyncio.sleep(SLEEP[0])
    return {"room": 1}


slow_app = App(slow_hotels, concurrency.mail, sagas=[concurrency.Booking])


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@given(
    trips=st.integers(min_value=1, max_value=4),
    workers=st.integers(min_value=1, max_value=3),
    seconds=st.floats(min_value=0.0, max_value=40.0),
)
def test_a_slow_async_participant_does_the_work_of_a_request_once(trips: int, workers: int, seconds: float) -> None:
    """An async participant that sleeps past the saga's deadline does each request's work once; the
    re-sent copies are answered from its reply cache, and every saga ends booked."""
    _quiet()
    concurrency.RAN.clear()
    SLEEP[0] = seconds
    with Harness(slow_app, workers=workers) as h:
        for i in range(trips):
            h.publish("travel.trips.requested", {"trip": f"t{i}"})
        h.settle()
        assert {r.state for r in h.sagas(concurrency.Booking)} == {"booked"}
    booked = Counter(request for effect, request in concurrency.RAN if effect == "book")
    assert len(booked) == trips
    assert set(booked.values()) == {1}, booked


def test_a_participant_sleeping_past_the_deadline_does_the_work_once() -> None:
    """A participant that sleeps 12 virtual seconds behind a 5 s deadline: the saga waits for it while
    it holds the request's claim, the saga moves only when the sleep is over, and when that reply is
    lost the re-sent request is answered from the reply cache: the work runs once."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    concurrency.RAN.clear()
    SLEEP[0] = 12.0
    with Harness(slow_app, workers=2) as h, structlog.testing.capture_logs() as logs:
        start = h.clock()
        h.inject(Drop(), match="travel.hotels.book.reply")
        h.publish("travel.trips.requested", {"trip": "t1"})
        h.run()
        assert len(concurrency.RAN) == 1  # the call started; its sleep has not ended
        h.advance(11.9)
        saga = h.saga(concurrency.Booking, "t1")
        assert saga.state == "booking"
        assert any(line["event"] == "saga.request_being_handled" for line in logs)
        assert h.stats.published == 2  # the start and the request: not re-sent while it is handled
        h.advance(0.1)
        assert h.stats.dropped == 1  # the call ended, and its reply was lost
        h.settle()
        saga = h.saga(concurrency.Booking, "t1")
        assert saga.state == "booked"
        (booked,) = [e for e in h.history(saga.id) if e.to_state == "booked"]
        assert booked.at - start > 12.0
    assert [effect for effect, _ in concurrency.RAN] == ["book"]
    cached = [line for line in logs if line.get("kind") == "cached-reply"]
    assert [line["handler"] for line in cached] == ["book"]


# -- determinism ----------------------------------------------------------------------------------------


def _trace(faults: FaultSchedule, trips: int) -> tuple[Any, ...]:
    """One run of the async trip app: what the participants did and when (virtual), each saga's
    history with its times, the clock at the end, and the harness's figures."""
    EFFECTS.clear()
    with Harness(async_app, faults=faults, workers=2, seed=3) as h:
        for i in range(trips):
            h.publish("travel.trips.requested", {"trip": f"trip-{i}", "fail": ["", "car", "flight"][i % 3]})
        h.settle()
        histories = sorted(
            (r.key, r.state, tuple((e.to_state, round(e.at, 6)) for e in h.history(r.id))) for r in h.sagas(Trip)
        )
        return tuple(histories), h.clock(), h.stats.as_dict(), tuple((name, trip) for name, trip, _ in EFFECTS)


@settings(max_examples=25)
@given(faults=fault_schedules(), trips=st.integers(min_value=1, max_value=4))
def test_the_same_schedule_replays_the_same_run(faults: FaultSchedule, trips: int) -> None:
    """Async participants do not make a run less reproducible: the same faults and seed give the same
    histories, to the virtual microsecond, and the same effects in the same order."""
    _quiet()
    first = _trace(faults, trips)
    assert _trace(faults, trips) == first


# -- what the harness cannot run ------------------------------------------------------------------------


def test_real_network_io_in_an_async_handler_fails_the_test_saying_what_to_do() -> None:
    """An async handler that opens a connection fails the test with NotVirtual, even though the handler
    caught the error."""
    _quiet()
    svc = Service("fetcher")

    @svc.on("files.fetch.requested")
    async def fetch(event: Event) -> None:
        try:
            await asyncio.open_connection("127.0.0.1", 9)
        except Exception:  # (what a careless handler does)
            return

    with Harness(svc) as h:
        h.publish("files.fetch.requested")
        with pytest.raises(NotVirtual, match=r"httpx\.MockTransport"):
            h.run()


def test_an_await_nothing_completes_fails_the_test_instead_of_hanging() -> None:
    """An async handler waiting on an event nobody sets fails the test with NotVirtual at once."""
    _quiet()
    svc = Service("waiter")

    @svc.on("files.wait.requested")
    async def wait(event: Event) -> None:
        await asyncio.Event().wait()

    with Harness(svc) as h:
        h.publish("files.wait.requested")
        with pytest.raises(NotVirtual, match="nothing will ever complete"):
            h.run()
