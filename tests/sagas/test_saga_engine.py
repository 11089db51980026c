"""The saga engine driven by hand: one message in, one committed state change and its outbox out.

No broker: each test builds the participants' replies itself (an Event of type ``<request>.reply``,
correlation id = the saga id, header ``request_id`` = the request's id) and moves a fake clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from examples.postprocessing import READY, Postprocessing
from sagas import (
    FAILED,
    ActionRefused,
    Event,
    Final,
    Go,
    MemoryStore,
    Request,
    Saga,
    SagaContext,
    SagaEngine,
    SagaRecord,
    SagasError,
    Start,
    State,
    Step,
    StepSaga,
    set_data,
)
from sagas._protocol import REQUEST_ID_HEADER
from sagas._saga_engine import Applied
from sagas._store import HistoryEntry, OutboxRow, VersionConflict
from transport import CONTENT_TYPE, decode

T0 = 1_000_000.0
TRIP_REQUESTED = "ocis.trip.requested"
HOTEL, CANCEL_HOTEL = "ocis.trip.book_hotel", "ocis.trip.cancel_hotel"
CAR, RETURN_CAR = "ocis.trip.rent_car", "ocis.trip.return_car"
FLIGHT = "ocis.trip.book_flight"
MAIL = "ocis.trip.mail_agent"
SCAN, CHECK, REVERT = "ocis.antivirus.scan", "ocis.policies.check", "ocis.storage.revert"


def _what_was_done(step: str) -> Callable[[SagaContext], Mapping[str, Any]]:
    """A compensation's payload: the result of the step it undoes (from ``ctx.steps``; none when the
    step's outcome is unknown: every reply was lost)."""
    return lambda ctx: {step: dict(ctx.steps.get(step) or {})}


class Trip(StepSaga):
    """Three steps; the first two can be undone (the last one has nothing after it that could fail)."""

    type = "trip"
    start = Start(TRIP_REQUESTED, key="trip_id")
    steps = [
        Step(
            "hotel",
            HOTEL,
            compensation=CANCEL_HOTEL,
            compensation_payload=_what_was_done("hotel"),
            timeout=1.0,
            retries=2,
        ),
        Step("car", CAR, compensation=RETURN_CAR, compensation_payload=_what_was_done("car"), timeout=1.0, retries=2),
        Step("flight", FLIGHT, timeout=1.0, retries=2),
    ]


class Errand(StepSaga):
    """Three steps; the middle one has nothing to undo."""

    type = "errand"
    start = Start(TRIP_REQUESTED, key="trip_id")
    steps = [
        Step("hotel", HOTEL, compensation=CANCEL_HOTEL, timeout=1.0),
        Step("mail", MAIL, timeout=1.0),
        Step("flight", FLIGHT, timeout=1.0),
    ]


class Lookalike(Saga):
    """Another type that sends the same request as Trip's first step (so gets the same replies)."""

    type = "lookalike"
    start = Start("ocis.lookalike.requested", key="id", to="booking")
    states = [State("booking", sends=Request(HOTEL), timeout=1.0, on_reply="done"), Final("done")]


class Stubborn(Saga):
    """A state that sends a request but handles no failure of it: only its timeout leads out."""

    type = "stubborn"
    start = Start("ocis.stubborn.requested", key="id", to="asking")
    states = [
        State("asking", sends=Request(HOTEL), timeout=5.0, retries=5, on_reply="done", on_timeout="gave_up"),
        Final("gave_up"),
        Final("done"),
    ]


