"""Saga definitions: wrong ones fail at start-up with what to fix; right ones compile once per type."""

from __future__ import annotations

import pytest

from examples.postprocessing import Postprocessing
from sagas import (
    COMPENSATE,
    FAILED,
    App,
    ConfigurationError,
    Final,
    Request,
    Saga,
    Start,
    State,
    Step,
    StepSaga,
    compensate,
    event,
    failure,
    reply,
    timeout,
)

ASK = "ocis.test.ask"
OTHER = "ocis.test.other"
BEGIN = "ocis.test.begin"
NUDGE = "ocis.test.nudge"


def _compile(cls: type[Saga]) -> None:
    cls.definition()


# -- errors ------------------------------------------------------------------------------------------


def test_no_final_state_is_refused() -> None:
    """A saga that can never end (no final state besides 'failed') is refused."""

    class Endless(Saga):
        type = "endless"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0)]
        transitions = [reply(ASK, "asking", "asking")]

    with pytest.raises(ConfigurationError, match=r"no final state besides 'failed'.*Final\(\.\.\.\)"):
        _compile(Endless)


def test_unreachable_state_is_refused() -> None:
    """A state no start, transition or timeout leads to is named in the error."""

    class Island(Saga):
        type = "island"
        start = Start(BEGIN, key="id", to="asking")
        states = [
            State("asking", Request(ASK), timeout=1.0),
            State("lonely", timeout=1.0, on_timeout="done"),
            Final("done"),
        ]
        transitions = [reply(ASK, "asking", "done"), timeout("lonely", "done")]

    with pytest.raises(ConfigurationError, match=r"state\(s\) lonely can never be reached"):
        _compile(Island)


def test_reply_to_a_request_no_state_sends_is_refused() -> None:
    """Handling the reply to a request that no state sends is refused."""

    class Deaf(Saga):
        type = "deaf"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done")]
        transitions = [reply(ASK, "asking", "done"), reply(OTHER, "asking", "done")]

    with pytest.raises(ConfigurationError, match=rf"handles a reply to {OTHER}, but no state sends that request"):
        _compile(Deaf)


def test_failure_handled_in_a_state_that_never_sends_it_is_refused() -> None:
    """A failure handled in a state other than the one that sends the request is refused."""

    class Confused(Saga):
        type = "confused"
        start = Start(BEGIN, key="id", to="asking")
        states = [
            State("asking", Request(ASK), timeout=1.0),
            State("waiting", timeout=1.0, on_timeout="done"),
            Final("done"),
        ]
        transitions = [reply(ASK, "asking", "waiting"), failure(ASK, "waiting", "done")]

    with pytest.raises(ConfigurationError, match=rf"state 'waiting' handles a failure to {ASK} it never sends"):
        _compile(Confused)


def test_waiting_state_without_timeout_is_refused() -> None:
    """Every non-final state needs a deadline; the error says to give it timeout=."""

    class Patient(Saga):
        type = "patient"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK)), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    with pytest.raises(ConfigurationError, match=r"waiting state 'asking' has no deadline; give it timeout="):
        _compile(Patient)


def test_transition_to_an_unknown_state_is_refused() -> None:
    """A transition whose destination is not declared is refused, naming it."""

    class Lost(Saga):
        type = "lost"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done")]
        transitions = [reply(ASK, "asking", "done"), failure(ASK, "asking", "nowhere")]

    with pytest.raises(ConfigurationError, match=rf"transition on failure:{ASK} to unknown state 'nowhere'"):
        _compile(Lost)


def test_timeout_to_an_unknown_state_is_refused() -> None:
    """A state's on_timeout must name a declared state."""

    class Lost(Saga):
        type = "lost_timeout"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0, on_timeout="nowhere"), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    with pytest.raises(ConfigurationError, match=r"state 'asking' times out to unknown state 'nowhere'"):
        _compile(Lost)


