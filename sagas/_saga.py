"""Saga definitions: the state-machine style (:class:`Saga`) and the step style (:class:`StepSaga`).

A state says everything that can happen while a saga is in it: the request it sends when it is
entered, where the reply, a failure reply and its deadline lead (``on_reply``, ``on_failure``,
``on_timeout``), where correlated events lead (``on``), and where an operator's compensate leads
(``on_compensate``). Each outcome is a :class:`Go`, a state name, or for replies, failures and events
a list of :class:`Go` tried in the order written.

Both styles compile, once per saga type, to a :class:`SagaDefinition`: named states, the events that
start and reach a saga, a flat list of transitions, and one ``transitions.Machine``. The runtime
(:mod:`sagas._saga_engine`) triggers that machine per message on a throw-away model, so no machine is
ever built per saga instance, and user code never touches the methods ``transitions`` adds. Compiling
never changes the saga class: definitions are kept here, by class.
"""

from __future__ import annotations

import copy
import random
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from transitions import Machine

from transport import Event, validate_event_name

from ._errors import ConfigurationError
from ._protocol import COMPENSATE, TIMEOUT, Trigger, on_event, on_failure, on_reply, reply_type

#: Final state every saga type has: parked after something kept failing. An operator can act on it.
FAILED = "failed"
#: The final states the step style adds besides ``failed``; no step may be named like them.
_STEP_FINALS = ("completed", "compensated", FAILED)
#: Where a step saga keeps its steps' results in the saga's metadata.
STEPS_META = "steps"
#: Where a step saga keeps what its compensations undid and did not undo, in the saga's metadata.
COMPENSATION_META = "compensation"


