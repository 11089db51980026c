"""Stateful property tests of sagas under any fault schedule (DESIGN: "Guarantees to state and prove").

Hypothesis drives a :class:`sagas.testing.Harness` running two workers of a trip-booking app: it
starts trips (some with duplicated start events), injects message faults (drop, duplicate, delay,
reorder), arms crashes before or after any side effect, kills and restarts workers and the broker,
steps the workers in any interleaving and moves the clock. Then the faults stop, the clock moves on,
and every property must hold:

- every saga reaches a final state;
- compensations run, in reverse order, for exactly the steps that completed and the step whose
  outcome is unknown (no reply came back: it may have been done); a step that got its failure reply is
  not compensated, and no step whose effect happened is left done in a compensated saga;
  a saga parks in ``failed`` only from a compensation whose every attempt a fault took, and
  says what it did and did not undo;
- no participant effect applies twice (the participants use their reply cache), except where a crash
  fell in the window between the effect and its reply-cache commit, which no framework can close;
- no saga handles the same message twice;
- a duplicate start event never creates a second saga;
- a saga whose own code raises (a rule breaks a trip's payload builders at a random moment) is parked
  in ``failed`` with the error in its history, and every other saga still ends as above.

The ``sagas-ci`` profile runs in CI; ``HYPOTHESIS_PROFILE=sagas-thorough`` runs 2,000 examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import structlog
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from sagas import App, Event, Failure, SagaContext, Service, Start, Step, StepSaga
from sagas.testing import Harness, Stats
from sagas.testing.strategies import message_faults
from tests.properties._world import WORKERS, FaultyWorld, report_run

#: (effect, trip, request id) in the order the participants applied them
EFFECTS: list[tuple[str, str, str]] = []
#: trips whose saga's own code raises from now on (its payload builders)
BROKEN: set[str] = set()


def _payload(ctx: SagaContext) -> dict[str, Any]:
    """The request payload: the saga's data, unless the trip's saga code is broken."""
    if ctx.data.get("trip") in BROKEN:
        raise RuntimeError("the saga's own code failed")
    return ctx.data


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


class Trip(StepSaga):
    type = "trip"
    start = Start("travel.trips.requested", key="trip", do=_keep)
    steps = [
        Step(
            "hotel",
            request="travel.hotels.book",
            compensation="travel.hotels.cancel",
            payload=_payload,
            compensation_payload=_payload,
            timeout=5,
            retries=3,
        ),
        Step(
            "car",
            request="travel.cars.rent",
            compensation="travel.cars.return",
            payload=_payload,
            compensation_payload=_payload,
            timeout=5,
            retries=3,
        ),
        Step("flight", request="travel.flights.book", payload=_payload, timeout=5, retries=3),
    ]


hotels, cars, flights = Service("hotels"), Service("cars"), Service("flights")


def _effect(name: str, event: Event) -> dict[str, Any]:
    EFFECTS.append((name, str(event.payload["trip"]), event.id))
    return {"ref": f"{name}-{event.payload['trip']}"}


@hotels.handles("travel.hotels.book")
def book_hotel(event: Event) -> dict[str, Any]:
    return _effect("book_hotel", event)


@hotels.handles("travel.hotels.cancel")
def cancel_hotel(event: Event) -> dict[str, Any]:
    return _effect("cancel_hotel", event)


@cars.handles("travel.cars.rent")
def rent_car(event: Event) -> dict[str, Any]:
    if event.payload.get("fail") == "car":
        raise Failure("no car left")
    return _effect("rent_car", event)


@cars.handles("travel.cars.return")
def return_car(event: Event) -> dict[str, Any]:
    return _effect("return_car", event)


@flights.handles("travel.flights.book")
def book_flight(event: Event) -> dict[str, Any]:
    if event.payload.get("fail") == "flight":
        raise Failure("flight full")
    return _effect("book_flight", event)


app = App(hotels, cars, flights, sagas=[Trip])
DO = {"hotel": "book_hotel", "car": "rent_car", "flight": "book_flight"}
UNDO = {"hotel": "cancel_hotel", "car": "return_car"}
TRIP_MATCHES = [
    "#",
    "travel.*.*",
    "travel.*.*.reply",
    "travel.trips.requested",
    "travel.hotels.*",
    "travel.cars.rent.reply",
    "travel.flights.book",
]


class SagaFaults(FaultyWorld):
    #: the app under test, and the name of its figures in the test report (a variant changes both)
    app = app
    scenario = "sagas under any fault schedule (hypothesis)"

    def __init__(self) -> None:
        super().__init__()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        EFFECTS.clear()
        BROKEN.clear()
        self.h = Harness(self.app, workers=WORKERS, auto_restart=False)
        self.trips: dict[str, str] = {}
        self.starts: dict[str, list[str]] = {}  # the start events' ids of each trip

    def teardown(self) -> None:
        try:
            self.faults_stop_and_every_saga_ends()
            report_run(
                self.h,
                self.scenario,
                sagas_started=len(self.h.sagas(Trip)),
                sagas_final=sum(r.final for r in self.h.sagas(Trip)),
                sagas_compensated=len(self.h.sagas(Trip, "compensated")),
                effects_applied_again=sum(n - 1 for n in Counter(e[2] for e in EFFECTS).values()),
            )
        finally:
            self.h.close()
            BROKEN.clear()  # (other tests run this app: no trip stays broken after the run)

    # -- what the world does ---------------------------------------------------------------------

    @initialize(n=st.integers(1, 3), fail=st.sampled_from(["", "car", "flight"]))
    def first_trips(self, n: int, fail: str) -> None:
        for i in range(n):
            self.start_trip(i, fail, duplicate=False)

    @rule(i=st.integers(0, 6), fail=st.sampled_from(["", "car", "flight"]), duplicate=st.booleans())
    def start_trip(self, i: int, fail: str, duplicate: bool) -> None:
        key = f"trip-{i}"
        fail = self.trips.setdefault(key, fail)  # starting a trip again is a duplicate start
        event = self.h.publish("travel.trips.requested", {"trip": key, "fail": fail})
        self.starts.setdefault(key, []).append(event.id)
        if duplicate:
            self.h.send(event)  # the same event again (same id)

    @rule(i=st.integers(0, 6))
    def break_a_sagas_code(self, i: int) -> None:
        BROKEN.add(f"trip-{i}")

    @rule(fault=message_faults(), match=st.sampled_from(TRIP_MATCHES), times=st.integers(1, 3))
    def message_fault(self, fault: Any, match: str, times: int) -> None:
        self.h.inject(fault, match=match, times=times)

    # -- what must always hold -------------------------------------------------------------------

    @invariant()
    def one_saga_per_trip(self) -> None:
        keys = Counter(r.key for r in self.h.sagas(Trip))
        assert all(n == 1 for n in keys.values()), keys
        assert set(keys) <= set(self.trips)

    @invariant()
    def no_saga_handles_a_message_twice(self) -> None:
        for record in self.h.sagas(Trip):
            ids = [e.message_id for e in self.h.history(record.id)]
            assert len(ids) == len(set(ids)), (record.key, ids)

    @invariant()
    def effects_apply_once_outside_the_crash_window(self) -> None:
        _check_effects(self.h.stats)

    # -- once the faults stop and the clock moves on ------------------------------------------------

    @rule()
    def faults_stop_and_every_saga_ends(self) -> None:
        self.stop_faults_and_settle()
        h = self.h
        sagas = {r.key: r for r in h.sagas(Trip)}
        # a trip whose every start event the network lost never started (its publisher's loss)
        arrived = {key for key, ids in self.starts.items() if any(h.network.copies[i] for i in ids)}
        # ... unless its saga's code was broken before it started: then its start is dead-lettered
        missing = arrived - set(sagas)
        assert set(sagas) <= arrived
        assert missing <= BROKEN, "every trip whose start event arrived started exactly one saga"
        dead = {letter.id for letter in h.dead_letters() if "no saga was started" in letter.reason}
        assert all(set(self.starts[key]) & dead for key in missing), (missing, dead)
        for key, record in sagas.items():
            assert record.final, (key, record.state)
            raised = [e.reason for e in h.history(record.id) if "raised RuntimeError: the saga's own code" in e.reason]
            if raised:  # parked by its own code: the operator's to look at; the others went on
                assert key in BROKEN, (key, raised)
                assert record.state == "failed", (key, record.state)
                assert "Traceback (most recent call last)" in raised[-1]
                continue
            _check_compensations(key, record.state, record.meta, self.trips[key], h.stats)
        _check_effects(h.stats)


def _check_effects(stats: Stats) -> None:
    per_request = Counter(request_id for _name, _trip, request_id in EFFECTS)
    twice = sum(n - 1 for n in per_request.values())
    window = stats.at_risk
    assert twice <= window, f"{twice} effect(s) applied again, with only {window} run(s) caught in the window"


def _check_compensations(key: str, state: str, meta: dict[str, Any], fail: str, stats: Stats) -> None:
    completed = [s["step"] for s in meta.get("steps", [])]
    done = [name for name, trip, _ in EFFECTS if trip == key]
    undone = list(dict.fromkeys(n for n in done if n in UNDO.values()))
    if state == "completed":
        assert completed == ["hotel", "car", "flight"]
        assert not undone, (key, done)
        assert fail == ""
        return
    if state == "failed":
        # parked: every attempt of a compensation was lost or late (the documented end of a compensation
        # that keeps failing); the saga says what it undid, and that is what the participants undid
        assert str(meta.get("failed_from", "")).startswith("undo_"), (key, meta)
        assert stats.dropped or stats.delayed or sum(stats.crashes.values()), "a compensation failed with no cause"
        compensation = meta.get("compensation") or {}
        assert compensation.get("not_undone"), (key, meta)
        assert [UNDO[s] for s in compensation.get("undone", [])] == undone, (key, meta, done)
        return
    assert state == "compensated", (key, state)
    # the completed ones are a prefix of the steps: nothing ran after the one that did not complete
    steps = ["hotel", "car", "flight"]
    assert completed == steps[: len(completed)]
    for step in completed:
        assert DO[step] in done
    # the steps undone: the completed ones, and the next one when its outcome is unknown (no reply
    # came back). Only a step told to fail may have answered with a failure reply, and then is not
    # undone; if that reply was lost too, its outcome is unknown to the saga and it is undone.
    following = steps[len(completed) : len(completed) + 1]
    with_unknown = [UNDO[s] for s in reversed(completed + following) if s in UNDO]
    without = [UNDO[s] for s in reversed(completed) if s in UNDO]
    if following and following[0] == fail:
        assert undone in (with_unknown, without), (key, completed, done)
    else:
        assert undone == with_unknown, (key, completed, done)
    # what the saga says it undid is what the participants undid
    assert [UNDO[s] for s in (meta.get("compensation") or {}).get("undone", [])] == undone, (key, meta, done)
    # and nothing the participants did stays done
    for step, effect in DO.items():
        if effect in done and step in UNDO:
            assert UNDO[step] in undone, (key, done)


TestSagaFaults = SagaFaults.TestCase