class Harness:
    """An engine on a memory store with a clock the test moves."""

    def __init__(self, *sagas: type[Saga]) -> None:
        self.now = [T0]
        self.store = MemoryStore()
        self.engine = self.make_engine(*sagas)

    def make_engine(self, *sagas: type[Saga]) -> SagaEngine:
        return SagaEngine(list(sagas), self.store, clock=lambda: self.now[0], rng=random.Random(0))

    def start(self, saga_type: str, event_type: str = TRIP_REQUESTED, **payload: Any) -> Applied:
        return self.engine.handle(saga_type, Event(event_type, payload or {"trip_id": "t1"}))

    def saga(self, saga_id: str) -> SagaRecord:
        record = self.store.get_saga(saga_id)
        assert record is not None
        return record

    def pending(self, saga_id: str) -> Event:
        """The request the saga waits on, as it was sent."""
        request = self.saga(saga_id).meta["request"]
        assert request is not None
        return decode(request["body"], CONTENT_TYPE)

    def answer(
        self,
        saga_type: str,
        saga_id: str,
        ok: bool = True,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> Applied:
        return self.engine.handle(saga_type, reply_to(self.pending(saga_id), ok, result, reason))

    def states(self, saga_id: str) -> list[str]:
        return [h.to_state for h in self.store.saga_history(saga_id)]


def reply_to(
    request: Event,
    ok: bool = True,
    result: dict[str, Any] | None = None,
    reason: str | None = None,
    *,
    request_id: str | None = None,
) -> Event:
    """A participant's reply to ``request`` (as a worker builds it)."""
    return Event(
        type=request.type + ".reply",
        payload={"ok": ok, "result": result if ok else None, "reason": None if ok else reason},
        source="participant",
        correlation_id=request.correlation_id,
        causation_id=request.id,
        headers={REQUEST_ID_HEADER: request_id or request.id},
    )


def requests(rows: list[OutboxRow]) -> list[Event]:
    return [decode(r.body, CONTENT_TYPE) for r in rows]


@pytest.fixture
def trip() -> Harness:
    return Harness(Trip, Errand, Lookalike, Stubborn)


def _started(h: Harness, saga_type: str = "trip", key: str = "t1") -> str:
    applied = h.start(saga_type, trip_id=key)
    assert applied.saga is not None
    assert applied.moved
    return applied.saga.id


# -- starting ----------------------------------------------------------------------------------------


def test_start_creates_one_saga_per_key(trip: Harness) -> None:
    """Each start event with a new key starts one saga in the first step, which sends its request."""
    a = trip.start("trip", trip_id="t1")
    b = trip.start("trip", trip_id="t2")
    assert a.saga is not None
    assert b.saga is not None
    assert a.saga.id != b.saga.id
    assert {s.key for s in trip.store.list_sagas(saga_type="trip")} == {"t1", "t2"}
    for applied in (a, b):
        assert applied.saga is not None
        (row,) = applied.rows
        (request,) = requests(applied.rows)
        assert row.routing_key == HOTEL
        assert row.mandatory
        assert request.correlation_id == applied.saga.id
        assert row.message_id == request.id == trip.saga(applied.saga.id).meta["request"]["id"]
        assert trip.saga(applied.saga.id).state == "hotel"
        assert trip.saga(applied.saga.id).attempts == 1


def test_repeated_start_event_is_a_noop(trip: Harness) -> None:
    """The same start event (same id) handled twice starts one saga; the second is a duplicate."""
    start = Event(TRIP_REQUESTED, {"trip_id": "t1"})
    first = trip.engine.handle("trip", start)
    again = trip.engine.handle("trip", start)
    assert first.moved
    assert not again.moved
    assert again.rows == []
    assert again.outcome == "duplicate"
    assert again.note == "duplicate: this message was handled before"
    assert len(trip.store.list_sagas(saga_type="trip")) == 1


def test_second_start_event_for_one_key_never_creates_a_second_saga(trip: Harness) -> None:
    """Another start event (another id) with the same key leaves the existing saga alone."""
    saga_id = _started(trip)
    again = trip.engine.handle("trip", Event(TRIP_REQUESTED, {"trip_id": "t1", "extra": 1}))
    assert not again.moved
    assert again.rows == []
    assert "duplicate start" in again.note
    (only,) = trip.store.list_sagas(saga_type="trip")
    assert only.id == saga_id
    assert only.version == 1


def test_start_event_without_a_usable_key_is_refused_with_the_reason(trip: Harness) -> None:
    """A start event whose key is missing, empty, not a string, or over the limit starts no saga and is
    refused (the pipeline dead-letters it) with a reason naming the field and what is wrong."""
    cases: dict[str, object] = {
        "the payload has no 'trip_id'": None,
        "'trip_id' is an empty string": "",
        "'trip_id' is null, not a string": None,
        "'trip_id' is a boolean, not a string": True,
        "'trip_id' is the number 7, not a string (send it as the string \"7\")": 7,
        "'trip_id' is the number 1.5, not a string": 1.5,
        "'trip_id' is an array, not a string": ["x"],
        "'trip_id' is an object, not a string": {"k": "v"},
        "'trip_id' contains a NUL character": "a\x00b",
        "'trip_id' is 1025 bytes long in UTF-8; the limit is 1024": "k" * 1025,
        "'trip_id' is 1026 bytes long in UTF-8; the limit is 1024": "\u00e9" * 513,
    }
    for reason, value in cases.items():
        payload = {"tripid": "m1"} if reason.startswith("the payload has no") else {"trip_id": value}
        applied = trip.engine.handle("trip", Event(TRIP_REQUESTED, payload))
        assert (applied.moved, applied.rows, applied.outcome) == (False, [], "refused")
        assert applied.refused
        assert applied.note.startswith(f"start event without a usable key: {reason}")
    assert trip.store.list_sagas() == []


def test_keys_are_kept_whole_and_never_merged(trip: Harness) -> None:
    """Keys are stored exactly as sent up to the limit: two keys that share a 255-character (or 1,023
    byte) prefix are two sagas, and the key of the limit's length is kept whole."""
    long_a, long_b = "u" * 255 + "a", "u" * 255 + "b"
    limit_a, limit_b = "v" * 1023 + "a", "v" * 1023 + "b"
    ids = {key: _started(trip, key=key) for key in (long_a, long_b, limit_a, limit_b, " t1 ", "t1")}
    assert len(set(ids.values())) == 6
    for key, saga_id in ids.items():
        assert trip.saga(saga_id).key == key
        found = trip.store.find_saga("trip", key)
        assert found is not None
        assert found.id == saga_id


# -- replies -----------------------------------------------------------------------------------------


def test_repeated_reply_is_a_noop(trip: Harness) -> None:
    """A reply handled once is in the inbox: the same message again changes nothing."""
    saga_id = _started(trip)
    answer = reply_to(trip.pending(saga_id), result={"room": 12})
    assert trip.engine.handle("trip", answer).moved
    version = trip.saga(saga_id).version
    again = trip.engine.handle("trip", answer)
    assert not again.moved
    assert again.rows == []
    assert again.outcome == "duplicate"
    assert again.note == "duplicate: this message was handled before"
    assert trip.saga(saga_id).version == version
    assert trip.saga(saga_id).state == "car"
    assert trip.saga(saga_id).meta["steps"] == [{"step": "hotel", "result": {"room": 12}}]


def test_late_reply_is_ignored(trip: Harness) -> None:
    """A reply whose request id is not the pending request's (an older request) moves nothing."""
    saga_id = _started(trip)
    stale = reply_to(trip.pending(saga_id), request_id="0" * 32)
    applied = trip.engine.handle("trip", stale)
    assert not applied.moved
    assert applied.rows == []
    assert "late or duplicate reply" in applied.note
    assert trip.saga(saga_id).state == "hotel"
    assert trip.saga(saga_id).version == 1


def test_reply_to_a_previous_step_is_ignored(trip: Harness) -> None:
    """A second reply (new message id) to the request of a step the saga has left is ignored."""
    saga_id = _started(trip)
    hotel_request = trip.pending(saga_id)
    assert trip.engine.handle("trip", reply_to(hotel_request)).moved
    applied = trip.engine.handle("trip", reply_to(hotel_request, ok=False, reason="changed my mind"))
    assert not applied.moved
    assert trip.saga(saga_id).state == "car"


def test_reply_after_the_saga_ended_is_ignored(trip: Harness) -> None:
    """Once the saga is final, even a reply carrying its last request's id moves nothing."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id)
    last = trip.pending(saga_id)
    assert trip.engine.handle("trip", reply_to(last)).moved
    ended = trip.saga(saga_id)
    assert ended.state == "completed"
    assert ended.final
    assert ended.deadline is None
    applied = trip.engine.handle("trip", reply_to(last, ok=False, reason="too late"))
    assert not applied.moved
    assert applied.rows == []
    assert trip.saga(saga_id).version == ended.version


def test_reply_correlated_to_a_saga_of_another_type_is_ignored(trip: Harness) -> None:
    """A reply that reaches a saga type's queue but names a saga of another type moves nothing."""
    trip_id = _started(trip)
    look = trip.start("lookalike", "ocis.lookalike.requested", id="l1")
    assert look.saga is not None
    answer = reply_to(trip.pending(trip_id))
    applied = trip.engine.handle("lookalike", answer)
    assert not applied.moved
    assert "unknown saga" in applied.note
    assert trip.saga(trip_id).state == "hotel"
    assert trip.saga(look.saga.id).state == "booking"
    assert trip.engine.handle("trip", answer).moved  # its own type still takes it


def test_reply_for_an_unknown_saga_is_ignored(trip: Harness) -> None:
    """A reply whose correlation id names no saga is ignored."""
    ghost = Event(HOTEL, correlation_id="f" * 32)
    applied = trip.engine.handle("trip", reply_to(ghost))
    assert applied.saga is None
    assert not applied.moved


def test_step_results_are_kept_in_meta_not_in_data(trip: Harness) -> None:
    """After a step saga completes, its data holds only what the user put there; meta holds the steps."""
    saga_id = _started(trip)
    for result in ({"room": 12}, {"plate": "B-1"}, {"seat": "3A"}):
        trip.answer("trip", saga_id, result=result)
    ended = trip.saga(saga_id)
    assert ended.state == "completed"
    assert ended.data == {"trip_id": "t1"}  # the start event's payload, and nothing of the steps
    assert ended.meta["steps"] == [
        {"step": "hotel", "result": {"room": 12}},
        {"step": "car", "result": {"plate": "B-1"}},
        {"step": "flight", "result": {"seat": "3A"}},
    ]


def test_ctx_steps_is_read_only_and_in_completion_order() -> None:
    """Payload builders see ctx.steps: step name -> result, in completion order, which they cannot change."""
    seen: list[Mapping[str, Any]] = []

    def peek(ctx: SagaContext) -> Mapping[str, Any]:
        seen.append(ctx.steps)
        with pytest.raises(TypeError):
            ctx.steps["hotel"] = {}  # type: ignore[index]
        with pytest.raises(TypeError):
            ctx.steps["hotel"]["room"] = 0  # type: ignore[index]
        return {}

    class Peeking(StepSaga):
        type = "peeking"
        start = Start(TRIP_REQUESTED, key="trip_id")
        steps = [Step("hotel", HOTEL, timeout=1.0), Step("car", CAR, timeout=1.0), Step("look", FLIGHT, payload=peek)]

    h = Harness(Peeking)
    saga_id = _started(h, "peeking")
    h.answer("peeking", saga_id, result={"room": 12})
    h.answer("peeking", saga_id, result={"plate": "B-1"})
    assert [list(s.items()) for s in seen] == [[("hotel", {"room": 12}), ("car", {"plate": "B-1"})]]


# -- compensation ------------------------------------------------------------------------------------


def test_failing_third_step_compensates_steps_two_then_one(trip: Harness) -> None:
    """When step 3 fails, step 2's compensation is sent, then step 1's; the saga ends compensated."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id, result={"room": 12})
    trip.answer("trip", saga_id, result={"plate": "B-1"})
    sent: list[Event] = []
    applied = trip.answer("trip", saga_id, ok=False, reason="no seats")
    sent += requests(applied.rows)
    applied = trip.answer("trip", saga_id, result={"returned": True})
    sent += requests(applied.rows)
    applied = trip.answer("trip", saga_id, result={"cancelled": True})
    assert applied.rows == []
    assert [e.type for e in sent] == [RETURN_CAR, CANCEL_HOTEL]
    assert all(e.correlation_id == saga_id for e in sent)
    # A compensation's payload builder reads what the steps returned in ctx.steps.
    assert sent[0].payload["car"] == {"plate": "B-1"}
    assert sent[1].payload["hotel"] == {"room": 12}
    assert trip.states(saga_id) == ["hotel", "car", "flight", "undo_car", "undo_hotel", "compensated"]
    history = trip.store.saga_history(saga_id)
    assert history[3].reason == "no seats"
    assert trip.saga(saga_id).final
    assert trip.saga(saga_id).state == "compensated"


def test_step_without_compensation_is_skipped(trip: Harness) -> None:
    """Compensating skips a completed step that has nothing to undo."""
    saga_id = _started(trip, "errand")
    trip.answer("errand", saga_id)
    applied = trip.answer("errand", saga_id)
    assert [e.type for e in requests(applied.rows)] == [FLIGHT]
    applied = trip.answer("errand", saga_id, ok=False, reason="no seats")
    assert [e.type for e in requests(applied.rows)] == [CANCEL_HOTEL]
    trip.answer("errand", saga_id)
    assert trip.states(saga_id) == ["hotel", "mail", "flight", "undo_hotel", "compensated"]


def test_first_step_failing_ends_compensated_at_once(trip: Harness) -> None:
    """A failure of the first step has nothing to undo: the saga ends compensated, sending nothing."""
    saga_id = _started(trip)
    applied = trip.answer("trip", saga_id, ok=False, reason="fully booked")
    assert applied.rows == []
    assert trip.saga(saga_id).state == "compensated"


def test_failing_compensation_parks_the_saga_in_failed(trip: Harness) -> None:
    """A compensation that fails parks the saga in 'failed', with the reason and where it failed."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id, ok=False, reason="no seats")
    applied = trip.answer("trip", saga_id, ok=False, reason="the car lot is closed")
    assert applied.rows == []
    parked = trip.saga(saga_id)
    assert parked.state == FAILED
    assert parked.final
    assert parked.deadline is None
    assert parked.meta["reason"] == "the car lot is closed"
    assert parked.meta["failed_from"] == "undo_car"
    assert parked.meta["request"] is None
    assert trip.states(saga_id)[-1] == FAILED


def test_failure_reply_without_a_reason_gets_one(trip: Harness) -> None:
    """A failure reply with no reason still records why the saga failed."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id, ok=False)
    trip.answer("trip", saga_id, ok=False)
    assert trip.saga(saga_id).meta["reason"] == "the participant failed"


# -- correlated events -------------------------------------------------------------------------------


def test_correlated_event_moves_the_waiting_saga() -> None:
    """An event listed in `correlate` finds its saga by the payload key and moves it."""
    h = Harness(Postprocessing)
    saga_id = _started_upload(h)
    h.answer("postprocessing", saga_id, result={"infected": False})
    applied = h.answer("postprocessing", saga_id, result={"allowed": True})
    (finished,) = requests(applied.rows)
    assert finished.type == "ocis.postprocessing.finished"
    assert finished.payload == {"upload_id": "u1", "outcome": "continue"}
    assert h.saga(saga_id).state == "finishing"
    assert not h.engine.handle("postprocessing", Event(READY, {"upload_id": "other"})).moved
    assert h.engine.handle("postprocessing", Event(READY, {"upload_id": "u1"})).moved
    assert h.saga(saga_id).state == "done"
    assert not h.engine.handle("postprocessing", Event(READY, {"upload_id": "u1"})).moved


def _started_upload(h: Harness, upload_id: str = "u1", name: str = "a.txt") -> str:
    applied = h.start(
        "postprocessing", "ocis.storage.bytes_received", upload_id=upload_id, name=name, size=10, user="marie"
    )
    assert applied.saga is not None
    return applied.saga.id


def test_guards_pick_the_first_transition_that_passes() -> None:
    """Of two replies from one state, the guarded one is taken when its guard passes."""
    h = Harness(Postprocessing)
    clean, infected = _started_upload(h, "u1"), _started_upload(h, "u2", "eicar.com")
    assert [e.type for e in requests(h.answer("postprocessing", clean, result={"infected": False}).rows)] == [CHECK]
    assert [e.type for e in requests(h.answer("postprocessing", infected, result={"infected": True}).rows)] == [REVERT]
    assert h.saga(infected).data["outcome"] == "delete"


# -- deadlines ---------------------------------------------------------------------------------------


def _fire_at(h: Harness, at: float) -> list[OutboxRow]:
    h.now[0] = at
    return h.engine.fire_due()


def test_deadline_resends_the_same_request_until_retries_are_spent(trip: Harness) -> None:
    """Past the deadline the same request (same id, same body) is sent again with attempts + 1 and a
    longer wait; when the retries are spent, the timeout transition compensates."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)  # now in 'car', retries=2
    first = trip.saga(saga_id)
    request_id = first.meta["request"]["id"]
    body = first.meta["request"]["body"]
    assert first.attempts == 1
    assert first.deadline is not None
    waits = [first.deadline - trip.now[0]]
    assert _fire_at(trip, first.deadline - 0.001) == []  # not yet
    for attempt in (2, 3):
        deadline = trip.saga(saga_id).deadline
        assert deadline is not None
        (row,) = _fire_at(trip, deadline)
        assert row.message_id == request_id
        assert row.body == body
        assert row.routing_key == CAR
        again = trip.saga(saga_id)
        assert again.state == "car"
        assert again.attempts == attempt
        assert again.deadline is not None
        waits.append(again.deadline - trip.now[0])
    assert waits[0] < waits[1] < waits[2]
    assert 0.9 <= waits[0] <= 1.1
    assert 1.8 <= waits[1] <= 2.2
    assert 3.6 <= waits[2] <= 4.4
    deadline = trip.saga(saga_id).deadline
    assert deadline is not None
    (undo,) = requests(_fire_at(trip, deadline))
    assert undo.type == RETURN_CAR  # the car's outcome is unknown: it is undone first
    assert undo.payload == {"car": {}}
    assert trip.saga(saga_id).state == "undo_car"
    history = trip.store.saga_history(saga_id)
    assert [h.to_state for h in history] == ["hotel", "car", "car", "car", "undo_car"]
    assert "re-sent ocis.trip.rent_car (attempt 2)" in history[2].reason
    assert history[-1].reason == "timed out in car after 3 request(s): car's outcome is unknown, so it is compensated"


def test_timeout_takes_on_timeout_with_its_action() -> None:
    """In the state-machine style, spent retries take the `timeout` transition (and run its action)."""
    h = Harness(Postprocessing)
    saga_id = _started_upload(h)
    sends = 1
    while h.saga(saga_id).state == "scanning":
        deadline = h.saga(saga_id).deadline
        assert deadline is not None
        rows = _fire_at(h, deadline)
        sends += sum(1 for r in rows if r.routing_key == SCAN)
    assert sends == 5  # first send + retries=4
    assert h.saga(saga_id).state == "reverting"
    assert h.saga(saga_id).data["outcome"] == "abort"


def test_state_without_request_times_out_to_on_timeout() -> None:
    """A waiting state that sends nothing takes on_timeout at its deadline, without re-sending."""
    h = Harness(Postprocessing)
    saga_id = _started_upload(h)
    h.answer("postprocessing", saga_id, result={"infected": False})
    h.answer("postprocessing", saga_id, result={"allowed": True})
    record = h.saga(saga_id)
    assert record.state == "finishing"
    assert record.attempts == 0
    assert record.deadline is not None
    assert _fire_at(h, record.deadline) == []
    assert h.saga(saga_id).state == "done"


def test_fire_due_fires_only_the_due_sagas(trip: Harness) -> None:
    """fire_due touches only sagas whose deadline has passed."""
    early = trip.start("trip", trip_id="early")
    trip.now[0] += 0.5
    late = trip.start("trip", trip_id="late")
    assert early.saga is not None
    assert late.saga is not None
    early_deadline = trip.saga(early.saga.id).deadline
    late_deadline = trip.saga(late.saga.id).deadline
    assert early_deadline is not None
    assert late_deadline is not None
    assert early_deadline < late_deadline
    rows = _fire_at(trip, (early_deadline + late_deadline) / 2)
    assert [r.saga_id for r in rows] == [early.saga.id]
    assert trip.saga(early.saga.id).attempts == 2
    assert trip.saga(late.saga.id).attempts == 1
    assert trip.saga(late.saga.id).version == 1


def test_fire_due_respects_its_limit(trip: Harness) -> None:
    """fire_due(limit=n) fires at most n deadlines, the earliest first."""
    ids = []
    for i in range(3):
        applied = trip.start("trip", trip_id=f"t{i}")
        assert applied.saga is not None
        ids.append(applied.saga.id)
        trip.now[0] += 0.01
    trip.now[0] += 5
    by_deadline = sorted(ids, key=lambda i: trip.saga(i).deadline or 0.0)
    assert [r.saga_id for r in trip.engine.fire_due(limit=2)] == by_deadline[:2]
    assert [r.saga_id for r in trip.engine.fire_due(limit=2)] == by_deadline[2:]


# -- unroutable requests -------------------------------------------------------------------------------


def test_unroutable_request_fails_the_step_at_once(trip: Harness) -> None:
    """A request nobody is bound to receive fails its step now, not at the deadline."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    car = trip.pending(saga_id)
    assert trip.engine.request_unroutable(saga_id, "0" * 32, "nobody") == []  # not the pending one
    assert trip.saga(saga_id).state == "car"
    (undo,) = requests(trip.engine.request_unroutable(saga_id, car.id, "no service is bound to receive it"))
    assert undo.type == CANCEL_HOTEL
    assert trip.saga(saga_id).state == "undo_hotel"
    assert trip.store.saga_history(saga_id)[-1].reason == "no service is bound to receive it"
    assert trip.engine.request_unroutable(saga_id, car.id, "again") == []


def test_unroutable_request_without_a_failure_transition_times_out(trip: Harness) -> None:
    """Where the state handles no failure, an unroutable request takes the timeout transition."""
    applied = trip.start("stubborn", "ocis.stubborn.requested", id="s1")
    assert applied.saga is not None
    request = trip.pending(applied.saga.id)
    trip.engine.request_unroutable(applied.saga.id, request.id, "nobody")
    assert trip.saga(applied.saga.id).state == "gave_up"


def test_unroutable_compensation_parks_the_saga(trip: Harness) -> None:
    """An unroutable compensation request parks the saga in 'failed' with the reason."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id, ok=False, reason="no cars")
    undo = trip.pending(saga_id)
    assert undo.type == CANCEL_HOTEL
    trip.engine.request_unroutable(saga_id, undo.id, "no service is bound to receive it")
    assert trip.saga(saga_id).state == FAILED
    assert trip.saga(saga_id).meta["reason"] == "no service is bound to receive it"


# -- operators ---------------------------------------------------------------------------------------


def _parked(h: Harness, key: str = "t1") -> str:
    saga_id = _started(h, key=key)
    h.answer("trip", saga_id)
    h.answer("trip", saga_id)
    h.answer("trip", saga_id, ok=False, reason="no seats")
    h.answer("trip", saga_id, ok=False, reason="the car lot is closed")
    assert h.saga(saga_id).state == FAILED
    return saga_id


def test_retry_of_a_failed_saga_goes_back_to_where_it_failed(trip: Harness) -> None:
    """Operator retry takes a failed saga back to `failed_from`, sends that state's request afresh, and
    the saga can then finish."""
    saga_id = _parked(trip)
    old_request = trip.store.saga_history(saga_id)
    rows = trip.engine.retry(saga_id, actor="marie")
    (request,) = requests(rows)
    back = trip.saga(saga_id)
    assert back.state == "undo_car"
    assert not back.final
    assert request.type == RETURN_CAR
    assert back.meta["request"]["id"] == request.id
    assert back.attempts == 1
    assert back.deadline is not None
    assert trip.store.saga_history(saga_id)[len(old_request)].reason == "operator: retry"
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id)
    assert trip.saga(saga_id).state == "compensated"


