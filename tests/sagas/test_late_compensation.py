"""Late successes in the state-machine style (``State(..., late={...: compensate(...)})``): a request's
success reply or an event that comes after the saga stopped waiting for it is undone, with its own
deadline and retries, and recorded in the saga's history; one the saga counted is not undone."""

from __future__ import annotations

from typing import Any

import pytest

from sagas import (
    ActionRefused,
    App,
    ConfigurationError,
    Event,
    Failure,
    Final,
    Request,
    Saga,
    Service,
    Start,
    State,
    Step,
    StepSaga,
    compensate,
)
from sagas.testing import Delay, Drop, Harness

BOOK, CANCEL = "late.rooms.book", "late.rooms.cancel"

effects: list[str] = []


class Booking(Saga):
    type = "booking"
    start = Start("late.bookings.requested", key="id", to="booking")
    states = [
        State(
            "booking",
            sends=Request(BOOK),
            timeout=5,
            retries=1,
            on_reply="booked",
            on_timeout="given_up",
            late={BOOK: compensate(CANCEL, retries=1)},
        ),
        Final("booked"),
        Final("given_up"),
    ]


rooms = Service("rooms")


@rooms.handles(BOOK)
def book(event: Event) -> dict[str, Any]:
    if event.payload.get("book") == "refuse":
        raise Failure("no room")
    effects.append(f"book {event.payload['id']}")
    return {"room": 7}


@rooms.handles(CANCEL)
def cancel(event: Event) -> None:
    if event.payload.get("cancel") == "refuse":
        raise Failure("the hotel refuses to cancel")
    effects.append(f"cancel {event.payload['id']}")


app = App(rooms, sagas=[Booking])


@pytest.fixture(autouse=True)
def _clear() -> None:
    effects.clear()


def _reasons(h: Harness, key: str) -> list[str]:
    return [e.reason for e in h.history(h.saga(Booking, key).id)]


def test_a_success_reply_after_the_timeout_is_undone_and_recorded() -> None:
    with Harness(app) as h:
        # both answers (the second from the participant's reply cache, the same message) come after
        # both sends' deadlines (5 s, then 10 s)
        h.inject(Delay(seconds=100), match=BOOK + ".reply", times=2)
        h.publish("late.bookings.requested", {"id": "b1"})
        h.settle()
        record = h.saga(Booking, "b1")
        reasons = _reasons(h, "b1")
    assert record.state == "given_up"
    assert effects == ["book b1", "cancel b1"]  # undone once
    late = [r for r in reasons if r.startswith("late success")]
    assert len(late) == 2, reasons
    assert BOOK in late[0]
    assert f"sent {CANCEL}" in late[0]
    assert "undone" in late[1]
    assert not record.meta.get("late"), "no compensation is left in flight"
    assert record.deadline is None


def test_a_late_success_that_cannot_be_undone_parks_the_saga_with_what_remains() -> None:
    with Harness(app) as h:
        h.inject(Delay(seconds=100), match=BOOK + ".reply", times=2)
        h.inject(Drop(), match=CANCEL + ".reply", times=5)  # every answer of the compensation is lost
        h.publish("late.bookings.requested", {"id": "b3"})
        h.settle()
        record = h.saga(Booking, "b3")
        reasons = _reasons(h, "b3")
        with pytest.raises(ActionRefused, match="remaining by hand"):
            h.operations.retry(record.id, actor="test")
    assert record.state == "failed"
    assert record.meta["compensation"]["not_undone"] == [BOOK]
    assert any(r.startswith("deadline passed: re-sent " + CANCEL) for r in reasons), reasons
    assert "could not undo the late success of " + BOOK in record.meta["reason"]
    assert "its effect remains" in reasons[-1]


def test_a_failing_undo_of_a_late_success_parks_the_saga() -> None:
    with Harness(app) as h:
        h.inject(Delay(seconds=100), match=BOOK + ".reply", times=2)
        h.publish("late.bookings.requested", {"id": "b4", "cancel": "refuse"})
        h.settle()
        record = h.saga(Booking, "b4")
    assert record.state == "failed"
    assert "the hotel refuses to cancel" in record.meta["reason"]
    assert effects == ["book b4"]


def test_a_late_failure_reply_changes_nothing() -> None:
    with Harness(app) as h:
        h.inject(Delay(seconds=100), match=BOOK + ".reply", times=2)
        h.publish("late.bookings.requested", {"id": "b5", "book": "refuse"})
        h.settle()
        record = h.saga(Booking, "b5")
        reasons = _reasons(h, "b5")
    assert record.state == "given_up"
    assert effects == []
    assert not any(r.startswith("late success") for r in reasons), reasons