def test_start_to_an_unknown_state_is_refused() -> None:
    """A start event must lead to a declared state."""

    class Lost(Saga):
        type = "lost_start"
        start = Start(BEGIN, key="id", to="nowhere")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    with pytest.raises(ConfigurationError, match=rf"start event {BEGIN} leads to unknown state 'nowhere'"):
        _compile(Lost)


def test_event_trigger_not_in_correlate_is_refused() -> None:
    """Reacting to an event without saying which payload field holds the saga key is refused."""

    class Uncorrelated(Saga):
        type = "uncorrelated"
        start = Start(BEGIN, key="id", to="waiting")
        states = [State("waiting", timeout=1.0), Final("done")]
        transitions = [event(NUDGE, "waiting", "done")]

    with pytest.raises(
        ConfigurationError,
        match=rf"reacts to {NUDGE} but does not say how to find the saga: "
        r"add it to `correlate`",
    ):
        _compile(Uncorrelated)


def test_step_saga_without_steps_is_refused() -> None:
    """A step saga needs at least one step."""

    class Empty(StepSaga):
        type = "empty"
        start = Start(BEGIN, key="id", to="")
        steps = []

    with pytest.raises(ConfigurationError, match=r"step saga Empty has no steps"):
        _compile(Empty)


def test_step_saga_with_two_steps_of_one_name_is_refused() -> None:
    """Step names are state names: two steps may not share one."""

    class Twice(StepSaga):
        type = "twice"
        start = Start(BEGIN, key="id", to="")
        steps = [Step("reserve", ASK), Step("reserve", OTHER)]

    with pytest.raises(ConfigurationError, match=r"two steps with one name"):
        _compile(Twice)


def test_type_name_must_be_lowercase() -> None:
    """The saga type is a lowercase name; the error shows an example."""

    class Shouty(Saga):
        type = "Shouty"
        start = Start(BEGIN, key="id", to="done")
        states = [Final("done")]

    with pytest.raises(ConfigurationError, match=r"needs a lowercase `type` name"):
        _compile(Shouty)


def test_app_refuses_a_bad_saga_at_construction() -> None:
    """App(sagas=[Bad]) raises ConfigurationError when it is built, not when the first message comes."""

    class Bad(Saga):
        type = "bad"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK)), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    with pytest.raises(ConfigurationError, match=r"saga Bad: waiting state 'asking' has no deadline"):
        App(sagas=[Bad])


# -- what compiles -----------------------------------------------------------------------------------


class Booking(StepSaga):
    type = "booking"
    start = Start("ocis.booking.requested", key="booking_id", to="ignored")
    steps = [
        Step("reserve", "ocis.booking.reserve", compensation="ocis.booking.release", timeout=1.0),
        Step("notify", "ocis.booking.notify", timeout=1.0),  # nothing to undo
        Step("charge", "ocis.booking.charge", compensation="ocis.booking.refund", timeout=1.0),
        Step("ship", "ocis.booking.ship", timeout=1.0),
    ]


def test_one_definition_and_one_machine_per_type() -> None:
    """definition() compiles once: the same object, with the same machine, every time."""
    first = Postprocessing.definition()
    assert Postprocessing.definition() is first
    assert Postprocessing.definition().machine is first.machine
    assert Booking.definition() is Booking.definition()
    assert Booking.definition().machine is Booking.definition().machine
    assert Booking.definition().machine is not first.machine


def test_a_subclass_gets_its_own_definition() -> None:
    """A saga type derived from another compiles to its own definition, under its own type."""

    class Express(Booking):
        type = "express"

    assert Express.definition() is not Booking.definition()
    assert Express.definition().type == "express"
    assert Booking.definition().type == "booking"
    assert set(Express.definition().states) == set(Booking.definition().states)


def test_state_names_are_strings_and_failed_is_always_there() -> None:
    """States are kept by their names (strings), and every type has the final 'failed' state."""
    for cls in (Postprocessing, Booking):
        d = cls.definition()
        assert all(isinstance(name, str) for name in d.states)
        assert all(d.states[name].name == name for name in d.states)
        assert FAILED in d.states
        assert d.states[FAILED].final
        assert FAILED in d.finals


