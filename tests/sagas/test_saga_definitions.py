"""Saga definitions: wrong ones fail at start-up with what to fix; right ones compile once per type."""

from __future__ import annotations

from typing import Any

import pytest

from examples.postprocessing import Postprocessing
from sagas import (
    FAILED,
    App,
    ConfigurationError,
    Final,
    Go,
    Request,
    Saga,
    SagaContext,
    Start,
    State,
    Step,
    StepSaga,
    set_data,
)
from sagas._protocol import COMPENSATE, TIMEOUT, Kind
from sagas._protocol import on_failure as on_failure_trigger

ASK = "ocis.test.ask"
OTHER = "ocis.test.other"
BEGIN = "ocis.test.begin"
NUDGE = "ocis.test.nudge"


def _compile(cls: type[Saga]) -> None:
    cls.definition()


def _saga(*states: Any, start: Start | None = None, **attrs: Any) -> type[Saga]:
    """A saga type ``probe`` that starts in 'asking' with the given states (and class attributes)."""
    body = {"type": "probe", "start": start or Start(BEGIN, key="id", to="asking"), "states": list(states), **attrs}
    return type("Probe", (Saga,), body)


ASKING = State("asking", sends=Request(ASK), timeout=1.0, on_reply="done")
DONE = Final("done")


def _yes(ctx: SagaContext) -> bool:
    return True


# -- errors ------------------------------------------------------------------------------------------


def test_type_name_must_be_lowercase() -> None:
    """The saga type is a lowercase name; the error shows an example."""

    class Shouty(Saga):
        type = "Shouty"
        start = Start(BEGIN, key="id", to="done")
        states = [Final("done")]

    with pytest.raises(ConfigurationError, match=r"needs a lowercase `type` name, e\.g\. type = 'postprocessing'"):
        _compile(Shouty)


def test_start_must_be_a_start() -> None:
    """A saga without `start = Start(...)` is refused, showing how to write one."""
    with pytest.raises(ConfigurationError, match=r"needs `start = Start\(event, key=\.\.\., to=\.\.\.\)`"):
        _compile(_saga(ASKING, DONE, start="ocis.test.begin"))  # type: ignore[arg-type]


def test_a_transitions_list_is_refused() -> None:
    """A class that still lists `transitions` is told to declare outcomes in the states instead."""
    with pytest.raises(ConfigurationError, match=r"has a `transitions` list: declare what each state leads to"):
        _compile(_saga(ASKING, DONE, transitions=[]))


def test_states_hold_only_states() -> None:
    """Anything but State(...) and Final(...) in `states` is refused."""
    with pytest.raises(ConfigurationError, match=r"`states` holds 'done'; list State\(\.\.\.\) and Final"):
        _compile(_saga(ASKING, "done"))


def test_a_state_declared_twice_is_refused() -> None:
    """Two states with one name are refused, naming it."""
    with pytest.raises(ConfigurationError, match=r"declares state 'asking' twice: give each state its own name"):
        _compile(_saga(ASKING, ASKING, DONE))


def test_no_final_state_is_refused() -> None:
    """A saga that can never end (no final state besides 'failed') is refused."""
    endless = State("asking", sends=Request(ASK), timeout=1.0, on_reply="asking")
    with pytest.raises(ConfigurationError, match=r"no final state besides 'failed'.*Final\(\.\.\.\)"):
        _compile(_saga(endless))


def test_final_state_cannot_send_a_request() -> None:
    """A final state that sends a request is refused."""
    loud = State("done", sends=Request(OTHER), final=True)
    with pytest.raises(ConfigurationError, match=r"final state 'done' cannot send a request"):
        _compile(_saga(ASKING, loud))


def test_final_state_with_outcomes_is_refused() -> None:
    """A final state that says where something leads is refused: nothing leads out of a final state."""
    busy = State("done", on_timeout="asking", final=True)
    with pytest.raises(
        ConfigurationError, match=r"state 'done' is final, so nothing leads out of it: remove on_timeout"
    ):
        _compile(_saga(ASKING, busy))


def test_waiting_state_without_timeout_is_refused() -> None:
    """Every non-final state needs a deadline; the error says to give it timeout=."""
    patient = State("asking", sends=Request(ASK), on_reply="done")
    with pytest.raises(ConfigurationError, match=r"waiting state 'asking' has no deadline; give it timeout="):
        _compile(_saga(patient, DONE))


