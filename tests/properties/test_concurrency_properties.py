"""Property tests of work done across workers at the same time: slow participants and duplicated events.

Handlers take virtual time (``Harness(handler_seconds=...)``), so while one worker's call runs, the
saga's deadline re-sends its request and another worker receives the copy; a duplicated event reaches
two workers at once. Whatever the timing, a participant's work runs at most once per request id and an
idempotent handler's at most once per event id, and every saga ends.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import structlog
from hypothesis import given
from hypothesis import strategies as st

from sagas import App, Event, Final, Request, Saga, Service, Start, State
from sagas.testing import Duplicate, Harness

#: (effect, request or event id), in the order the handlers ran
RAN: list[tuple[str, str]] = []

hotels, mail = Service("hotels"), Service("mail")


@hotels.handles("travel.hotels.book")
def book(event: Event) -> dict[str, Any]:
    RAN.append(("book", event.id))
    return {"room": 1}


@mail.on("travel.trips.booked", idempotent=True)
def send_mail(event: Event) -> None:
    RAN.append(("mail", event.id))


class Booking(Saga):
    type = "booking"
    start = Start("travel.trips.requested", key="trip", to="booking")
    states = [
        State("booking", sends=Request("travel.hotels.book"), timeout=5.0, retries=6, on_reply="booked"),
        Final("booked"),
    ]


app = App(hotels, mail, sagas=[Booking])


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@given(
    trips=st.integers(min_value=1, max_value=4),
    workers=st.integers(min_value=2, max_value=3),
    seconds=st.floats(min_value=0.0, max_value=40.0),
)
def test_a_slow_participant_does_the_work_of_a_request_once(trips: int, workers: int, seconds: float) -> None:
    """A participant slower than the saga's deadline does each request's work once, on whichever worker
    took it first; the re-sent copies are answered from its reply cache, and every saga ends booked."""
    _quiet()
    RAN.clear()
    with Harness(app, workers=workers, handler_seconds={"hotels.book": seconds}) as h:
        for i in range(trips):
            h.publish("travel.trips.requested", {"trip": f"t{i}"})
        h.settle()
        assert {r.state for r in h.sagas(Booking)} == {"booked"}
    booked = Counter(request for effect, request in RAN if effect == "book")
    assert len(booked) == trips
    assert set(booked.values()) == {1}, booked


@given(
    events=st.integers(min_value=1, max_value=5),
    copies=st.integers(min_value=2, max_value=3),
    workers=st.integers(min_value=2, max_value=3),
    seconds=st.floats(min_value=0.1, max_value=5.0),
)
def test_an_idempotent_handler_runs_an_event_once_across_workers(
    events: int, copies: int, workers: int, seconds: float
) -> None:
    """Copies of one event that reach several workers at once run the idempotent handler once."""
    _quiet()
    RAN.clear()
    with Harness(app, workers=workers, handler_seconds={"mail.send_mail": seconds}) as h:
        h.inject(Duplicate(copies), match="travel.trips.booked", times=events)
        sent = [h.publish("travel.trips.booked", {"trip": f"t{i}"}) for i in range(events)]
        h.settle()
    mailed = Counter(event for effect, event in RAN if effect == "mail")
    assert mailed == Counter({e.id: 1 for e in sent})