def test_retry_of_a_waiting_saga_sends_its_request_again(trip: Harness) -> None:
    """Operator retry of a waiting saga sends the current state's request now, with fresh attempts."""
    saga_id = _started(trip)
    deadline = trip.saga(saga_id).deadline
    assert deadline is not None
    _fire_at(trip, deadline)
    assert trip.saga(saga_id).attempts == 2
    (request,) = requests(trip.engine.retry(saga_id, actor="marie"))
    assert request.type == HOTEL
    assert trip.saga(saga_id).attempts == 1
    assert trip.saga(saga_id).state == "hotel"


def test_retry_of_a_saga_that_ended_well_is_refused(trip: Harness) -> None:
    """Only a failed saga can be retried once it has ended."""
    saga_id = _started(trip)
    for _ in range(3):
        trip.answer("trip", saga_id)
    with pytest.raises(SagasError, match="only a failed saga can be retried"):
        trip.engine.retry(saga_id, actor="marie")
    with pytest.raises(SagasError, match="no saga"):
        trip.engine.retry("nope", actor="marie")


def test_operator_compensate_follows_the_compensate_transition(trip: Harness) -> None:
    """Operator compensate takes a saga where its type's compensate transition says."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id)
    assert trip.saga(saga_id).state == "flight"
    (undo,) = requests(trip.engine.compensate(saga_id, actor="marie"))
    assert undo.type == RETURN_CAR
    assert trip.saga(saga_id).state == "undo_car"
    assert trip.store.saga_history(saga_id)[-1].reason == "operator: compensate"


def test_operator_compensate_where_none_is_defined_is_refused(trip: Harness) -> None:
    """Compensating from a state without a compensate transition raises, naming the state; so does
    compensating a saga that has ended."""
    saga_id = _started(trip)
    trip.answer("trip", saga_id)
    trip.answer("trip", saga_id, ok=False, reason="no cars")
    assert trip.saga(saga_id).state == "undo_hotel"
    with pytest.raises(SagasError, match="no compensation from state 'undo_hotel'"):
        trip.engine.compensate(saga_id, actor="marie")
    assert trip.saga(saga_id).state == "undo_hotel"
    parked = _parked(trip, key="t2")
    with pytest.raises(SagasError):
        trip.engine.compensate(parked, actor="marie")


# -- concurrency -------------------------------------------------------------------------------------


def test_saving_a_stale_record_raises_version_conflict(trip: Harness) -> None:
    """A record read before another engine moved the saga cannot be saved over it."""
    saga_id = _started(trip)
    stale = trip.saga(saga_id)
    other = trip.make_engine(Trip, Errand, Lookalike, Stubborn)
    assert other.handle("trip", reply_to(trip.pending(saga_id))).moved
    stale.version += 1
    stale.state = "compensated"
    with pytest.raises(VersionConflict):
        trip.store.save_saga(
            stale,
            expected_version=stale.version - 1,
            history=HistoryEntry(T0, "m", "hotel", "compensated", "stale"),
            inbox=None,
            outbox=[],
        )
    assert trip.saga(saga_id).state == "car"
    assert trip.states(saga_id) == ["hotel", "car"]


class _Interleaving:
    """A store that, just before the first saga save, lets ``meanwhile`` run (another engine)."""

    def __init__(self, store: MemoryStore, meanwhile: Callable[[], object]) -> None:
        self._store = store
        self._meanwhile: Callable[[], object] | None = meanwhile
        self.conflicts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def save_saga(self, record: SagaRecord, **kw: Any) -> list[OutboxRow]:
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            meanwhile()
        try:
            return self._store.save_saga(record, **kw)
        except VersionConflict:
            self.conflicts += 1
            raise


def test_two_engines_applying_two_replies_concurrently(trip: Harness) -> None:
    """Two engines apply different replies to one saga at the same time: one wins, the other conflicts,
    reloads, and finds its reply is now late."""
    saga_id = _started(trip)
    request = trip.pending(saga_id)
    success = reply_to(request, result={"room": 1})
    failure = reply_to(request, ok=False, reason="overbooked")  # a second reply to the same request
    winner = trip.make_engine(Trip)
    racing = _Interleaving(trip.store, lambda: winner.handle("trip", failure))
    loser = SagaEngine([Trip], racing, clock=lambda: trip.now[0], rng=random.Random(1))
    applied = loser.handle("trip", success)
    assert racing.conflicts == 1
    assert not applied.moved
    assert "late or duplicate" in applied.note
    assert trip.saga(saga_id).state == "compensated"
    assert trip.states(saga_id) == ["hotel", "compensated"]


# -- known gaps ----------------------------------------------------------------------------------------


class Resumable(Saga):
    """Reacts to its own start event once it is waiting (which compile_saga accepts without `correlate`)."""

    type = "resumable"
    start = Start("ocis.resumable.requested", key="id", to="waiting")
    states = [State("waiting", timeout=5.0, on={"ocis.resumable.requested": "done"}), Final("done")]


def test_transition_on_the_start_event_fires_for_a_waiting_saga() -> None:
    """A state's `on` entry for the start event moves the saga that event names."""
    h = Harness(Resumable)
    first = h.engine.handle("resumable", Event("ocis.resumable.requested", {"id": "r1"}))
    assert first.saga is not None
    again = h.engine.handle("resumable", Event("ocis.resumable.requested", {"id": "r1"}))
    assert again.moved
    assert h.saga(first.saga.id).state == "done"


