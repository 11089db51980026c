"""OpenTelemetry traces: one saga is one trace, across processes.

Optional: ``pip install 'kombu-sagas[otel]'`` installs ``opentelemetry-api``. Without it nothing of
OpenTelemetry is imported, the decorators below return the functions they decorate unchanged, and
:func:`outgoing` returns the headers it is given (one ``is None`` check). With the API installed and
no provider configured (OpenTelemetry's default proxy provider), each traced point checks that and does
nothing else.

The W3C trace context (``traceparent``, ``tracestate``) travels in the envelope's ``headers``:

- every event the framework builds (a handler's follow-up, a reply, a saga's request or event) gets a
  PRODUCER span ``<type> publish``, child of the span current where it is built, and carries that
  span's context. A saga's outgoing messages are built inside its transition and written to the
  outbox with their headers, so the relay's later publish keeps the parent;
- a handler runs in a CONSUMER span ``<type> process``, child of the publish span in the message's
  headers; its reply and follow-ups are built under it. A failure sets the status to ERROR and records
  the exception; a retry or dead letter adds a child span saying so;
- a saga message is applied in a CONSUMER span, each transition in an INTERNAL span under it. A saga
  keeps the context of its first transition in ``meta["trace"]``: its deadlines (the timer loop) and
  the transitions an operator or the relay causes use it as their parent.

Attributes follow the messaging semantic conventions (``messaging.system``,
``messaging.destination.name``, ``messaging.operation``, ``messaging.message.id``) plus
``sagas.saga.id``, ``sagas.saga.type``, ``sagas.saga.state``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transport import Event, Inbound

    from ._handlers import HandlerOutcome
    from ._saga_engine import Applied
    from ._service import HandlerSpec
    from ._store import OutboxRow, SagaRecord

try:
    from opentelemetry import baggage, propagate, trace
    from opentelemetry import context as otel_context
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the otel extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])

#: Whether OpenTelemetry's API is installed (then spans are made; they record nothing without an SDK).
ENABLED = trace is not None
#: The key of a saga's own trace context in its meta.
TRACE_META = "trace"
_NAME = "sagas"

_own_tracer: Any = None  # the tracer of the provider set with set_tracer_provider, if any
_own_drops = False  # whether that provider's sampler drops every child of an unsampled parent
_global: Any = None  # the global provider's tracer, once there is one
_global_drops = False  # the same, of the global provider
_next_check = 0.0  # when to look at the global provider again (time.monotonic)
_system = "rabbitmq"
#: a W3C ``traceparent`` of version 00: trace id, parent span id, flags (bit 0: sampled)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def set_tracer_provider(provider: Any) -> None:
    """Make spans with ``provider`` instead of OpenTelemetry's global one (None: the global one again).
    For tests and for applications that keep more than one provider."""
    global _own_tracer, _own_drops
    _own_tracer = None if provider is None else provider.get_tracer(_NAME)
    _own_drops = provider is not None and _drops_unsampled_children(provider)


def _drops_unsampled_children(provider: Any) -> bool:
    """Whether ``provider``'s sampler drops every span whose parent is not sampled, local or remote: the
    SDK's ``ParentBased`` samplers as configured by default (``parentbased_always_on``,
    ``parentbased_traceidratio``: the decision taken at the root holds for the whole trace). Then a span
    point under an unsampled parent makes no span at all and carries the parent's context on: the SDK
    would make a span that records nothing and is given to no processor, at the cost of the sampler's
    call, new ids and its attributes (about a third of tracing's cost). Any other sampler (or a provider
    that does not say which) is asked for every span, as OpenTelemetry does."""
    describe = getattr(getattr(provider, "sampler", None), "get_description", None)
    if describe is None:
        return False
    description = str(describe())  # (abstract in the SDK's Sampler: every sampler says what it is)
    return (
        description.startswith("ParentBased{")
        and "remoteParentNotSampled:AlwaysOffSampler" in description
        and "localParentNotSampled:AlwaysOffSampler" in description
    )


def set_system(broker_url: str) -> None:
    """``messaging.system`` from the worker's broker URL: ``rabbitmq``, or ``memory`` for ``memory://``."""
    global _system
    _system = "memory" if broker_url.startswith("memory") else "rabbitmq"