@pytest.mark.parametrize("outcome", ["on_reply", "on_failure"])
def test_reply_outcome_on_a_state_that_sends_nothing_is_refused(outcome: str) -> None:
    """on_reply and on_failure belong to a state that sends a request."""
    options: dict[str, Any] = {outcome: "done"}
    mute = State("asking", timeout=1.0, on={NUDGE: "done"}, **options)
    with pytest.raises(
        ConfigurationError, match=rf"state 'asking' sends no request, so it gets no reply: .*remove {outcome}"
    ):
        _compile(_saga(mute, DONE, correlate={NUDGE: "id"}))


def test_request_without_on_reply_is_refused() -> None:
    """A state that sends a request must say where its reply leads."""
    deaf = State("asking", sends=Request(ASK), timeout=1.0, on_failure="done")
    with pytest.raises(ConfigurationError, match=rf"sends {ASK} but says nothing about its reply: add on_reply="):
        _compile(_saga(deaf, DONE))


@pytest.mark.parametrize(
    ("outcome", "value", "named"),
    [
        ("on_reply", "nowhere", "on_reply"),
        ("on_failure", Go("nowhere"), "on_failure"),
        ("on", {NUDGE: [Go("done", when=_yes), "nowhere"]}, f"on\\['{NUDGE}'\\]"),
        ("on_compensate", "nowhere", "on_compensate"),
    ],
)
def test_outcome_to_an_unknown_state_is_refused(outcome: str, value: Any, named: str) -> None:
    """Every outcome must lead to a declared state; the error names the outcome and the state."""
    attrs: dict[str, Any] = {"on_reply": "done", outcome: value}
    lost = State("asking", sends=Request(ASK), timeout=1.0, **attrs)
    with pytest.raises(ConfigurationError, match=rf"state 'asking': {named} leads to unknown state 'nowhere'"):
        _compile(_saga(lost, DONE, correlate={NUDGE: "id"}))


def test_timeout_to_an_unknown_state_is_refused() -> None:
    """A state's on_timeout must name a declared state."""
    lost = State("asking", sends=Request(ASK), timeout=1.0, on_reply="done", on_timeout="nowhere")
    with pytest.raises(ConfigurationError, match=r"state 'asking' times out to unknown state 'nowhere'"):
        _compile(_saga(lost, DONE))


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"on_reply": Go}, r"on_reply takes a state name or Go\(\.\.\.\)"),
        ({"on_reply": "done", "on_timeout": ["done"]}, r"on_timeout takes a state name or Go\(\.\.\.\)"),
        ({"on_reply": "done", "on": ["done"]}, r"`on` maps event types to outcomes"),
    ],
)
def test_outcome_of_the_wrong_kind_is_refused(attrs: dict[str, Any], message: str) -> None:
    """An outcome that is not a state name, a Go or (where allowed) a list of them is refused."""
    odd = State("asking", sends=Request(ASK), timeout=1.0, **attrs)
    with pytest.raises(ConfigurationError, match=message):
        _compile(_saga(odd, DONE))


def test_empty_outcome_list_is_refused() -> None:
    """An empty list of outcomes leads nowhere and is refused."""
    empty = State("asking", sends=Request(ASK), timeout=1.0, on_reply=[])
    with pytest.raises(ConfigurationError, match=r"on_reply is an empty list; name where it leads"):
        _compile(_saga(empty, DONE))


def test_unguarded_go_before_others_is_refused() -> None:
    """An outcome without `when` must come last: the ones after it could never be taken."""
    shadowing = State("asking", sends=Request(ASK), timeout=1.0, on_reply=[Go("done"), Go("asking", when=_yes)])
    with pytest.raises(
        ConfigurationError,
        match=r"in on_reply, Go\('done'\) has no when=, so the outcomes after it could never be taken: put it last",
    ):
        _compile(_saga(shadowing, DONE))