def test_due_sagas_of_unknown_types_do_not_starve_known_ones(trip: Harness) -> None:
    """Due sagas of a type this engine does not know never keep it from firing its own deadlines."""
    foreign = trip.start("errand", trip_id="e1")  # another app's saga in the same store
    trip.now[0] += 0.5
    own = trip.start("trip", trip_id="t1")
    assert foreign.saga is not None
    assert own.saga is not None
    trip_only = trip.make_engine(Trip)
    trip.now[0] += 10
    for _ in range(3):  # three timer ticks
        trip_only.fire_due(limit=1)
    assert trip.saga(own.saga.id).attempts > 1


def test_a_saga_in_a_state_its_type_no_longer_has_is_parked_not_blocking() -> None:
    """A saga stranded in a removed state is parked in `failed` with the reason when its deadline fires,
    and other sagas' deadlines still fire in the same tick."""
    import random

    from sagas import Event, Final, MemoryStore, Request, Saga, SagaEngine, Start, State

    class Ping(Saga):
        type = "ping"
        start = Start("ocis.ping.started", key="k", to="waiting")
        states = [
            State("waiting", sends=Request("ocis.ping.ping"), timeout=1.0, retries=1, on_reply="done"),
            Final("done"),
        ]

    now = [1000.0]
    store = MemoryStore()
    engine = SagaEngine([Ping], store, clock=lambda: now[0], rng=random.Random(0))
    stranded = engine.handle("ping", Event("ocis.ping.started", {"k": "old"})).saga
    healthy = engine.handle("ping", Event("ocis.ping.started", {"k": "new"})).saga
    assert stranded is not None
    assert healthy is not None
    record = store.get_saga(stranded.id)
    assert record is not None
    record.state, record.version = "renamed_away", record.version + 1
    moved = HistoryEntry(now[0], "m", "waiting", "renamed_away", "as if a deploy removed the state it waits in")
    store.save_saga(record, expected_version=record.version - 1, history=moved, inbox=None, outbox=[])
    now[0] += 10
    engine.fire_due()
    parked, other = store.get_saga(stranded.id), store.get_saga(healthy.id)
    assert parked is not None
    assert other is not None
    assert (parked.state, parked.final) == ("failed", True)
    assert "no longer exists" in parked.meta["reason"]
    assert other.attempts == 2  # its request was re-sent in the same tick
    with pytest.raises(ActionRefused, match="has no state to go back to \\(it failed in 'renamed_away'\\)"):
        engine.retry(parked.id, actor="marie")