class SagaContext:
    """What guards, actions and request builders see: the saga's data (mutable), the event that
    triggered the transition, a reply's result, a failure's reason, the results of a step saga's
    completed steps (read-only), and a way to publish events."""

    __slots__ = (
        "_compensation",
        "_note",
        "_steps",
        "data",
        "event",
        "outbox",
        "reason",
        "result",
        "saga_id",
        "saga_type",
        "state",
    )

    def __init__(
        self,
        saga_id: str,
        saga_type: str,
        state: str,
        data: dict[str, Any],
        event: Event | None,
        result: Mapping[str, Any] | None = None,
        reason: str | None = None,
        *,
        steps: Mapping[str, Mapping[str, Any]] | None = None,
        compensation: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.saga_type = saga_type
        self.state = state
        self.data = data
        self.event = event
        self.result: Mapping[str, Any] = result or {}
        self.reason = reason
        self.outbox: list[tuple[str, Mapping[str, Any]]] = []
        self._steps: dict[str, Mapping[str, Any]] = {k: MappingProxyType(dict(v)) for k, v in (steps or {}).items()}
        self._compensation: dict[str, list[str]] = {
            "undone": list((compensation or {}).get("undone", ())),
            "not_undone": list((compensation or {}).get("not_undone", ())),
        }
        self._note = ""

    @property
    def steps(self) -> Mapping[str, Mapping[str, Any]]:
        """A step saga's completed steps, in the order they completed: step name -> its reply's result."""
        return MappingProxyType(self._steps)

    def publish(self, type: str, payload: Mapping[str, Any] | None = None) -> None:
        """Publish an event when the transition commits (through the outbox)."""
        validate_event_name(type)
        self.outbox.append((type, dict(payload or {})))

    def _complete_step(self, step: str, result: Mapping[str, Any]) -> None:
        self._steps[step] = MappingProxyType(dict(result))

    def _undone(self, step: str) -> None:
        if step not in self._compensation["undone"]:
            self._compensation["undone"].append(step)
        self._compensation["not_undone"] = [s for s in self._compensation["not_undone"] if s != step]

    def _not_undone(self, steps: Iterable[str]) -> None:
        for step in steps:
            if step not in self._compensation["not_undone"]:
                self._compensation["not_undone"].append(step)

    def _compensation_meta(self) -> dict[str, list[str]] | None:
        """What the compensations undid and did not undo so far, for the metadata (None: nothing yet)."""
        if not any(self._compensation.values()):
            return None
        return {k: list(v) for k, v in self._compensation.items()}


def steps_from_meta(meta: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The completed steps kept in a saga's metadata (see :func:`steps_to_meta`)."""
    return {row["step"]: row["result"] for row in meta.get(STEPS_META) or ()}


def steps_to_meta(steps: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Completed steps as JSON for the saga's metadata: a list, so their order survives any store."""
    return [{"step": name, "result": dict(result)} for name, result in steps.items()]


Guard = Callable[[SagaContext], bool]
#: A saga type's data upgrade: the data of a saga created or last moved under the version with this
#: fingerprint (None: unknown, from before fingerprints were kept) -> its data under this version.
Migrate = Callable[[dict[str, Any], str | None], dict[str, Any]]
Action = Callable[[SagaContext], None]
PayloadBuilder = Callable[[SagaContext], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Request:
    """A request a state sends when it is entered. Its payload is the saga's data, or these ``fields``
    of it (null where one is missing), or what ``payload`` builds from the context."""

    type: str
    payload: PayloadBuilder | None = None
    fields: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        validate_event_name(self.type)
        if self.payload is not None and self.fields:
            raise ConfigurationError(
                f"Request({self.type!r}) takes payload= or fields=, not both: fields= picks data fields, "
                "payload= builds the whole payload"
            )
        if isinstance(self.fields, str):
            raise ConfigurationError(f"Request({self.type!r}): fields= is a tuple of names, e.g. fields=('id',)")

    def build(self, ctx: SagaContext) -> Mapping[str, Any]:
        """The payload of this request for ``ctx``."""
        if self.payload is not None:
            return self.payload(ctx)
        if self.fields:
            return {name: ctx.data.get(name) for name in self.fields}
        return ctx.data


def set_data(**values: Any) -> Action:
    """An action that sets fields of the saga's data: ``Go("reverting", do=set_data(outcome="abort"))``."""

    def set_fields(ctx: SagaContext) -> None:
        ctx.data.update(copy.deepcopy(values))  # (a list or dict value is never shared between sagas)

    set_fields.__name__ = "set " + ", ".join(f"{k}={v!r}" for k, v in values.items())
    return set_fields


@dataclass(frozen=True, slots=True)
class Compensate:
    """What undoes something a saga stopped waiting for when it arrives after all (see ``State.late``):
    the ``request`` to send, with its own deadline (``timeout``, default the state's) and ``retries``."""

    request: Request
    timeout: float | None = field(default=None, kw_only=True)
    retries: int = field(default=3, kw_only=True)
    backoff: float = field(default=2.0, kw_only=True)


def compensate(
    request: Request | str, *, timeout: float | None = None, retries: int = 3, backoff: float = 2.0
) -> Compensate:
    """Undo a late success with ``request``: ``State(..., late={"shop.payments.authorized":
    compensate("shop.payments.refund")})``. Its payload is built as a state's request is (the saga's
    data by default); ``ctx.result`` and ``ctx.event`` are the late reply or event."""
    spec = Request(request) if isinstance(request, str) else request
    if not isinstance(spec, Request):
        raise ConfigurationError(f"compensate() takes a Request or a request type, not {request!r}")
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"compensate({spec.type!r}): timeout= is a number of seconds above 0")
    if retries < 0:
        raise ConfigurationError(f"compensate({spec.type!r}): retries= is 0 or more")
    return Compensate(spec, timeout=timeout, retries=retries, backoff=backoff)


@dataclass(frozen=True, slots=True)
class LateUndo:
    """A compiled :class:`Compensate`: the request, its deadline, and for a step saga, the step it undoes."""

    request: Request
    timeout: float
    retries: int
    backoff: float
    step: str | None = None

    def deadline_after(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds until the deadline after send number ``attempt`` (1-based), with +-10 % jitter."""
        return backoff_wait(self.timeout, self.backoff, attempt, rng)


def backoff_wait(timeout: float, backoff: float, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds until the deadline after send number ``attempt`` (1-based) of a request with this
    ``timeout`` and ``backoff``: ``timeout * backoff ** (attempt - 1)``, with +-10 % jitter."""
    return timeout * backoff ** (attempt - 1) * (0.9 + 0.2 * (rng or random).random())


@dataclass(frozen=True, slots=True)
class Go:
    """A move to the state ``to``. ``when`` is a guard: the move is taken only if it returns true.
    ``do`` is an action, run on the way (it may change ``ctx.data`` and publish events)."""

    to: str
    when: Guard | None = field(default=None, kw_only=True)
    do: Action | None = field(default=None, kw_only=True)


#: Where one outcome leads: a :class:`Go`, or a state name (``"failed"`` means ``Go("failed")``).
Outcome = Go | str
#: Where a reply, a failure reply or an event leads: one outcome, or a list tried in the order written.
Outcomes = Go | str | Sequence[Go | str]


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    """A state, and everything that can happen while a saga is in it.

    - ``sends``: a :class:`Request` (or a request type) sent when the state is entered;
    - ``timeout`` (seconds): the deadline every non-final state needs. With a request, the deadline
      re-sends it up to ``retries`` times, waiting ``timeout * backoff**n`` (with jitter); then, or
      at once without a request, ``on_timeout`` is taken (default: ``failed``);
    - ``handling_timeout`` (seconds, from the request's first send): how long a participant may take.
      A deadline that finds the request being handled (a worker holds its claim) neither re-sends it
      nor counts an attempt, and waits again, until ``handling_timeout`` has passed: then
      ``on_timeout`` is taken. Default: as long as the re-sends would last (the sum of the waits);
    - ``on_reply`` and ``on_failure``: where the request's reply and failure reply lead (``ctx.result``,
      ``ctx.reason``); only for a state that sends a request. A failure reply that no ``on_failure``
      outcome takes (none declared, or no guard passed) takes ``on_timeout`` at once (default:
      ``failed``, with the participant's reason);
    - ``on``: correlated event type -> where it leads (see ``Saga.correlate``);
    - ``on_compensate``: where an operator's ``sagas compensate ID`` takes the saga from this state;
    - ``late``: what undoes something this state waited for when it arrives after the saga stopped
      waiting (a timeout, an operator's retry or compensate, another event): the state's request type
      (its success reply came late) or an event type of ``on``, mapped to :func:`compensate`.

    In a list of outcomes, the first whose ``when`` passes (or that has none) is taken; when none
    passes, the message is ignored and the reason logged.
    """

    name: str = field(kw_only=False)
    sends: Request | str | None = None
    timeout: float | None = None
    retries: int = 3
    backoff: float = 2.0
    handling_timeout: float | None = None
    on_reply: Outcomes | None = None
    on_failure: Outcomes | None = None
    on_timeout: Outcome | None = None
    on: Mapping[str, Outcomes] | None = None
    on_compensate: Outcome | None = None
    late: Mapping[str, Compensate] | None = None
    final: bool = False

    @property
    def request_spec(self) -> Request | None:
        return Request(self.sends) if isinstance(self.sends, str) else self.sends

    def deadline_after(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds until the deadline after send number ``attempt`` (1-based), with +-10 % jitter."""
        return backoff_wait(self.timeout or 0.0, self.backoff, attempt, rng)

    @property
    def handling_limit(self) -> float:
        """Seconds from a request's first send after which a participant still handling it is given up
        on: ``handling_timeout``, or the waits of every send (without jitter)."""
        if self.handling_timeout is not None:
            return self.handling_timeout
        return sum((self.timeout or 0.0) * self.backoff**n for n in range(self.retries + 1))


def Final(name: str) -> State:
    """A final state: the saga ends here."""
    return State(name, final=True)


@dataclass(frozen=True, slots=True)
class Start:
    """An event that starts a saga, in the state ``to``. ``key`` names the payload field that
    identifies the saga (a non-empty string, kept exactly), so a duplicate start event never starts a
    second one. The saga's data starts as a copy of the event's payload; with ``keep``, only these
    fields of it (those present); with ``do`` and no ``keep``, empty, for ``do`` to fill in (after
    ``keep``, ``do`` can fill in more). (A step saga starts at its first step: no ``to``.)"""

    event: str
    key: str = field(kw_only=True)
    to: str = field(default="", kw_only=True)
    keep: tuple[str, ...] = field(default=(), kw_only=True)
    do: Action | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        validate_event_name(self.event)
        if not isinstance(self.key, str) or not self.key:
            raise ConfigurationError(
                f"Start({self.event!r}): key= names the payload field that identifies the saga, e.g. "
                f"key='upload_id', not {self.key!r}"
            )
        if isinstance(self.keep, str):
            raise ConfigurationError(f"Start({self.event!r}): keep= is a tuple of names, e.g. keep=('id',)")


#: What a step saga takes a step to have done when its retries ran out without a reply: see :class:`Step`.
UnknownOutcome = Literal["compensate", "assume_not_done"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a :class:`StepSaga`: a request, and the request that undoes it if a later step fails.

    ``unknown_outcome`` says what a step whose retries ran out without any reply is taken to have
    done. Its outcome is unknown: the participant may have done the work, and only the replies were
    lost. ``"compensate"`` (the default) runs its compensation too, before those of the earlier steps;
    so a compensation must be idempotent and accept "nothing to undo". ``"assume_not_done"`` is for a
    step known to have no effect unless it answered: only the earlier steps are compensated. A failure
    reply always means "not done": that step is never compensated.
    """

    name: str
    request: str
    compensation: str | None = None
    payload: PayloadBuilder | None = None
    compensation_payload: PayloadBuilder | None = None
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 2.0
    #: how long the participant may take (see :class:`State`); for the step and its compensation
    handling_timeout: float | None = None
    unknown_outcome: UnknownOutcome = "compensate"

    def __post_init__(self) -> None:
        if self.unknown_outcome not in ("compensate", "assume_not_done"):
            raise ConfigurationError(
                f"Step({self.name!r}): unknown_outcome= is 'compensate' (the default) or 'assume_not_done', "
                f"not {self.unknown_outcome!r}"
            )


@dataclass(frozen=True, slots=True)
class Transition:
    """One compiled move: on ``trigger`` in ``source``, if ``guard`` passes, run ``action`` and go to ``dest``."""

    trigger: Trigger
    source: str
    dest: str
    guard: Guard | None = None
    action: Action | None = None


@dataclass(slots=True)
class SagaDefinition:
    """A compiled saga type. Built once per type."""

    type: str
    states: dict[str, State]
    transitions: list[Transition]
    starts: dict[str, Start]
    correlate: dict[str, str]
    machine: Any = field(repr=False)
    requests: dict[str, str] = field(default_factory=dict)  # request type -> reply type
    #: state -> what it waits for (its request type, or an event type) -> what undoes it when it comes late
    late: dict[str, dict[str, LateUndo]] = field(default_factory=dict)
    #: a step saga's undo states -> the step each undoes
    undo_states: dict[str, str] = field(default_factory=dict)
    #: states of earlier versions of the type -> the state a saga in one is moved to when a worker loads
    #: it (see docs/upgrades.md)
    migrations: dict[str, str] = field(default_factory=dict)
    #: ``migrate(data, from_fingerprint) -> data``: upgrades the data of a saga created or last moved
    #: under another version of the type, when a worker first loads it (None: the data is kept)
    migrate: Migrate | None = field(default=None, repr=False)
    #: the version of the saga's data the type declares (``data_version``): part of the graph, so that a
    #: change of the data alone changes the fingerprint and ``migrate`` runs (None: not declared)
    data_version: str | int | None = None
    #: the graph's fingerprint (:func:`sagas._versions.fingerprint`), set when compiled
    fingerprint: str = ""

    def late_undo(self, awaited: Mapping[str, Any], state: str, meta: Mapping[str, Any]) -> LateUndo | None:
        """What undoes ``awaited`` (a request or event a saga stopped waiting for, as the engine keeps
        it) now that its success came after all, with the saga in ``state``; None: nothing to undo.

        In the state-machine style, it is undone unless the saga counted its effect (another attempt of
        the same request answered first). A step is undone unless the saga counts it as completed and
        has not started to undo it (its compensation is still to come, or the saga completed with it):
        the participants' effects are per step, and undoing a step after its compensation ran, or one
        never counted as done, is what leaves nothing behind.
        """
        undo = self.late.get(str(awaited.get("state")), {}).get(str(awaited.get("what")))
        if undo is None:
            return None
        if undo.step is None:
            return None if awaited.get("counted") else undo
        completed = undo.step in steps_from_meta(meta)
        undone = undo.step in ((meta.get(COMPENSATION_META) or {}).get("undone") or ())
        return undo if not completed or undone or state == f"undo_{undo.step}" else None

    @property
    def finals(self) -> set[str]:
        return {n for n, s in self.states.items() if s.final}

    @property
    def patterns(self) -> tuple[str, ...]:
        """The event types the saga type's queue is bound to."""
        return tuple(sorted({*self.starts, *self.correlate, *self.requests.values()}))

    def triggers_from(self, state: str) -> set[Trigger]:
        return {t.trigger for t in self.transitions if t.source == state}

    def compensable_from(self, state: str) -> bool:
        """Whether an operator can compensate a saga of this type that is in ``state``."""
        return COMPENSATE in self.triggers_from(state)


#: Compiled definitions by saga class (the class itself is never written to).
_DEFINITIONS: weakref.WeakKeyDictionary[type[Saga], SagaDefinition] = weakref.WeakKeyDictionary()


class Saga:
    """Base class of a saga type in the state-machine style.

    Class attributes: ``type`` (a lowercase name), ``start`` (a :class:`Start` or a list),
    ``states`` (:class:`State` and :func:`Final` entries) and ``correlate``: for other events the saga
    reacts to (in a state's ``on``), the payload field holding the saga key. A ``failed`` final state
    is always added.
    """

    type: ClassVar[str]
    start: ClassVar[Start | list[Start]]
    states: ClassVar[list[State]]
    correlate: ClassVar[dict[str, str]] = {}
    #: states of earlier versions -> the state of this one a saga in them moves to (docs/upgrades.md);
    #: with a ``migrate(data, from_fingerprint) -> data`` function (a staticmethod) to upgrade the data
    migrations: ClassVar[dict[str, str]] = {}
    #: the version of the saga's data: change it when only the data changes, so that ``migrate`` runs
    data_version: ClassVar[str | int | None] = None

    @classmethod
    def definition(cls) -> SagaDefinition:
        """The compiled definition (compiled and validated on first use)."""
        found = _DEFINITIONS.get(cls)
        if found is None:
            found = _DEFINITIONS.setdefault(cls, compile_saga(cls))
        return found


class StepSaga(Saga):
    """A saga of ordered steps, each a request with an optional compensating request.

    Class attributes: ``type``, ``start`` (a :class:`Start` without ``to``) and ``steps``. It compiles
    to states ``<step>`` and ``undo_<step>`` plus finals ``completed``, ``compensated`` and ``failed``.
    The saga's data is the user's alone: each step's reply result is kept in the saga's metadata and
    read as ``ctx.steps[<step name>]``. When a step fails or times out, the compensations of the steps
    that completed run in reverse order, each with its own deadline and retries. A step that timed out
    (its outcome unknown) is compensated first, unless it says ``unknown_outcome="assume_not_done"``.

    A compensation that still fails parks the saga in ``failed``, with what was undone and what was
    not in ``meta["compensation"]``. With ``continue_compensating = True``, the compensations of the
    earlier steps run first, and then the saga parks.
    """

    steps: ClassVar[list[Step]]
    continue_compensating: ClassVar[bool] = False


def _complete(step: str) -> Action:
    def complete(ctx: SagaContext) -> None:
        ctx._complete_step(step, ctx.result)  # noqa: SLF001 - SagaContext is defined in this module

    complete.__name__ = f"complete_{step}"
    return complete


def _unknown(step: str) -> Action:
    def unknown(ctx: SagaContext) -> None:
        ctx._note = f"{step}'s outcome is unknown, so it is compensated"  # noqa: SLF001

    unknown.__name__ = f"compensate_unknown_{step}"
    return unknown


def _undone(step: str, note: str = "") -> Action:
    def undone(ctx: SagaContext) -> None:
        ctx._undone(step)  # noqa: SLF001
        if note:
            ctx._note = note  # noqa: SLF001

    undone.__name__ = f"undone_{step}"
    return undone


def _not_undone(steps: list[str], note: str = "") -> Action:
    def not_undone(ctx: SagaContext) -> None:
        ctx._not_undone(steps)  # noqa: SLF001
        if note:
            ctx._note = note  # noqa: SLF001

    not_undone.__name__ = "not_undone_" + "_".join(steps)
    return not_undone


def _some_not_undone(ctx: SagaContext) -> bool:
    return bool(ctx._compensation["not_undone"])  # noqa: SLF001


def _step_states(cls: type[StepSaga], where: str) -> tuple[list[State], list[Start]]:
    steps = list(getattr(cls, "steps", []))
    if not steps:
        raise ConfigurationError(f"step saga {cls.__name__} has no steps: give it steps = [Step(...), ...]")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"step saga {cls.__name__} has two steps with one name: name each step once")
    for step_name in names:
        if step_name in _STEP_FINALS or step_name.startswith("undo_"):
            raise ConfigurationError(
                f"step saga {cls.__name__}: a step is named {step_name!r}, a name the step style uses itself "
                f"(the final states {', '.join(repr(n) for n in _STEP_FINALS)} and the undo_<step> states): "
                "rename the step"
            )
    keep_going = bool(getattr(cls, "continue_compensating", False))
    states: list[State] = []
    for i, step in enumerate(steps):
        undo = _undo_target(steps, i)
        nxt = steps[i + 1].name if i + 1 < len(steps) else "completed"
        compensate_unknown = step.compensation is not None and step.unknown_outcome == "compensate"
        # no reply at all (or an operator's compensate while waiting): the outcome is unknown
        unknown: Outcome = Go(f"undo_{step.name}", do=_unknown(step.name)) if compensate_unknown else undo
        states.append(
            State(
                step.name,
                sends=Request(step.request, step.payload),
                timeout=step.timeout,
                retries=step.retries,
                backoff=step.backoff,
                handling_timeout=step.handling_timeout,
                on_reply=Go(nxt, do=_complete(step.name)),
                on_failure=undo,  # the participant said it did nothing: only the earlier steps are undone
                on_timeout=unknown,
                on_compensate=unknown,
                late=(
                    None
                    if step.compensation is None
                    else {
                        step.request: Compensate(
                            Request(step.compensation, step.compensation_payload),
                            timeout=step.timeout,
                            retries=step.retries,
                            backoff=step.backoff,
                        )
                    }
                ),
            )
        )
        if step.compensation and (i + 1 < len(steps) or compensate_unknown):
            # (the last step's compensation runs only when its outcome is unknown: when it completes,
            # the saga has completed)
            states.append(_undo_state(steps, i, keep_going))
    states += [Final("completed"), Final("compensated")]
    starts = []
    for s in _declared_starts(cls, where):
        if s.to:
            raise ConfigurationError(
                f"{where}: a step saga starts at its first step; write Start({s.event!r}, key={s.key!r}) without to="
            )
        starts.append(Start(s.event, key=s.key, to=steps[0].name, keep=s.keep, do=s.do))
    return states, starts


def _undo_state(steps: list[Step], i: int, keep_going: bool) -> State:
    """The state that sends step ``i``'s compensation. Its reply leads to the next compensation; when
    it still fails, the saga parks with what was and was not undone, or with ``keep_going`` first
    compensates the earlier steps."""
    step = steps[i]
    assert step.compensation is not None
    nxt = _undo_target(steps, i)
    earlier = [s.name for s in reversed(steps[:i]) if s.compensation]
    on_reply: Outcomes = Go(nxt, do=_undone(step.name))
    if keep_going and nxt == "compensated":
        on_reply = [
            Go(FAILED, when=_some_not_undone, do=_undone(step.name, "some steps could not be undone")),
            Go(nxt, do=_undone(step.name)),
        ]
    if keep_going and nxt != "compensated":
        gave_up = Go(nxt, do=_not_undone([step.name], f"{step.name} could not be undone; undoing the earlier steps"))
    elif keep_going:
        gave_up = Go(FAILED, do=_not_undone([step.name], f"{step.name} could not be undone"))
    else:
        gave_up = Go(FAILED, do=_not_undone([step.name, *earlier]))
    return State(
        f"undo_{step.name}",
        sends=Request(step.compensation, step.compensation_payload),
        timeout=step.timeout,
        retries=step.retries,
        backoff=step.backoff,
        handling_timeout=step.handling_timeout,
        on_reply=on_reply,
        on_failure=gave_up,
        on_timeout=gave_up,
    )


def _undo_target(steps: list[Step], failed_index: int) -> str:
    """Where a failure at step ``failed_index`` goes: undo the nearest earlier step that has one."""
    for j in range(failed_index - 1, -1, -1):
        if steps[j].compensation:
            return f"undo_{steps[j].name}"
    return "compensated"


def _declared_starts(cls: type[Saga], where: str) -> list[Start]:
    declared = getattr(cls, "start", None)
    starts: list[Any] = list(declared) if isinstance(declared, list | tuple) else [declared]
    if not starts or any(not isinstance(s, Start) for s in starts):
        raise ConfigurationError(f"{where} needs `start = Start(event, key=..., to=...)`")
    return starts


def compile_saga(cls: type[Saga]) -> SagaDefinition:
    """Validate a saga class and build its definition and its one ``transitions`` machine.

    The class is only read. Every mistake found raises a :class:`ConfigurationError` that says what to
    write instead.
    """
    where = f"saga {cls.__name__}"
    name = getattr(cls, "type", None)
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or not name.islower():
        raise ConfigurationError(f"{where} needs a lowercase `type` name, e.g. type = 'postprocessing'")
    if hasattr(cls, "transitions"):
        raise ConfigurationError(
            f"{where} has a `transitions` list: declare what each state leads to in the state itself "
            "(State(..., on_reply=..., on_failure=..., on_timeout=..., on={...}))"
        )
    steps = issubclass(cls, StepSaga)
    if issubclass(cls, StepSaga):
        declared, starts = _step_states(cls, where)
    else:
        declared, starts = list(getattr(cls, "states", [])), _declared_starts(cls, where)
    correlate = dict(getattr(cls, "correlate", {}))
    d = _compile(where, name, declared, {s.event: s for s in starts}, correlate, steps=steps)
    d.migrations, d.migrate = _migrations(where, cls, d.states)
    d.data_version = getattr(cls, "data_version", None)
    if d.data_version is not None and (not isinstance(d.data_version, str | int) or isinstance(d.data_version, bool)):
        raise ConfigurationError(f"{where}: data_version is a string or an integer, not {d.data_version!r}")
    from ._versions import fingerprint  # (it reads the compiled definition)

    d.fingerprint = fingerprint(d)
    return d


def _migrations(where: str, cls: type[Saga], states: Mapping[str, State]) -> tuple[dict[str, str], Migrate | None]:
    """``cls.migrations`` and ``cls.migrate``, checked: each source a state this version no longer has,
    each target one it has."""
    declared = getattr(cls, "migrations", None) or {}
    if not isinstance(declared, Mapping):
        raise ConfigurationError(
            f"{where}: `migrations` maps old state names to new ones, e.g. migrations = {{'charging': 'paying'}}"
        )
    out: dict[str, str] = {}
    for old, new in declared.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise ConfigurationError(f"{where}: migrations[{old!r}] = {new!r}: both are state names (strings)")
        if old in states:
            raise ConfigurationError(
                f"{where}: migrations moves sagas out of state {old!r}, which this version still has: "
                "a migration is for a state that was renamed or removed; remove that entry"
            )
        if new not in states:
            raise ConfigurationError(
                f"{where}: migrations moves sagas from {old!r} to unknown state {new!r}: declare it in `states`"
            )
        out[old] = new
    migrate = getattr(cls, "migrate", None)
    if migrate is not None and not callable(migrate):
        raise ConfigurationError(
            f"{where}: `migrate` is {migrate!r}; write a function migrate(data, from_fingerprint) -> data "
            "(a @staticmethod)"
        )
    return out, migrate


def _compile(
    where: str,
    name: str,
    declared: Iterable[Any],
    starts: dict[str, Start],
    correlate: dict[str, str],
    *,
    steps: bool = False,
) -> SagaDefinition:
    states: dict[str, State] = {}
    for st in declared:
        if not isinstance(st, State):
            raise ConfigurationError(f"{where}: `states` holds {st!r}; list State(...) and Final(...) entries only")
        if st.name == FAILED:
            raise ConfigurationError(
                f"{where} declares a state named {FAILED!r}, the state every saga type parks in when something "
                "keeps failing (it is always there): name your state otherwise, e.g. 'rejected'"
            )
        if st.name in states:
            raise ConfigurationError(f"{where} declares state {st.name!r} twice: give each state its own name")
        states[st.name] = st
    states.setdefault(FAILED, Final(FAILED))
    if not any(s.final for n, s in states.items() if n != FAILED) and len(states) > 1:
        raise ConfigurationError(f"{where} has no final state besides 'failed': declare one with Final(...)")
    requests: dict[str, str] = {}
    transitions: list[Transition] = []
    late: dict[str, dict[str, LateUndo]] = {}
    for st in states.values():
        transitions += _state_transitions(where, st, states, starts, correlate)
        spec = st.request_spec
        if spec is not None:
            requests[spec.type] = reply_type(spec.type)
        undoes = _late_undoes(where, st, step=st.name if steps else None)
        if undoes:
            late[st.name] = undoes
            requests.update({u.request.type: reply_type(u.request.type) for u in undoes.values()})
    for s in starts.values():
        if not s.to:
            raise ConfigurationError(f"{where}: Start({s.event!r}) needs to=<the first state>")
        if s.to not in states:
            raise ConfigurationError(f"{where}: start event {s.event} leads to unknown state {s.to!r}")
    _check_reachable(where, states, starts, transitions)
    machine = Machine(
        model=None,
        states=list(states),
        initial=None,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=True,
    )
    for t in transitions:  # in the order written: the machine tries them in this order
        machine.add_transition(
            t.trigger.name,
            t.source,
            t.dest,
            conditions=[_call_guard(t.guard)] if t.guard else None,
            after=[_call_action(t.action)] if t.action else None,
        )
    return SagaDefinition(
        type=name,
        states=states,
        transitions=transitions,
        starts=starts,
        correlate=correlate,
        machine=machine,
        requests=requests,
        late=late,
        undo_states={n: n[len("undo_") :] for n in states if steps and n.startswith("undo_")},
    )


def _late_undoes(where: str, st: State, *, step: str | None) -> dict[str, LateUndo]:
    """``st.late`` checked and compiled: each key is what the state waits for (its request type, or an
    event type of its ``on``); each value a :func:`compensate`."""
    if st.late is None:
        return {}
    here = f"{where}: state {st.name!r}"
    if not isinstance(st.late, Mapping):
        raise ConfigurationError(f"{here}: late= maps what the state waits for to compensate(...)")
    if st.final:
        raise ConfigurationError(f"{here} is final, so it waits for nothing: remove late=")
    spec = st.request_spec
    awaited = ([spec.type] if spec is not None else []) + list(st.on or {})
    out: dict[str, LateUndo] = {}
    for what, undo in st.late.items():
        if what not in awaited:
            raise ConfigurationError(
                f"{here}: late= names {what!r}, which the state does not wait for: name its request type "
                f"or an event of its on= ({', '.join(awaited) or 'it waits for nothing'})"
            )
        if not isinstance(undo, Compensate):
            raise ConfigurationError(f"{here}: late[{what!r}] is {undo!r}; write compensate(<request type>)")
        timeout = undo.timeout or st.timeout or 0.0
        out[what] = LateUndo(undo.request, timeout, undo.retries, undo.backoff, step)
    return out


def _state_transitions(
    where: str, st: State, states: Mapping[str, State], starts: Mapping[str, Start], correlate: Mapping[str, str]
) -> list[Transition]:
    """The compiled transitions out of ``st``, checked, in the order they are tried."""
    here = f"{where}: state {st.name!r}"
    outcomes = {
        "on_reply": st.on_reply,
        "on_failure": st.on_failure,
        "on_timeout": st.on_timeout,
        "on": st.on,
        "on_compensate": st.on_compensate,
    }
    if st.final:
        if st.sends is not None:
            raise ConfigurationError(f"{where}: final state {st.name!r} cannot send a request")
        given = [k for k, v in outcomes.items() if v is not None]
        if given:
            raise ConfigurationError(f"{here} is final, so nothing leads out of it: remove {', '.join(given)}")
        return []
    if not st.timeout:
        raise ConfigurationError(
            f"{where}: waiting state {st.name!r} has no deadline; give it timeout=<seconds> so that a "
            "lost message can never leave a saga stuck"
        )
    for name, value in (("timeout", st.timeout), ("backoff", st.backoff), ("handling_timeout", st.handling_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ConfigurationError(f"{here}: {name}= is a number above 0 (seconds; backoff a factor), not {value!r}")
    if isinstance(st.retries, bool) or not isinstance(st.retries, int) or st.retries < 0:
        raise ConfigurationError(f"{here}: retries= is a whole number of re-sends, 0 or more, not {st.retries!r}")
    spec = st.request_spec
    if st.handling_timeout is not None and (spec is None or not st.handling_timeout > 0):
        raise ConfigurationError(
            f"{here}: handling_timeout is how long a participant may take on the state's request: "
            "give it a request and a number of seconds above 0"
        )
    out: list[Transition] = []
    if spec is None:
        for key in ("on_reply", "on_failure"):
            if outcomes[key] is not None:
                raise ConfigurationError(
                    f"{here} sends no request, so it gets no reply: give it sends=Request(...) or remove {key}"
                )
    else:
        if st.on_reply is None:
            raise ConfigurationError(
                f"{here} sends {spec.type} but says nothing about its reply: add on_reply=<the next state>"
            )
        out += _moves(here, "on_reply", on_reply(spec.type), st, st.on_reply, states)
        failures = (
            []
            if st.on_failure is None
            else _moves(here, "on_failure", on_failure(spec.type), st, st.on_failure, states)
        )
        out += failures
        if not failures or failures[-1].guard is not None:
            # A failure reply that no declared outcome takes gives up at once, where the deadline would
            # give up: never ignored (waiting out the retries for a participant that said no would lose
            # its reason).
            gives_up = _single(here, "on_timeout", st.on_timeout or FAILED, states)
            out.append(Transition(on_failure(spec.type), st.name, gives_up.to, None, gives_up.do))
    if not isinstance(st.on or {}, Mapping):
        raise ConfigurationError(f"{here}: `on` maps event types to outcomes, e.g. on={{'a.b.c': 'done'}}")
    for event_type, leads in (st.on or {}).items():
        validate_event_name(event_type)
        if event_type not in correlate and event_type not in starts:
            raise ConfigurationError(
                f"{where} reacts to {event_type} but does not say how to find the saga: "
                f"add it to `correlate`, e.g. correlate = {{{event_type!r}: '<payload field with the key>'}}"
            )
        out += _moves(here, f"on[{event_type!r}]", on_event(event_type), st, leads, states)
    if spec is None and not st.on:
        raise ConfigurationError(
            f"{where}: state {st.name!r} has no way out but its timeout: give it sends=Request(...) or on={{...}}"
        )
    timeout_to = _single(here, "on_timeout", st.on_timeout or FAILED, states)
    out.append(Transition(TIMEOUT, st.name, timeout_to.to, None, timeout_to.do))
    if st.on_compensate is not None:
        compensate_to = _single(here, "on_compensate", st.on_compensate, states)
        out.append(Transition(COMPENSATE, st.name, compensate_to.to, None, compensate_to.do))
    return out


def _as_go(here: str, what: str, value: Any) -> Go:
    if isinstance(value, str):
        return Go(value)
    if isinstance(value, Go):
        return value
    raise ConfigurationError(f"{here}: {what} takes a state name or Go(...), not {value!r}")


def _known(here: str, what: str, go: Go, states: Mapping[str, State]) -> Go:
    if go.to not in states:
        if what == "on_timeout":
            raise ConfigurationError(f"{here} times out to unknown state {go.to!r}: declare it in `states`")
        raise ConfigurationError(f"{here}: {what} leads to unknown state {go.to!r}: declare it in `states`")
    return go


def _single(here: str, what: str, value: Any, states: Mapping[str, State]) -> Go:
    """The one outcome of a deadline or an operator's compensate: no guard (it must always be taken)."""
    go = _known(here, what, _as_go(here, what, value), states)
    if go.when is not None:
        raise ConfigurationError(
            f"{here}: {what} is always taken, so it cannot have a guard: remove when= "
            "(decide in the action, or in the state it leads to)"
        )
    return go


def _moves(
    here: str, what: str, trigger: Trigger, st: State, value: Any, states: Mapping[str, State]
) -> list[Transition]:
    many = list(value) if isinstance(value, list | tuple) else [value]
    if not many:
        raise ConfigurationError(f"{here}: {what} is an empty list; name where it leads, or remove it")
    gos = [_known(here, what, _as_go(here, what, v), states) for v in many]
    for go in gos[:-1]:
        if go.when is None:
            raise ConfigurationError(
                f"{here}: in {what}, Go({go.to!r}) has no when=, so the outcomes after it could never be "
                "taken: put it last"
            )
    return [Transition(trigger, st.name, go.to, go.when, go.do) for go in gos]


def _check_reachable(
    where: str, states: Mapping[str, State], starts: Mapping[str, Start], transitions: list[Transition]
) -> None:
    reachable: set[str] = set()
    todo = [s.to for s in starts.values()]
    while todo:
        st_name = todo.pop()
        if st_name in reachable:
            continue
        reachable.add(st_name)
        todo += [t.dest for t in transitions if t.source == st_name]
    unreachable = sorted(set(states) - reachable - {FAILED})
    if unreachable:
        raise ConfigurationError(
            f"{where}: state(s) {', '.join(unreachable)} can never be reached: lead to them from a start or "
            "another state, or remove them"
        )


def _call_guard(guard: Guard) -> Callable[[Any], bool]:
    return lambda ed: bool(guard(ed.kwargs["ctx"]))


def _call_action(action: Action) -> Callable[[Any], None]:
    return lambda ed: action(ed.kwargs["ctx"])