@pytest.mark.parametrize("outcome", ["on_timeout", "on_compensate"])
def test_guard_on_an_outcome_that_is_always_taken_is_refused(outcome: str) -> None:
    """A deadline or an operator's compensate always moves the saga: its Go cannot have a guard."""
    options: dict[str, Any] = {outcome: Go("done", when=_yes)}
    guarded = State("asking", sends=Request(ASK), timeout=1.0, on_reply="done", **options)
    with pytest.raises(ConfigurationError, match=rf"{outcome} is always taken, so it cannot have a guard"):
        _compile(_saga(guarded, DONE))


def test_event_not_in_correlate_is_refused() -> None:
    """Reacting to an event without saying which payload field holds the saga key is refused."""
    waiting = State("asking", timeout=1.0, on={NUDGE: "done"})
    with pytest.raises(
        ConfigurationError,
        match=rf"reacts to {NUDGE} but does not say how to find the saga: add it to `correlate`",
    ):
        _compile(_saga(waiting, DONE))


def test_state_with_no_way_out_but_its_timeout_is_refused() -> None:
    """A waiting state that sends nothing and awaits no event is refused (only its deadline would move it)."""
    idle = State("asking", timeout=1.0, on_timeout="done")
    with pytest.raises(ConfigurationError, match=r"state 'asking' has no way out but its timeout: give it sends="):
        _compile(_saga(idle, DONE))


def test_start_without_a_first_state_is_refused() -> None:
    """A state-machine saga's Start needs to=<the first state>."""
    with pytest.raises(ConfigurationError, match=rf"Start\('{BEGIN}'\) needs to=<the first state>"):
        _compile(_saga(ASKING, DONE, start=Start(BEGIN, key="id")))


def test_start_to_an_unknown_state_is_refused() -> None:
    """A start event must lead to a declared state."""
    with pytest.raises(ConfigurationError, match=rf"start event {BEGIN} leads to unknown state 'nowhere'"):
        _compile(_saga(ASKING, DONE, start=Start(BEGIN, key="id", to="nowhere")))


def test_unreachable_state_is_refused() -> None:
    """A state no start, outcome or timeout leads to is named in the error."""
    lonely = State("lonely", sends=Request(OTHER), timeout=1.0, on_reply="done")
    with pytest.raises(ConfigurationError, match=r"state\(s\) lonely can never be reached"):
        _compile(_saga(ASKING, lonely, DONE))


def test_step_saga_without_steps_is_refused() -> None:
    """A step saga needs at least one step."""

    class Empty(StepSaga):
        type = "empty"
        start = Start(BEGIN, key="id")
        steps = []

    with pytest.raises(ConfigurationError, match=r"step saga Empty has no steps"):
        _compile(Empty)


def test_step_saga_with_two_steps_of_one_name_is_refused() -> None:
    """Step names are state names: two steps may not share one."""

    class Twice(StepSaga):
        type = "twice"
        start = Start(BEGIN, key="id")
        steps = [Step("reserve", ASK), Step("reserve", OTHER)]

    with pytest.raises(ConfigurationError, match=r"two steps with one name"):
        _compile(Twice)


def test_step_saga_start_with_a_first_state_is_refused() -> None:
    """A step saga starts at its first step: a Start with to= is refused, not silently ignored."""

    class Elsewhere(StepSaga):
        type = "elsewhere"
        start = Start(BEGIN, key="id", to="reserve")
        steps = [Step("reserve", ASK)]

    with pytest.raises(ConfigurationError, match=r"a step saga starts at its first step; write Start\("):
        _compile(Elsewhere)


def test_app_refuses_a_bad_saga_at_construction() -> None:
    """App(sagas=[Bad]) raises ConfigurationError when it is built, not when the first message comes."""

    class Bad(Saga):
        type = "bad"
        start = Start(BEGIN, key="id", to="asking")
        states = [State("asking", sends=Request(ASK), on_reply="done"), Final("done")]

    with pytest.raises(ConfigurationError, match=r"saga Bad: waiting state 'asking' has no deadline"):
        App(sagas=[Bad])


# -- what compiles -----------------------------------------------------------------------------------


class Booking(StepSaga):
    type = "booking"
    start = Start("ocis.booking.requested", key="booking_id")
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
        states = [ASKING, DONE]

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
    assert d.starts["ocis.booking.requested"].to == "reserve"  # a step saga starts at its first step