def test_an_operator_retry_of_a_stranded_saga_is_refused_with_what_to_do() -> None:
    """Retrying a saga in a state its type no longer has is refused with the reason (it raised KeyError)."""
    h = Harness(Trip)
    saga_id = _started(h)
    record = h.saga(saga_id)
    record.state, record.version = "renamed_away", record.version + 1
    moved = HistoryEntry(h.now[0], "m", "hotel", "renamed_away", "as if a deploy removed the state it waits in")
    h.store.save_saga(record, expected_version=record.version - 1, history=moved, inbox=None, outbox=[])
    with pytest.raises(ActionRefused, match="is in state 'renamed_away', which saga type trip no longer has"):
        h.engine.retry(saga_id, actor="marie")
    assert h.saga(saga_id).state == "renamed_away"


def test_user_data_may_hold_any_keys_a_step_saga_uses_itself() -> None:
    """A start payload holding `completed`, step names and the metadata's own keys stays the user's data,
    untouched, and the step saga runs to the end (the bookkeeping lives in the saga's metadata)."""
    h = Harness(Trip)
    payload = {
        "trip_id": "t1",
        "completed": False,
        "hotel": "my own hotel note",
        "steps": "not the saga's",
        "request": None,
        "compensation": ["x"],
        "failed_from": 3,
    }
    started = h.engine.handle("trip", Event(TRIP_REQUESTED, payload)).saga
    assert started is not None
    saga_id = started.id
    for _ in range(3):
        assert h.answer("trip", saga_id, result={"ref": "r"}).moved
    done = h.saga(saga_id)
    assert done.state == "completed"
    assert done.data == payload
    assert [s["step"] for s in done.meta["steps"]] == ["hotel", "car", "flight"]