def _tracer() -> Any:
    """The tracer, or None while nothing would record: no provider is configured (OpenTelemetry's
    default proxy, or its no-op provider). Then nothing is traced, at the cost of this check (the
    global provider is looked at once a second: spans start within a second of it being set)."""
    global _global, _global_drops, _next_check
    if _own_tracer is not None:
        return _own_tracer
    if _global is None:
        now = time.monotonic()
        if now < _next_check:
            return None
        _next_check = now + 1.0
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        _global_drops = _drops_unsampled_children(provider)
        _global = trace.get_tracer(_NAME)  # (a provider, once set, stays: OpenTelemetry sets it once)
    return _global


def _drops() -> bool:
    """Whether the provider in use drops the children of unsampled parents (see :func:`_tracer`)."""
    return _own_drops if _own_tracer is not None else _global_drops


def _unsampled_remote(carrier: Mapping[str, Any] | None) -> Any:
    """The non-recording span of the unsampled trace context ``carrier`` holds (a message's headers, a
    saga's ``meta["trace"]``), when the sampler drops its children; None otherwise (a span is made)."""
    if not carrier or not _drops() or "tracestate" in carrier:
        return None
    found = _TRACEPARENT.fullmatch(str(carrier.get("traceparent", "")))
    if found is None:
        return None
    trace_id, span_id, flags = int(found[1], 16), int(found[2], 16), int(found[3], 16)
    if not trace_id or not span_id or flags & trace.TraceFlags.SAMPLED:
        return None
    return trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, True, trace.TraceFlags(flags)))


def _messaging(operation: str, destination: str, message_id: str, routing_key: str) -> dict[str, Any]:
    return {
        "messaging.system": _system,
        "messaging.operation": operation,
        "messaging.destination.name": destination,
        "messaging.message.id": message_id,
        "messaging.rabbitmq.destination.routing_key": routing_key,
    }


def _parent(carrier: Mapping[str, Any] | None) -> Any:
    """The context a message's (or a saga's) trace headers carry, or None without any."""
    if not carrier or "traceparent" not in carrier:
        return None
    return propagate.extract(carrier)  # (read with .get: a mapping needs no copy)


class _Current:
    """``span`` current in the block, ended after it; an exception that escapes is recorded and sets the
    status to ERROR. What ``start_as_current_span`` does, at about half its cost (no generator-based
    context manager, no ``use_span`` around it): the traced paths make several spans per message."""

    __slots__ = ("span", "token")

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Any:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            if error is not None and isinstance(error, Exception):
                _fail(self.span, error)
        finally:
            otel_context.detach(self.token)
            self.span.end()


def _fail(span: Any, error: BaseException, description: str = "") -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, description or f"{type(error).__name__}: {error}"[:500]))


def given_back(span: Any, error: BaseException) -> None:
    """The worker gave a message back (retried or dead-lettered it) because the store failed, after its
    handler or saga step ran: its span (not ended yet) gets status ERROR, the exception, and
    ``sagas.outcome = given-back``."""
    if span is None or trace is None:
        return
    _fail(span, error, f"given back: {type(error).__name__}: {error}"[:500])
    span.set_attribute("sagas.outcome", "given-back")


def end(span: Any) -> None:
    """End a span whose end was left to whoever settles its message (a handler's)."""
    if span is not None:
        span.end()


# -- publishing -------------------------------------------------------------------------------------------