def test_step_style_failures_undo_the_nearest_earlier_compensable_step() -> None:
    """A failing step goes to the undo state of the nearest earlier step that has a compensation."""
    d = Booking.definition()
    fails = {t.source: t.dest for t in d.transitions if t.trigger.kind is Kind.FAILURE}
    assert fails == {
        "reserve": "compensated",
        "notify": "undo_reserve",
        "charge": "undo_reserve",
        "ship": "undo_charge",
        "undo_reserve": FAILED,
        "undo_charge": FAILED,
    }
    undone = {t.source: t.dest for t in d.transitions if t.trigger.kind is Kind.REPLY and t.source.startswith("undo_")}
    assert undone == {"undo_charge": "undo_reserve", "undo_reserve": "compensated"}
    timeouts = {t.source: t.dest for t in d.transitions if t.trigger == TIMEOUT}
    assert timeouts["ship"] == "undo_charge"
    assert timeouts["undo_reserve"] == FAILED


def test_last_step_may_declare_a_compensation() -> None:
    """Every step may have a compensation, the last one included (StepSaga: 'an optional compensating
    request' per step)."""

    class Payment(StepSaga):
        type = "payment"
        start = Start("ocis.payment.requested", key="payment_id")
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


def test_on_compensate_is_a_trigger_of_its_state() -> None:
    """A state's on_compensate declares where an operator's compensate takes a saga from it."""

    class Undoable(Saga):
        type = "undoable"
        start = Start(BEGIN, key="id", to="asking")
        states = [
            State("asking", sends=Request(ASK), timeout=1.0, on_reply="done", on_compensate="undone"),
            Final("done"),
            Final("undone"),
        ]

    assert COMPENSATE in Undoable.definition().triggers_from("asking")
    assert COMPENSATE not in Undoable.definition().triggers_from("done")


def test_two_saga_classes_with_one_type_are_refused() -> None:
    """Two saga classes may not share a type name: the engine refuses them, naming the type."""
    from sagas import MemoryStore, SagaEngine

    class Copy(Saga):
        type = "booking"
        start = Start(BEGIN, key="id", to="asking")
        states = [ASKING, DONE]

    with pytest.raises(ConfigurationError, match="two saga classes share the type 'booking'"):
        SagaEngine([Booking, Copy], MemoryStore())


def _big(ctx: SagaContext) -> bool:
    size: int = ctx.result.get("size", 0)
    return size > 10


def _small(ctx: SagaContext) -> bool:
    size: int = ctx.result.get("size", 0)
    return size > 0


def test_outcomes_compile_in_the_order_written() -> None:
    """A list of outcomes compiles to transitions in the order written, so the first passing guard wins."""

    class Sorting(Saga):
        type = "sorting"
        start = Start(BEGIN, key="id", to="asking")
        states = [
            State(
                "asking",
                sends=Request(ASK),
                timeout=1.0,
                on_reply=[Go("big", when=_big), Go("small", when=_small), "none"],
            ),
            Final("big"),
            Final("small"),
            Final("none"),
        ]

    replies = [(t.dest, t.guard) for t in Sorting.definition().transitions if t.trigger.kind is Kind.REPLY]
    assert replies == [("big", _big), ("small", _small), ("none", None)]


def test_the_postprocessing_saga_names_each_request_once() -> None:
    """Each request is declared once, by the state that sends it; its outcomes compile from that state."""
    d = Postprocessing.definition()
    senders = {st.request_spec.type: name for name, st in d.states.items() if st.request_spec is not None}
    assert senders == {
        "ocis.antivirus.scan": "scanning",
        "ocis.policies.check": "checking",
        "ocis.storage.revert": "reverting",
    }
    for t in d.transitions:
        if t.trigger.kind in (Kind.REPLY, Kind.FAILURE):
            assert senders[t.trigger.subject] == t.source


def test_compiling_does_not_change_the_class() -> None:
    """Compiling a saga (either style) reads its class and writes nothing to it."""

    class Fresh(StepSaga):
        type = "fresh"
        start = Start(BEGIN, key="id")
        steps = [Step("reserve", ASK, compensation=OTHER), Step("notify", NUDGE)]

    class FreshMachine(Saga):
        type = "fresh_machine"
        start = Start(BEGIN, key="id", to="asking")
        states = [ASKING, DONE]

    for cls in (Fresh, FreshMachine):
        before = dict(vars(cls))
        cls.definition()
        assert dict(vars(cls)) == before
    assert Fresh.start == Start(BEGIN, key="id")