def test_start_keep_copies_the_fields_present_and_do_runs_after() -> None:
    """Start(keep=...) copies the start event's fields that are present into the data, then do= runs."""

    class Kept(Saga):
        type = "kept"
        start = Start("ocis.kept.started", key="id", to="waiting", keep=("id", "name", "size"), do=set_data(seen=True))
        states = [State("waiting", sends=Request("ocis.kept.ask"), timeout=5.0, on_reply="done"), Final("done")]

    engine = SagaEngine([Kept], MemoryStore())
    applied = engine.handle("kept", Event("ocis.kept.started", {"id": "k1", "name": "a.txt", "other": 1}))
    assert applied.saga is not None
    assert applied.saga.data == {"id": "k1", "name": "a.txt", "seen": True}


# -- failures with nowhere declared to go -----------------------------------------------------------


class Holiday(Saga):
    """A state that sends a request and declares no on_failure (the deadline would re-send it 5 times)."""

    type = "holiday"
    start = Start("ocis.holiday.cancelled", key="id", to="cancelling_hotel")
    states = [
        State("cancelling_hotel", sends=Request(CANCEL_HOTEL), timeout=5.0, retries=5, on_reply="done"),
        Final("done"),
    ]


def test_failure_reply_without_on_failure_fails_the_saga_at_once_with_the_reason() -> None:
    """A failure reply to a state without on_failure moves the saga to 'failed' at once (no re-sends),
    and the saga's reason and history entry are the participant's reason."""
    h = Harness(Holiday)
    applied = h.start("holiday", "ocis.holiday.cancelled", id="h1")
    assert applied.saga is not None
    saga_id = applied.saga.id
    moved = h.answer("holiday", saga_id, ok=False, reason="503 Service Unavailable")
    assert (moved.moved, moved.rows) == (True, [])
    failed = h.saga(saga_id)
    assert (failed.state, failed.final, failed.attempts) == (FAILED, True, 0)
    assert failed.meta["reason"] == "503 Service Unavailable"
    assert failed.meta["failed_from"] == "cancelling_hotel"
    assert h.store.saga_history(saga_id)[-1].reason == "503 Service Unavailable"
    assert h.states(saga_id) == ["cancelling_hotel", FAILED]
    assert _fire_at(h, T0 + 1_000.0) == []  # nothing left to re-send