def test_failed_is_added_to_a_minimal_saga() -> None:
    """A saga that declares only its own final states still gets 'failed'."""

    class Minimal(Saga):
        type = "minimal"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    assert set(Minimal.definition().states) == {"asking", "done", FAILED}
    assert Minimal.definition().finals == {"done", FAILED}


def test_step_style_compiles_to_step_undo_and_final_states() -> None:
    """Steps become '<step>' states, steps with a compensation also 'undo_<step>', plus the finals."""
    d = Booking.definition()
    assert set(d.states) == {
        "reserve",
        "notify",
        "charge",
        "ship",
        "undo_reserve",
        "undo_charge",
        "completed",
        "compensated",
        FAILED,
    }
    assert d.finals == {"completed", "compensated", FAILED}
    assert d.states["reserve"].request_spec is not None
    assert d.states["reserve"].request_spec.type == "ocis.booking.reserve"
    assert d.states["undo_charge"].request_spec is not None
    assert d.states["undo_charge"].request_spec.type == "ocis.booking.refund"
    assert d.starts["ocis.booking.requested"].to == "reserve"  # the start's `to` is the first step


def test_step_style_failures_undo_the_nearest_earlier_compensable_step() -> None:
    """A failing step goes to the undo state of the nearest earlier step that has a compensation."""
    d = Booking.definition()
    fails = {t.sources[0]: t.dest for t in d.transitions if t.trigger.kind == "failure"}
    assert fails == {
        "reserve": "compensated",
        "notify": "undo_reserve",
        "charge": "undo_reserve",
        "ship": "undo_charge",
        "undo_reserve": FAILED,
        "undo_charge": FAILED,
    }
    undone = {
        t.sources[0]: t.dest for t in d.transitions if t.trigger.kind == "reply" and t.sources[0].startswith("undo_")
    }
    assert undone == {"undo_charge": "undo_reserve", "undo_reserve": "compensated"}
    assert d.states["ship"].on_timeout == "undo_charge"
    assert d.states["undo_reserve"].on_timeout == FAILED


def test_last_step_may_declare_a_compensation() -> None:
    """Every step may have a compensation, the last one included (StepSaga: 'an optional compensating
    request' per step)."""

    class Payment(StepSaga):
        type = "payment"
        start = Start("ocis.payment.requested", key="payment_id", to="")
        steps = [
            Step("reserve", "ocis.payment.reserve", compensation="ocis.payment.release", timeout=1.0),
            Step("charge", "ocis.payment.charge", compensation="ocis.payment.refund", timeout=1.0),
        ]

    d = Payment.definition()
    assert {"reserve", "charge", "undo_reserve", "completed", "compensated", FAILED} <= set(d.states)


def test_patterns_cover_starts_correlated_events_and_replies() -> None:
    """A saga type's queue is bound to its start events, correlated events and the replies it awaits."""
    assert Postprocessing.definition().patterns == (
        "ocis.antivirus.scan.reply",
        "ocis.policies.check.reply",
        "ocis.storage.bytes_received",
        "ocis.storage.revert.reply",
        "ocis.storage.upload_ready",
    )


def test_compensate_transition_is_a_trigger_of_its_source() -> None:
    """compensate(...) declares where an operator's compensate takes a saga."""

    class Undoable(Saga):
        type = "undoable"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done"), Final("undone")]
        transitions = [reply(ASK, "asking", "done"), compensate("asking", "undone")]

    assert COMPENSATE in Undoable.definition().triggers_from("asking")
    assert COMPENSATE not in Undoable.definition().triggers_from("done")


def test_two_saga_classes_with_one_type_are_refused() -> None:
    """Two saga classes may not share a type name: the engine refuses them, naming the type."""
    from sagas import MemoryStore, SagaEngine

    class Copy(Saga):
        type = "booking"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", Request(ASK), timeout=1.0), Final("done")]
        transitions = [reply(ASK, "asking", "done")]

    with pytest.raises(ConfigurationError, match="two saga classes share the type 'booking'"):
        SagaEngine([Booking, Copy], MemoryStore())
