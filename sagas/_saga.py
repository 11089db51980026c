"""Saga definitions: the state-machine style (:class:`Saga`) and the step style (:class:`StepSaga`).

Both compile, once per saga type, to a :class:`SagaDefinition`: named states, the events that start
and reach a saga, transitions with guards and actions, and one ``transitions.Machine``. The runtime
(:mod:`sagas._saga_engine`) triggers that machine per message on a throw-away model, so no machine is
ever built per saga instance, and user code never touches the methods ``transitions`` adds.

Every non-final state has a deadline. A state may send a *request* when it is entered; its deadline
then re-sends that request, with the same request id, until its retries run out, and then takes the
state's ``on_timeout`` transition.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transitions import Machine

from transport import Event, validate_event_name

from ._errors import ConfigurationError
from ._protocol import COMPENSATE, TIMEOUT, Kind, Trigger, on_event, on_failure, on_reply, reply_type

#: Final state every saga type has: parked after something kept failing. An operator can act on it.
FAILED = "failed"


class SagaContext:
    """What guards, actions and request builders see: the saga's data (mutable), the event that
    triggered the transition, a reply's result, and ways to publish events."""

    __slots__ = ("data", "event", "outbox", "reason", "result", "saga_id", "saga_type", "state")

    def __init__(
        self,
        saga_id: str,
        saga_type: str,
        state: str,
        data: dict[str, Any],
        event: Event | None,
        result: Mapping[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.saga_type = saga_type
        self.state = state
        self.data = data
        self.event = event
        self.result: Mapping[str, Any] = result or {}
        self.reason = reason
        self.outbox: list[tuple[str, Mapping[str, Any]]] = []

    def publish(self, type: str, payload: Mapping[str, Any] | None = None) -> None:
        """Publish an event when the transition commits (through the outbox)."""
        validate_event_name(type)
        self.outbox.append((type, dict(payload or {})))


Guard = Callable[[SagaContext], bool]
Action = Callable[[SagaContext], None]
PayloadBuilder = Callable[[SagaContext], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Request:
    """A request a state sends when it is entered. ``payload`` builds its payload from the context;
    by default the payload is the saga's data."""

    type: str
    payload: PayloadBuilder | None = None

    def __post_init__(self) -> None:
        validate_event_name(self.type)


@dataclass(frozen=True, slots=True)
class State:
    """A state. Non-final states need a ``timeout`` (seconds): the deadline that keeps a saga from ever
    being stuck. With a ``request``, the deadline re-sends it up to ``retries`` times, waiting
    ``timeout * backoff**n`` (with jitter), before ``on_timeout`` is taken (default: ``failed``)."""

    name: str
    request: Request | str | None = None
    timeout: float | None = None
    retries: int = 3
    backoff: float = 2.0
    on_timeout: str | None = None
    final: bool = False

    @property
    def request_spec(self) -> Request | None:
        return Request(self.request) if isinstance(self.request, str) else self.request

    def deadline_after(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds until the deadline after send number ``attempt`` (1-based), with +-10 % jitter."""
        base = (self.timeout or 0.0) * self.backoff ** (attempt - 1)
        return base * (0.9 + 0.2 * (rng or random).random())


def Final(name: str) -> State:
    """A final state: the saga ends here."""
    return State(name, final=True)


@dataclass(frozen=True, slots=True)
class On:
    """A transition on ``trigger`` from ``source`` (a name, a list, or ``"*"``) to ``dest``.

    Triggers: ``"reply:<request type>"``, ``"failure:<request type>"``, ``"event:<event type>"``,
    ``"timeout"`` and ``"compensate"``; build them with :func:`reply`, :func:`failure`, :func:`event`,
    :func:`timeout` and :func:`compensate`. The first transition whose ``guard`` passes is taken.
    """

    trigger: Trigger
    source: str | tuple[str, ...]
    dest: str
    guard: Guard | None = None
    action: Action | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)


def _src(source: str | Iterable[str]) -> str | tuple[str, ...]:
    return source if isinstance(source, str) else tuple(source)


def reply(
    request_type: str,
    source: str | Iterable[str],
    dest: str,
    *,
    guard: Guard | None = None,
    action: Action | None = None,
) -> On:
    """Move on a successful reply to ``request_type``; ``ctx.result`` holds the reply."""
    return On(on_reply(validate_event_name(request_type)), _src(source), dest, guard, action)


def failure(
    request_type: str,
    source: str | Iterable[str],
    dest: str,
    *,
    guard: Guard | None = None,
    action: Action | None = None,
) -> On:
    """Move on a failure reply to ``request_type``; ``ctx.reason`` says why."""
    return On(on_failure(validate_event_name(request_type)), _src(source), dest, guard, action)


def event(
    event_type: str, source: str | Iterable[str], dest: str, *, guard: Guard | None = None, action: Action | None = None
) -> On:
    """Move when a correlated event of ``event_type`` arrives (see ``Saga.correlate``)."""
    return On(on_event(validate_event_name(event_type)), _src(source), dest, guard, action)


def timeout(source: str | Iterable[str], dest: str, *, action: Action | None = None) -> On:
    """Move when the state's deadline has passed and its retries are spent."""
    return On(TIMEOUT, _src(source), dest, None, action)


def compensate(source: str | Iterable[str], dest: str, *, action: Action | None = None) -> On:
    """Where an operator's ``sagas compensate ID`` takes a saga in ``source``."""
    return On(COMPENSATE, _src(source), dest, None, action)


@dataclass(frozen=True, slots=True)
class Start:
    """An event that starts a saga. ``key`` names the payload field that identifies the saga, so a
    duplicate start event never starts a second one. ``action`` can fill in the data."""

    event: str
    key: str
    to: str = ""
    action: Action | None = None

    def __post_init__(self) -> None:
        validate_event_name(self.event)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a :class:`StepSaga`: a request, and the request that undoes it if a later step fails."""

    name: str
    request: str
    compensation: str | None = None
    payload: PayloadBuilder | None = None
    compensation_payload: PayloadBuilder | None = None
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 2.0


@dataclass(slots=True)
class SagaDefinition:
    """A compiled saga type. Built once per type."""

    type: str
    states: dict[str, State]
    transitions: list[On]
    starts: dict[str, Start]
    correlate: dict[str, str]
    machine: Any = field(repr=False)
    requests: dict[str, str] = field(default_factory=dict)  # request type -> reply type

    @property
    def finals(self) -> set[str]:
        return {n for n, s in self.states.items() if s.final}

    @property
    def patterns(self) -> tuple[str, ...]:
        """The event types the saga type's queue is bound to."""
        return tuple(sorted({*self.starts, *self.correlate, *self.requests.values()}))

    def triggers_from(self, state: str) -> set[Trigger]:
        return {t.trigger for t in self.transitions if state in t.sources or "*" in t.sources}


class Saga:
    """Base class of a saga type in the state-machine style.

    Class attributes: ``type`` (a lowercase name), ``start`` (a :class:`Start` or a list), ``states``
    (:class:`State` and :func:`Final` entries), ``transitions`` (:class:`On` entries, built with
    :func:`reply`, :func:`failure`, :func:`event`, :func:`timeout`, :func:`compensate`) and
    ``correlate``: for other events the saga reacts to, the payload field holding the saga key.
    A ``failed`` final state is always added.
    """

    type: ClassVar[str]
    start: ClassVar[Start | list[Start]]
    states: ClassVar[list[State]]
    transitions: ClassVar[list[On]] = []
    correlate: ClassVar[dict[str, str]] = {}
    _definition: ClassVar[SagaDefinition | None] = None

    @classmethod
    def definition(cls) -> SagaDefinition:
        """The compiled definition (compiled and validated on first use)."""
        if cls.__dict__.get("_definition") is None:
            cls._definition = compile_saga(cls)
        definition = cls.__dict__["_definition"]
        assert isinstance(definition, SagaDefinition)
        return definition


class StepSaga(Saga):
    """A saga of ordered steps, each a request with an optional compensating request.

    Class attributes: ``type``, ``start`` (a :class:`Start` whose ``to`` is ignored) and ``steps``.
    It compiles to states ``<step>`` and ``undo_<step>`` plus finals ``completed``, ``compensated`` and
    ``failed``. A step's reply result is kept in ``data[<step name>]``. When a step fails or times out,
    the compensations of the steps that completed run in reverse order, each with its own deadline and
    retries; a compensation that still fails parks the saga in ``failed``.
    """

    steps: ClassVar[list[Step]]

    @classmethod
    def definition(cls) -> SagaDefinition:
        if cls.__dict__.get("_definition") is None:
            cls.states, cls.transitions = _compile_steps(cls)
            return super().definition()
        return super().definition()


def _keep_result(step: str) -> Action:
    def keep(ctx: SagaContext) -> None:
        ctx.data[step] = dict(ctx.result)
        ctx.data.setdefault("completed", []).append(step)

    return keep


def _compile_steps(cls: type[StepSaga]) -> tuple[list[State], list[On]]:
    steps = list(getattr(cls, "steps", []))
    if not steps:
        raise ConfigurationError(f"step saga {cls.__name__} has no steps")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"step saga {cls.__name__} has two steps with one name")
    states: list[State] = []
    transitions: list[On] = []
    for i, step in enumerate(steps):
        states.append(
            State(
                step.name,
                Request(step.request, step.payload),
                step.timeout,
                step.retries,
                step.backoff,
                on_timeout=_undo_target(steps, i),
            )
        )
        nxt = steps[i + 1].name if i + 1 < len(steps) else "completed"
        transitions.append(reply(step.request, step.name, nxt, action=_keep_result(step.name)))
        transitions.append(failure(step.request, step.name, _undo_target(steps, i)))
        transitions.append(compensate(step.name, _undo_target(steps, i)))
        if step.compensation and i + 1 < len(steps):
            # (the last step's compensation never runs: when it completes, the saga has completed)
            undo = f"undo_{step.name}"
            states.append(
                State(
                    undo,
                    Request(step.compensation, step.compensation_payload),
                    step.timeout,
                    step.retries,
                    step.backoff,
                    on_timeout=FAILED,
                )
            )
            transitions.append(reply(step.compensation, undo, _undo_target(steps, i)))
            transitions.append(failure(step.compensation, undo, FAILED))
    states += [Final("completed"), Final("compensated")]
    start = cls.start if isinstance(cls.start, Start) else cls.start[0]
    cls.start = Start(start.event, start.key, steps[0].name, start.action)
    return states, transitions


def _undo_target(steps: list[Step], failed_index: int) -> str:
    """Where a failure at step ``failed_index`` goes: undo the nearest earlier step that has one."""
    for j in range(failed_index - 1, -1, -1):
        if steps[j].compensation:
            return f"undo_{steps[j].name}"
    return "compensated"


def compile_saga(cls: type[Saga]) -> SagaDefinition:
    """Validate a saga class and build its definition and its one ``transitions`` machine."""
    name = getattr(cls, "type", None)
    where = f"saga {cls.__name__}"
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or not name.islower():
        raise ConfigurationError(f"{where} needs a lowercase `type` name, e.g. type = 'postprocessing'")
    declared = getattr(cls, "start", None)
    starts_list: list[Any] = list(declared) if isinstance(declared, list) else [declared]
    if not starts_list or any(not isinstance(s, Start) for s in starts_list):
        raise ConfigurationError(f"{where} needs `start = Start(event, key=..., to=...)`")
    starts: dict[str, Start] = {s.event: s for s in starts_list if isinstance(s, Start)}
    states: dict[str, State] = {}
    for st in list(getattr(cls, "states", [])):
        if st.name in states:
            raise ConfigurationError(f"{where} declares state {st.name!r} twice")
        states[st.name] = st
    states.setdefault(FAILED, Final(FAILED))
    if not any(s.final for n, s in states.items() if n != FAILED) and len(states) > 1:
        raise ConfigurationError(f"{where} has no final state besides 'failed': declare one with Final(...)")
    transitions = list(getattr(cls, "transitions", []))
    requests: dict[str, str] = {}
    for st in states.values():
        spec = st.request_spec
        if spec is not None:
            requests[spec.type] = reply_type(spec.type)
        if not st.final and not st.timeout:
            raise ConfigurationError(
                f"{where}: waiting state {st.name!r} has no deadline; give it timeout=<seconds> so that a "
                "lost message can never leave a saga stuck"
            )
        if st.final and st.request is not None:
            raise ConfigurationError(f"{where}: final state {st.name!r} cannot send a request")
        if st.on_timeout is not None and st.on_timeout not in states:
            raise ConfigurationError(f"{where}: state {st.name!r} times out to unknown state {st.on_timeout!r}")
    for s in starts.values():
        if not s.to:
            raise ConfigurationError(f"{where}: Start({s.event!r}) needs to=<the first state>")
        if s.to not in states:
            raise ConfigurationError(f"{where}: start event {s.event} leads to unknown state {s.to!r}")
    for t in transitions:
        for src in t.sources:
            if src != "*" and src not in states:
                raise ConfigurationError(f"{where}: transition on {t.trigger} from unknown state {src!r}")
        if t.dest not in states:
            raise ConfigurationError(f"{where}: transition on {t.trigger} to unknown state {t.dest!r}")
        kind, what = t.trigger.kind, t.trigger.subject
        if kind in (Kind.REPLY, Kind.FAILURE):
            senders = [n for n, st in states.items() if st.request_spec and st.request_spec.type == what]
            if not senders:
                raise ConfigurationError(f"{where} handles a {kind} to {what}, but no state sends that request")
            for src in t.sources:
                if src != "*" and src not in senders:
                    raise ConfigurationError(f"{where}: state {src!r} handles a {kind} to {what} it never sends")
        elif kind is Kind.EVENT and what not in cls.correlate and what not in starts:
            raise ConfigurationError(
                f"{where} reacts to {what} but does not say how to find the saga: add it to `correlate`"
            )
    # Reachability from the start states.
    reachable = set()
    todo = [s.to for s in starts.values()]
    while todo:
        st_name = todo.pop()
        if st_name in reachable:
            continue
        reachable.add(st_name)
        st = states[st_name]
        todo += [t.dest for t in transitions if st_name in t.sources or "*" in t.sources]
        if not st.final:
            todo.append(st.on_timeout or FAILED)
    unreachable = sorted(set(states) - reachable - {FAILED})
    if unreachable:
        raise ConfigurationError(f"{where}: state(s) {', '.join(unreachable)} can never be reached")
    for st_name in reachable:
        st = states[st_name]
        if (
            not st.final
            and not any(st_name in t.sources or "*" in t.sources for t in transitions)
            and st.request is None
        ):
            raise ConfigurationError(f"{where}: state {st_name!r} has no way out but its timeout")
    machine = Machine(
        model=None,
        states=list(states),
        initial=None,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=True,
    )
    for t in transitions:
        machine.add_transition(
            t.trigger.name,
            list(states) if "*" in t.sources else list(t.sources),
            t.dest,
            conditions=[_call_guard(t.guard)] if t.guard else None,
            after=[_call_action(t.action)] if t.action else None,
        )
    for st in states.values():
        if not st.final:
            machine.add_transition(TIMEOUT.name, st.name, st.on_timeout or FAILED)
    return SagaDefinition(
        type=name,
        states=states,
        transitions=transitions,
        starts=starts,
        correlate=dict(cls.correlate),
        machine=machine,
        requests=requests,
    )


def _call_guard(guard: Guard) -> Callable[[Any], bool]:
    return lambda ed: bool(guard(ed.kwargs["ctx"]))


def _call_action(action: Action) -> Callable[[Any], None]:
    return lambda ed: action(ed.kwargs["ctx"])