def test_request_fields_pick_the_payload_from_the_data() -> None:
    """Request(fields=...) sends those fields of the data, null where one is missing."""
    ctx = SagaContext("s1", "probe", "asking", {"id": "a", "size": 3, "secret": "x"}, None)
    assert Request(ASK, fields=("id", "size", "name")).build(ctx) == {"id": "a", "size": 3, "name": None}
    assert Request(ASK).build(ctx) == ctx.data
    assert Request(ASK, lambda c: {"only": c.data["id"]}).build(ctx) == {"only": "a"}


def test_request_takes_payload_or_fields_not_both() -> None:
    """A Request with both payload= and fields= (or fields= as one string) is refused with what to write."""
    with pytest.raises(ConfigurationError, match="takes payload= or fields=, not both"):
        Request(ASK, lambda c: {}, fields=("id",))
    with pytest.raises(ConfigurationError, match="fields= is a tuple of names"):
        Request(ASK, fields="id")  # type: ignore[arg-type]


def test_set_data_sets_fields_and_start_keep_copies_them() -> None:
    """set_data(...) is an action that sets data fields; Start(keep=...) refuses one string."""
    ctx = SagaContext("s1", "probe", "asking", {"outcome": "continue"}, None)
    set_data(outcome="abort", why="policy")(ctx)
    assert ctx.data == {"outcome": "abort", "why": "policy"}
    with pytest.raises(ConfigurationError, match="keep= is a tuple of names"):
        Start(BEGIN, key="id", to="asking", keep="id")  # type: ignore[arg-type]


def test_a_request_without_on_failure_fails_where_its_deadline_gives_up() -> None:
    """A state that sends a request and declares no on_failure compiles a failure transition to its
    on_timeout (default 'failed'), with on_timeout's action: a failure reply always leads somewhere."""

    def note(ctx: SagaContext) -> None:
        ctx.data["gave_up"] = True

    class Quiet(Saga):
        type = "quiet"
        start = Start("ocis.quiet.started", key="id", to="asking")
        states = [
            State("asking", sends="ocis.quiet.ask", timeout=1.0, on_reply="telling"),
            State("telling", sends="ocis.quiet.tell", timeout=1.0, on_reply="done", on_timeout=Go("done", do=note)),
            Final("done"),
        ]

    d = Quiet.definition()
    (asked,) = [t for t in d.transitions if t.trigger == on_failure_trigger("ocis.quiet.ask")]
    assert (asked.source, asked.dest, asked.action) == ("asking", FAILED, None)
    (told,) = [t for t in d.transitions if t.trigger == on_failure_trigger("ocis.quiet.tell")]
    assert (told.source, told.dest, told.action) == ("telling", "done", note)


def test_a_state_named_failed_is_refused() -> None:
    """`failed` is the state every saga type parks in; a state of that name (which replaced it, and sent a
    failing saga forward again) is refused with the clash named."""
    with pytest.raises(ConfigurationError, match="declares a state named 'failed', the state every saga type parks in"):
        _compile(_saga(ASKING, DONE, State("failed", sends=Request(OTHER), timeout=1.0, on_reply="done")))
    with pytest.raises(ConfigurationError, match="declares a state named 'failed'"):
        _compile(_saga(ASKING, DONE, Final("failed")))


@pytest.mark.parametrize("name", ["completed", "compensated", "failed", "undo_hotel"])
def test_a_step_named_like_a_state_the_step_style_adds_is_refused(name: str) -> None:
    """Steps named `completed`, `compensated`, `failed` or `undo_<...>` are refused with the clash named."""
    body = {
        "type": "probe",
        "start": Start(BEGIN, key="id"),
        "steps": [Step("hotel", ASK, compensation=OTHER), Step(name, NUDGE)],
    }
    saga = type("Probe", (StepSaga,), body)
    with pytest.raises(ConfigurationError, match=rf"a step is named '{name}', a name the step style uses itself"):
        _compile(saga)