def test_failure_reply_without_on_failure_takes_on_timeout_at_once(trip: Harness) -> None:
    """Where the state says where it gives up (on_timeout), a failure reply without on_failure goes
    there at once, with the participant's reason in the history."""
    applied = trip.start("stubborn", "ocis.stubborn.requested", id="s1")
    assert applied.saga is not None
    trip.answer("stubborn", applied.saga.id, ok=False, reason="quota exceeded")
    assert trip.saga(applied.saga.id).state == "gave_up"
    assert trip.store.saga_history(applied.saga.id)[-1].reason == "quota exceeded"


# -- what a saga's data starts as -------------------------------------------------------------------


def test_start_without_keep_or_do_copies_the_whole_payload_into_the_data() -> None:
    """Start without keep= and do= starts the data as a copy of the event's payload, so the first
    request (the data, by default) carries it to the participant."""
    h = Harness(Holiday)
    payload = {"id": "h1", "guest": {"name": "Ada"}, "nights": 3}
    event = Event("ocis.holiday.cancelled", payload)
    applied = h.engine.handle("holiday", event)
    assert applied.saga is not None
    assert applied.saga.data == payload
    assert applied.saga.data["guest"] is not event.payload["guest"]  # a copy: the event is never shared
    (request,) = requests(applied.rows)
    assert request.payload == payload