def outgoing(event_type: str, event_id: str, headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` with the trace context of a new PRODUCER span for the event (child of the current
    span), or ``headers`` themselves when tracing is off or nothing records."""
    tracer = _tracer() if trace is not None else None
    if tracer is None:
        return headers
    if _drops():
        current = trace.get_current_span().get_span_context()
        if current.is_valid and not current.trace_flags.sampled:  # (no span: the unsampled context travels on)
            return _with_context(headers, current)
    span = tracer.start_span(
        f"{event_type} publish",
        kind=SpanKind.PRODUCER,
        attributes=_messaging("publish", event_type, event_id, event_type),
    )
    span.end()
    if not span.get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = dict(headers)
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _with_context(headers: Mapping[str, str], ctx: Any) -> Mapping[str, str]:
    """``headers`` with the W3C trace context ``ctx`` of an unsampled trace, written directly (what the
    ``tracecontext`` propagator writes, at a fifth of the cost); through the configured propagators when
    the context holds baggage, which they carry too."""
    carrier = dict(headers)
    if baggage.get_all():
        propagate.inject(carrier)
        return carrier
    carrier["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        carrier["tracestate"] = ctx.trace_state.to_header()
    return carrier


def republished(event: Event) -> Event:
    """``event`` (built and traced before, say a cached reply) published again: with the trace context of
    a new PRODUCER span, child of the current span, in place of the one it carried."""
    if trace is None or _tracer() is None:
        return event
    headers = {k: v for k, v in event.headers.items() if k not in ("traceparent", "tracestate")}
    carrier = outgoing(event.type, event.id, headers)
    return event if carrier is headers else dataclasses.replace(event, headers=carrier)


# -- handlers ---------------------------------------------------------------------------------------------


#: a handler's span and the context token that made it current (see :func:`handler_started`)
Started = tuple[Any, Any]


def handler_started(spec: HandlerSpec, inbound: Inbound, event: Event) -> Started | None:
    """Before a handler runs (sync or async): a CONSUMER span around it, child of the message's publish
    span, made current while the handler runs (its follow-ups and log lines are under it). None while
    nothing is traced. :func:`handler_finished` ends the handler's part; the outcome keeps the span
    (``trace``) for the reply and the settling, which ends it (:func:`end`): a message given back when
    the store fails after the handler ran is an error of its span (:func:`given_back`)."""
    if trace is None:
        return None
    tracer = _tracer()
    if tracer is None:
        return None
    span = _handler_span(tracer, spec, inbound, event)
    return span, otel_context.attach(trace.set_span_in_context(span))


def handler_finished(started: Started | None, outcome: HandlerOutcome) -> None:
    """After the handler of :func:`handler_started` returned or raised (in the same thread or task)."""
    if started is None:
        return
    from ._errors import NoReply

    span, token = started
    otel_context.detach(token)
    if isinstance(outcome.error, NoReply):
        span.set_attribute("sagas.outcome", "no-reply")
    elif outcome.error is not None:
        _fail(span, outcome.error)
    outcome.trace = span


def _handler_span(tracer: Any, spec: HandlerSpec, inbound: Inbound, event: Event) -> Any:
    """A CONSUMER span ``<type> process`` for ``spec`` handling ``event``, child of its publish span (or
    the publish's unsampled context, as a span that records nothing: see :func:`_unsampled_remote`)."""
    unsampled = _unsampled_remote(event.headers)
    if unsampled is not None:
        return unsampled
    attributes = _messaging("process", inbound.subscription.queue, event.id, event.type)
    attributes.update({"sagas.service": spec.service, "sagas.handler": spec.name, "sagas.attempt": inbound.attempt})
    saga_type = event.headers.get("saga_type")
    if saga_type:
        attributes.update({"sagas.saga.id": event.correlation_id, "sagas.saga.type": saga_type})
    return tracer.start_span(
        f"{event.type} process", context=_parent(event.headers), kind=SpanKind.CONSUMER, attributes=attributes
    )


def reply_cache(answer: F) -> F:
    """Decorates the pipeline method that answers a request from the reply cache,
    ``answer(self, spec, inbound, event)``: a CONSUMER span ``<type> process`` as a handler's, child of
    the request's publish span, with ``sagas.outcome = reply-cache``, current while the cached reply is
    published again (:func:`republished` makes that publish a child of it)."""
    if trace is None:
        return answer

    @functools.wraps(answer)
    def traced(self: Any, spec: HandlerSpec, inbound: Inbound, event: Event, *args: Any) -> Any:
        tracer = _tracer()
        if tracer is None:
            return answer(self, spec, inbound, event, *args)
        with _Current(_handler_span(tracer, spec, inbound, event)) as span:
            span.set_attribute("sagas.outcome", "reply-cache")
            return answer(self, spec, inbound, event, *args)

    return traced  # type: ignore[return-value]


def within(method: F) -> F:
    """Decorates a pipeline method whose first argument is a handler's outcome: runs it with the
    handler's span current again (the reply is built there, a child of the handler span)."""
    if trace is None:
        return method

    @functools.wraps(method)
    def traced(self: Any, o: Any, *args: Any, **kwargs: Any) -> Any:
        if o.trace is None:
            return method(self, o, *args, **kwargs)
        with trace.use_span(o.trace, end_on_exit=False):
            return method(self, o, *args, **kwargs)

    return traced  # type: ignore[return-value]


def settled(span: Any, event: Event, outcome: str, error: BaseException) -> None:
    """A handler failed and its message was retried or dead-lettered (``outcome``): a child span of the
    handler's saying so, with status ERROR and the exception."""
    tracer = _tracer() if span is not None else None
    if tracer is None or not span.is_recording():
        return
    with tracer.start_as_current_span(
        f"{event.type} {outcome}",
        context=trace.set_span_in_context(span),
        attributes={"sagas.outcome": outcome, "messaging.message.id": event.id},
        record_exception=False,
        set_status_on_exception=False,
    ) as child:
        _fail(child, error, f"{outcome}: {type(error).__name__}: {error}"[:500])


# -- sagas ------------------------------------------------------------------------------------------------


#: the spans of saga messages applied in the current store group, ended when it is settled (see :class:`Held`)
_held: contextvars.ContextVar[Held | None] = contextvars.ContextVar("sagas_held_spans", default=None)


class Held:
    """While open, the spans of the saga messages applied are kept open instead of ended with the step:
    the saga pipeline applies a group of messages in one store transaction, and only its commit decides
    what became of them. :meth:`given_back` marks them all when it fails; closing ends them. ``queue``
    is the queue the messages came from (``messaging.destination.name`` of their spans)."""

    __slots__ = ("by_message", "queue", "spans", "token")

    def __init__(self, queue: str | None = None) -> None:
        self.queue = queue
        self.spans: list[Any] = []
        #: each message's span, by message id (for :func:`ids` of the lines logged about it)
        self.by_message: dict[str, Any] = {}

    def __enter__(self) -> Held:
        self.token = _held.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _held.reset(self.token)
        for span in self.spans:
            span.end()

    def given_back(self, error: BaseException) -> None:
        """The group did not commit: every message of it is given back (see :func:`given_back`)."""
        for span in self.spans:
            given_back(span, error)


def saga_message(handle: F) -> F:
    """Decorates ``SagaEngine.handle(saga_type, event)``: a CONSUMER span, child of the message's publish
    span, with the saga's id, type, state and what became of the message. Inside :class:`Held` the span
    is ended when the group is settled, and a step that raises is given back (the pipeline retries it)."""
    if trace is None:
        return handle

    @functools.wraps(handle)
    def traced(self: Any, saga_type: str, event: Event) -> Applied:
        tracer = _tracer()
        if tracer is None:
            return handle(self, saga_type, event)  # type: ignore[no-any-return]
        held = _held.get()
        span = _unsampled_remote(event.headers)
        if span is None:
            queue = held.queue if held is not None and held.queue else f"saga:{saga_type}"
            attributes = _messaging("process", queue, event.id, event.type)
            attributes["sagas.saga.type"] = saga_type
            span = tracer.start_span(
                f"{event.type} process", context=_parent(event.headers), kind=SpanKind.CONSUMER, attributes=attributes
            )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            applied: Applied = handle(self, saga_type, event)
            span.set_attribute("sagas.outcome", applied.outcome)
            if applied.saga is not None:
                span.set_attributes({"sagas.saga.id": applied.saga.id, "sagas.saga.state": applied.saga.state})
            if applied.refused:
                span.set_status(Status(StatusCode.ERROR, f"refused: {applied.note}"[:500]))
            return applied
        except Exception as error:
            if held is None:
                _fail(span, error)
            else:
                given_back(span, error)
            raise
        finally:
            otel_context.detach(token)
            if held is None:
                span.end()
            else:
                held.spans.append(span)
                held.by_message[event.id] = span

    return traced  # type: ignore[return-value]


def transition(enter: F) -> F:
    """Decorates ``SagaEngine._enter(d, record, new_state, ...)``: an INTERNAL span per transition, under
    the current span or, with none (a deadline, an operator, the relay), under the saga's own trace. A
    saga's first traced transition stores its context in ``meta["trace"]``."""
    if trace is None:
        return enter

    @functools.wraps(enter)
    def traced(self: Any, d: Any, record: SagaRecord, new_state: str, *args: Any, **kwargs: Any) -> list[OutboxRow]:
        tracer = _tracer()
        if tracer is None:
            return enter(self, d, record, new_state, *args, **kwargs)  # type: ignore[no-any-return]
        parent = None
        current = trace.get_current_span().get_span_context()
        if not current.is_valid:
            unsampled = _unsampled_remote(record.meta.get(TRACE_META))
            if unsampled is not None:  # (a deadline's or an operator's transition of an unsampled saga)
                with trace.use_span(unsampled, end_on_exit=False):
                    return enter(self, d, record, new_state, *args, **kwargs)  # type: ignore[no-any-return]
            parent = _parent(record.meta.get(TRACE_META))
        elif _drops() and not current.trace_flags.sampled:  # (no span: the unsampled context stays current)
            if TRACE_META not in record.meta:
                record.meta = {**record.meta, TRACE_META: _context_here()}
            return enter(self, d, record, new_state, *args, **kwargs)  # type: ignore[no-any-return]
        with _Current(
            tracer.start_span(
                f"saga {record.type} {record.state or '-'} -> {new_state}",
                context=parent,
                attributes={
                    "sagas.saga.id": record.id,
                    "sagas.saga.type": record.type,
                    "sagas.saga.state": new_state,
                    "sagas.saga.from_state": record.state or "-",
                },
            )
        ) as span:
            if TRACE_META not in record.meta and span.get_span_context().is_valid:
                record.meta = {**record.meta, TRACE_META: _context_here()}
            rows: list[OutboxRow] = enter(self, d, record, new_state, *args, **kwargs)
            return rows

    return traced  # type: ignore[return-value]


def _context_here() -> dict[str, str]:
    """The current trace context, as headers (a saga's ``meta["trace"]``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def deadline(fire: F) -> F:
    """Decorates ``SagaEngine.fire(record)``: an INTERNAL span ``saga <type> deadline`` under the saga's
    own trace (``meta["trace"]``); a re-sent request or the timeout's transition is under it."""
    if trace is None:
        return fire

    @functools.wraps(fire)
    def traced(self: Any, record: SagaRecord) -> list[OutboxRow]:
        tracer = _tracer()
        if tracer is None:
            return fire(self, record)  # type: ignore[no-any-return]
        unsampled = _unsampled_remote(record.meta.get(TRACE_META))
        if unsampled is not None:  # (no span: what the deadline sends carries the saga's unsampled context)
            with trace.use_span(unsampled, end_on_exit=False):
                return fire(self, record)  # type: ignore[no-any-return]
        with _Current(
            tracer.start_span(
                f"saga {record.type} deadline",
                context=_parent(record.meta.get(TRACE_META)),
                attributes={
                    "sagas.saga.id": record.id,
                    "sagas.saga.type": record.type,
                    "sagas.saga.state": record.state,
                    "sagas.attempt": record.attempts,
                },
            )
        ) as span:
            rows: list[OutboxRow] = fire(self, record)
            span.set_attribute("sagas.messages", len(rows))
            if rows:  # (a re-sent request is the same message as before: its spans stay under its publish)
                span.set_attribute("sagas.message_ids", [row.message_id for row in rows])
            return rows

    return traced  # type: ignore[return-value]


# -- logs -------------------------------------------------------------------------------------------------


def ids(span: Any) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of ``span`` (ended or not) for a log line about its message, written
    where the span is no longer current; nothing without a span that records."""
    if span is None:
        return {}
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def add_trace_ids(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span, when one records."""
    if trace is None:
        return event_dict
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


__all__ = [
    "ENABLED",
    "TRACE_META",
    "Held",
    "add_trace_ids",
    "deadline",
    "end",
    "given_back",
    "handler_finished",
    "handler_started",
    "ids",
    "outgoing",
    "reply_cache",
    "republished",
    "saga_message",
    "set_system",
    "set_tracer_provider",
    "settled",
    "transition",
    "within",
]