def test_an_operator_retry_supersedes_the_request_and_whichever_answers_first_counts() -> None:
    """The first request's reply is slow; an operator retries; the superseded request answers first and
    counts (the saga moves on); the retry's success, later, is the effect the saga counts: not undone."""
    with Harness(app, workers=2) as h:
        h.inject(Delay(seconds=4), match=BOOK + ".reply")
        h.publish("late.bookings.requested", {"id": "b6"})
        h.run()
        record = h.saga(Booking, "b6")
        h.operations.retry(record.id, actor="marie")
        h.inject(Delay(seconds=100), match=BOOK + ".reply")
        h.settle()
        record = h.saga(Booking, "b6")
        reasons = _reasons(h, "b6")
    assert record.state == "booked"
    assert effects == ["book b6", "book b6"]  # both requests ran; nothing was cancelled
    assert any("(a superseded request)" in r for r in reasons), reasons
    assert any(r.startswith("late success") and "counts its effect already" in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("late", "error"),
    [
        ({"late.rooms.other": compensate(CANCEL)}, "does not wait for"),
        ({BOOK: CANCEL}, "write compensate"),
    ],
)
def test_late_is_checked_when_the_saga_is_defined(late: Any, error: str) -> None:
    class Wrong(Saga):
        type = "wrong_late"
        start = Start("late.wrong.requested", key="id", to="booking")
        states = [State("booking", sends=BOOK, timeout=5, on_reply="booked", late=late), Final("booked")]

    with pytest.raises(ConfigurationError, match=error):
        Wrong.definition()


def test_a_final_state_takes_no_late() -> None:
    class Wrong(Saga):
        type = "wrong_final_late"
        start = Start("late.wrong.requested", key="id", to="booking")
        states = [
            State("booking", sends=BOOK, timeout=5, on_reply="booked"),
            State("booked", final=True, late={BOOK: compensate(CANCEL)}),
        ]

    with pytest.raises(ConfigurationError, match="waits for nothing"):
        Wrong.definition()


def test_compensate_checks_its_arguments() -> None:
    with pytest.raises(ConfigurationError, match="seconds above 0"):
        compensate(CANCEL, timeout=0)
    with pytest.raises(ConfigurationError, match="0 or more"):
        compensate(CANCEL, retries=-1)
    assert compensate(CANCEL).request.type == CANCEL


# -- step sagas: the compensation metadata stays exact -------------------------------------------------

HOTEL, UNHOTEL, CAR = "late.hotels.book", "late.hotels.cancel", "late.cars.rent"


class Trip(StepSaga):
    type = "late_trip"
    start = Start("late.trips.requested", key="id")
    steps = [
        Step("hotel", request=HOTEL, compensation=UNHOTEL, timeout=5, retries=1),
        Step("car", request=CAR, timeout=5, retries=1),
    ]


travel = Service("travel")


@travel.handles(HOTEL)
def book_hotel(event: Event) -> None:
    effects.append(f"hotel {event.payload['id']}")


@travel.handles(UNHOTEL)
def cancel_hotel(event: Event) -> None:
    effects.append(f"unhotel {event.payload['id']}")


@travel.handles(CAR)
def rent_car(event: Event) -> None:
    raise Failure("no car")


trips = App(travel, sagas=[Trip])


def test_a_compensation_that_answers_after_the_saga_parked_completes_the_compensation() -> None:
    with Harness(trips) as h:
        h.inject(Delay(seconds=100), match=UNHOTEL + ".reply", times=2)  # past both of its sends
        h.publish("late.trips.requested", {"id": "t1"})
        h.settle()
        record = h.saga(Trip, "t1")
        reasons = [e.reason for e in h.history(record.id)]
    assert record.state == "compensated"
    assert record.meta["compensation"] == {"undone": ["hotel"], "not_undone": []}
    assert "hotel is undone after all: every step is undone" in reasons[-1]
    assert effects == ["hotel t1", "unhotel t1"]


def test_a_late_success_that_cannot_be_undone_is_no_longer_listed_as_undone() -> None:
    with Harness(trips) as h:
        # the hotel's answers come after the step gave up (it is undone, its outcome unknown), and then
        # every answer of the second undo is lost
        h.inject(Delay(seconds=100), match=HOTEL + ".reply", times=2)
        h.publish("late.trips.requested", {"id": "t2"})
        h.run()
        h.advance(40)  # the step has timed out and been undone
        h.inject(Drop(), match=UNHOTEL + ".reply", times=5)
        h.settle()
        record = h.saga(Trip, "t2")
    assert record.state == "failed"
    assert record.meta["compensation"] == {"undone": [], "not_undone": ["hotel"]}
    assert effects[-1] == "unhotel t2"  # (the participant undid it; the saga cannot know)
