"""Step sagas and unknown outcomes (DESIGN: "compensations run, in reverse order, for the steps that
completed and for those whose outcome is unknown"), and compensations that keep failing: through the
deterministic harness, on the real worker and store."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import structlog

from examples.share import Share, effects
from examples.share import app as share_app
from sagas import App, ConfigurationError, Event, Failure, SagaContext, Service, Start, Step, StepSaga
from sagas.operations import Operations
from sagas.testing import Drop, Harness

MakeHarness = Callable[..., Harness]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    effects.clear()
    DONE.clear()
    BROKEN[:] = [True]


def _share(h: Harness, grantee: str = "marie") -> None:
    h.publish(
        "ocis.sharing.share_requested",
        {"share_id": "s1", "owner": "einstein", "grantee": grantee, "path": "/p", "size": 1},
    )


def test_a_step_whose_every_reply_is_lost_is_compensated(saga_harness: MakeHarness) -> None:
    """Every reply of the grant is lost: the grant may have happened (here it did), so it is revoked,
    then the quota released; the saga ends compensated and says why in its history."""
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant.reply", times=10)
    _share(h)
    h.settle()
    saga = h.saga(Share, "s1")
    assert saga.state == "compensated"
    assert effects == ["reserve s1", "grant s1", "revoke s1", "release s1"]
    assert saga.meta["compensation"] == {"undone": ["grant", "reserve_quota"], "not_undone": []}
    reasons = [e.reason for e in h.history(saga.id) if e.to_state == "undo_grant"]
    assert reasons == ["timed out in grant after 4 request(s): grant's outcome is unknown, so it is compensated"]


def test_a_lost_request_is_compensated_too_and_the_compensation_finds_nothing_to_undo(
    saga_harness: MakeHarness,
) -> None:
    """Every grant request is lost: the saga cannot tell, so the (idempotent) revoke runs anyway."""
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant", times=10)
    _share(h)
    h.settle()
    assert h.saga(Share, "s1").state == "compensated"
    assert effects == ["reserve s1", "revoke s1", "release s1"]


# -- a small trip: hotel, car, flight -----------------------------------------------------------------

#: what the participants did, in order
DONE: list[str] = []
#: whether returning a car fails (a Failure reply, every time)
BROKEN: list[bool] = [True]

hotels, cars, flights = Service("hotels"), Service("cars"), Service("flights")


@hotels.handles("travel.hotels.book")
def book_hotel(event: Event) -> None:
    DONE.append("book hotel")


@hotels.handles("travel.hotels.cancel")
def cancel_hotel(event: Event) -> None:
    DONE.append("cancel hotel")


@cars.handles("travel.cars.rent")
def rent_car(event: Event) -> None:
    if event.payload.get("fail") == "car":
        raise Failure("no car left")
    DONE.append("rent car")


@cars.handles("travel.cars.return", cache_replies=False)
def return_car(event: Event) -> None:
    if BROKEN[0]:
        raise Failure("the car lot is closed")
    DONE.append("return car")


@flights.handles("travel.flights.book")
def book_flight(event: Event) -> None:
    if event.payload.get("fail") == "flight":
        raise Failure("flight full")
    DONE.append("book flight")


@flights.handles("travel.flights.cancel")
def cancel_flight(event: Event) -> None:
    DONE.append("cancel flight")


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


STEPS = [
    Step("hotel", request="travel.hotels.book", compensation="travel.hotels.cancel", timeout=5, retries=1),
    Step("car", request="travel.cars.rent", compensation="travel.cars.return", timeout=5, retries=1),
    Step("flight", request="travel.flights.book", compensation="travel.flights.cancel", timeout=5, retries=1),
]


class Trip(StepSaga):
    type = "trip"
    start = Start("travel.trips.requested", key="trip", do=_keep)
    steps = STEPS


class TripThatGoesOn(StepSaga):
    type = "trip_that_goes_on"
    start = Start("travel.trips.requested", key="trip", do=_keep)
    steps = STEPS
    continue_compensating = True


class TripWithAQuietFlight(StepSaga):
    type = "trip_with_a_quiet_flight"
    start = Start("travel.trips.requested", key="trip", do=_keep)
    steps = [*STEPS[:2], Step("flight", request="travel.flights.book", timeout=5, unknown_outcome="assume_not_done")]


def test_a_failure_reply_is_not_compensated(saga_harness: MakeHarness) -> None:
    """The car company said no (a failure reply): it did nothing, so only the hotel is cancelled."""
    h = saga_harness(App(hotels, cars, flights, sagas=[Trip]))
    h.publish("travel.trips.requested", {"trip": "t1", "fail": "car"})
    h.settle()
    saga = h.saga(Trip, "t1")
    assert saga.state == "compensated"
    assert DONE == ["book hotel", "cancel hotel"]
    assert saga.meta["compensation"] == {"undone": ["hotel"], "not_undone": []}


def test_the_last_step_is_compensated_when_its_outcome_is_unknown(saga_harness: MakeHarness) -> None:
    """Every reply of the flight (the last step) is lost: the flight is cancelled, then the hotel (the
    car cannot be returned: the saga parks, see below; here it can)."""
    BROKEN[0] = False
    h = saga_harness(App(hotels, cars, flights, sagas=[Trip]))
    h.inject(Drop(), match="travel.flights.book.reply", times=10)
    h.publish("travel.trips.requested", {"trip": "t1"})
    h.settle()
    assert h.saga(Trip, "t1").state == "compensated"
    assert DONE == ["book hotel", "rent car", "book flight", "cancel flight", "return car", "cancel hotel"]


def test_assume_not_done_skips_the_compensation_of_an_unanswered_step(saga_harness: MakeHarness) -> None:
    """A step declared unknown_outcome='assume_not_done' is taken as not done when no reply came."""
    BROKEN[0] = False
    h = saga_harness(App(hotels, cars, flights, sagas=[TripWithAQuietFlight]))
    h.inject(Drop(), match="travel.flights.book.reply", times=10)
    h.publish("travel.trips.requested", {"trip": "t1"})
    h.settle()
    assert h.saga(TripWithAQuietFlight, "t1").state == "compensated"
    assert DONE == ["book hotel", "rent car", "book flight", "return car", "cancel hotel"]


def test_a_compensation_that_keeps_failing_parks_the_saga_with_what_was_not_undone(
    saga_harness: MakeHarness,
) -> None:
    """The car cannot be returned: the saga parks in failed, saying that neither the car nor the hotel
    was undone (the hotel's compensation waits for the operator)."""
    h = saga_harness(App(hotels, cars, flights, sagas=[Trip]))
    h.publish("travel.trips.requested", {"trip": "t1", "fail": "flight"})
    h.settle()
    saga = h.saga(Trip, "t1")
    assert saga.state == "failed"
    assert DONE == ["book hotel", "rent car"]
    assert saga.meta["compensation"] == {"undone": [], "not_undone": ["car", "hotel"]}
    assert saga.meta["failed_from"] == "undo_car"
    assert saga.meta["reason"] == "the car lot is closed"


def test_continue_compensating_undoes_the_earlier_steps_then_parks(saga_harness: MakeHarness) -> None:
    """With continue_compensating, the hotel is still cancelled after the car could not be returned;
    then the saga parks with the list. An operator's retry, once the lot opens, returns the car."""
    h = saga_harness(App(hotels, cars, flights, sagas=[TripThatGoesOn]))
    h.publish("travel.trips.requested", {"trip": "t1", "fail": "flight"})
    h.settle()
    saga = h.saga(TripThatGoesOn, "t1")
    assert saga.state == "failed"
    assert DONE == ["book hotel", "rent car", "cancel hotel"]
    assert saga.meta["compensation"] == {"undone": ["hotel"], "not_undone": ["car"]}
    assert saga.meta["failed_from"] == "undo_car"  # where a retry starts again
    history = h.history(saga.id)
    assert [e.to_state for e in history][-3:] == ["undo_car", "undo_hotel", "failed"]
    assert history[-2].reason == "the car lot is closed: car could not be undone; undoing the earlier steps"
    assert history[-1].reason.endswith("some steps could not be undone")

    BROKEN[0] = False
    Operations(h.store, sagas=h.app.sagas, bus=h.client_bus(), clock=h.clock).retry(saga.id, actor="marie")
    h.settle()
    saga = h.saga(TripThatGoesOn, "t1")
    assert saga.state == "compensated"
    assert DONE[3:] == ["return car", "cancel hotel"]  # (cancelling again: compensations are idempotent)
    assert saga.meta["compensation"] == {"undone": ["hotel", "car"], "not_undone": []}


def test_unknown_outcome_takes_compensate_or_assume_not_done() -> None:
    with pytest.raises(ConfigurationError, match="unknown_outcome= is 'compensate'"):
        Step("hotel", request="travel.hotels.book", unknown_outcome="maybe")  # type: ignore[arg-type]