def test_start_with_do_only_starts_empty_and_a_step_saga_keeps_its_keep_fields() -> None:
    """With do= and no keep=, the data starts empty for do= to fill; a step saga's Start(keep=...) keeps
    those fields only."""

    class Noted(Saga):
        type = "noted"
        start = Start("ocis.noted.started", key="id", to="waiting", do=set_data(seen=True))
        states = [State("waiting", sends=Request("ocis.noted.ask"), timeout=5.0, on_reply="done"), Final("done")]

    class Picky(StepSaga):
        type = "picky"
        start = Start("ocis.picky.started", key="id", keep=("id",))
        steps = [Step("ask", "ocis.picky.ask")]

    engine = SagaEngine([Noted, Picky], MemoryStore())
    noted = engine.handle("noted", Event("ocis.noted.started", {"id": "n1", "other": 1}))
    picky = engine.handle("picky", Event("ocis.picky.started", {"id": "p1", "other": 1}))
    assert noted.saga is not None
    assert picky.saga is not None
    assert noted.saga.data == {"seen": True}
    assert picky.saga.data == {"id": "p1"}


def test_failure_reply_that_no_guarded_on_failure_takes_gives_up_at_once() -> None:
    """A failure reply that none of the state's guarded on_failure outcomes takes gives up at once too
    (on_timeout, default 'failed'), with the participant's reason."""

    class Picky(Saga):
        type = "picky"
        start = Start("ocis.picky.started", key="id", to="asking")
        states = [
            State(
                "asking",
                sends=Request("ocis.picky.ask"),
                timeout=5.0,
                on_reply="done",
                on_failure=Go("done", when=lambda ctx: ctx.reason == "busy"),
            ),
            Final("done"),
        ]

    h = Harness(Picky)
    busy, fatal = (h.start("picky", "ocis.picky.started", id=key).saga for key in ("p1", "p2"))
    assert busy is not None
    assert fatal is not None
    h.answer("picky", busy.id, ok=False, reason="busy")
    h.answer("picky", fatal.id, ok=False, reason="disk on fire")
    assert h.saga(busy.id).state == "done"
    assert (h.saga(fatal.id).state, h.saga(fatal.id).meta["reason"]) == (FAILED, "disk on fire")


# -- reading a batch ahead -----------------------------------------------------------------------------


class _CountingReads(MemoryStore):
    """A memory store that counts the reads of one message at a time (inbox checks, saga loads), not
    those of a read ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.single_reads = 0
        self._inside = 0

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.single_reads += not self._inside
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    def seen(self, consumer: str, message_id: str) -> bool:
        with self._counted():
            return super().seen(consumer, message_id)

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        with self._counted():
            return super().get_saga(saga_id)

    def find_saga(self, saga_type: str, key: str) -> SagaRecord | None:
        with self._counted():
            return super().find_saga(saga_type, key)

    @contextmanager
    def _ahead(self) -> Iterator[None]:
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    def answers(self, inbox: Sequence[tuple[str, str]], replies: Sequence[tuple[str, str]]) -> Any:
        with self._ahead():
            return super().answers(inbox, replies)

    def get_sagas(self, saga_ids: Sequence[str]) -> dict[str, SagaRecord]:
        with self._ahead():
            return super().get_sagas(saga_ids)

    def find_sagas(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SagaRecord]:
        with self._ahead():
            return super().find_sagas(keys)


def test_a_batch_read_ahead_applies_as_one_message_at_a_time_and_rereads_what_it_shares() -> None:
    """A batch whose first reads were read ahead (the saga pipeline's group) ends as the same messages
    handled one by one: messages that reach one saga (a start and a reply to it, a start event twice, a
    second start for one key) read their own when they are handled, after the earlier ones changed it;
    the others read nothing more."""
    h = Harness(Trip)
    store = _CountingReads()
    h.store = store
    h.engine = h.make_engine(Trip)
    first = _started(h, key="a")
    second = _started(h, key="b")
    start_c = Event(TRIP_REQUESTED, {"trip_id": "c"})
    batch = [
        reply_to(h.pending(first)),  # alone on its saga: read ahead
        start_c,
        start_c,  # the same event twice: the second is a duplicate
        Event(TRIP_REQUESTED, {"trip_id": "d"}),  # a new saga, alone on its key: read ahead
        Event(TRIP_REQUESTED, {"trip_id": "b"}),  # a second start of saga b ...
        reply_to(h.pending(second)),  # ... and a reply to it: both read their own
    ]
    store.single_reads = 0
    with h.engine.group(), h.engine.reading_ahead("trip", batch):
        outcomes = []
        for event in batch:
            with h.engine.group():
                outcomes.append(h.engine.handle("trip", event).outcome)
    assert outcomes == ["moved", "moved", "duplicate", "moved", "duplicate-start", "moved"]
    assert h.states(first) == ["hotel", "car"]
    assert h.states(second) == ["hotel", "car"]
    assert sorted(s.key for s in store.list_sagas(saga_type="trip")) == ["a", "b", "c", "d"]
    # (each read ahead is given once: the copy of start_c checks the inbox again, and the reply to b
    # loads b again after b's second start was given it)
    assert store.single_reads == 2
