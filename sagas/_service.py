"""Services and their handlers.

Decorators only record a handler; nothing subscribes at import time. A :class:`Worker` finds the
handlers of every service in an :class:`App` when it starts.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from transport import (
    DEFAULT_PREFETCH,
    Event,
    EventTooLarge,
    InvalidEvent,
    InvalidEventName,
    Subscription,
    validate_pattern,
)

from . import _tracing
from ._errors import ConfigurationError
from ._protocol import follow_up_id
from ._retention import Retention, check_retention
from ._types import Handler

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")


class Delivery(enum.StrEnum):
    """The delivery guarantee of one subscription."""

    #: Acked just before the handler runs, on an auto-delete queue: delivered zero or one time. Nothing
    #: is kept while no instance is connected, and nothing is redelivered after a crash.
    AT_MOST_ONCE = "at-most-once"
    #: Acked after the handler returns, on a durable quorum queue: delivered until a handler returns,
    #: retried with backoff, then dead-lettered with the error. A handler may see an event twice.
    AT_LEAST_ONCE = "at-least-once"


AT_MOST_ONCE = Delivery.AT_MOST_ONCE
AT_LEAST_ONCE = Delivery.AT_LEAST_ONCE


#: Errors that another attempt cannot fix, so a handler that raises one is not retried (``Retry.give_up_on``):
#: a follow-up or reply that cannot be encoded (``InvalidEvent``: not JSON, say a ``datetime``; or
#: ``EventTooLarge``), an invalid event name, and a ``TypeError`` (a bug in the code, not a passing fault).
DEFAULT_PERMANENT: tuple[type[BaseException], ...] = (InvalidEvent, InvalidEventName, EventTooLarge, TypeError)


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry policy of an at-least-once handler: ``attempts`` in all, waiting ``initial * factor**n``
    seconds (at most ``maximum``) between them, then the message goes to the dead-letter queue.

    An error that is an instance of one of ``give_up_on`` (default :data:`DEFAULT_PERMANENT`) is
    permanent: it is not retried. The message is dead-lettered with it at once, and a request handler
    answers with a failure reply at once. Extend it with ``give_up_on=(*DEFAULT_PERMANENT, MyError)``."""

    attempts: int = 5
    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    give_up_on: tuple[type[BaseException], ...] = DEFAULT_PERMANENT

    def __post_init__(self) -> None:
        for name in ("attempts", "initial", "factor", "maximum"):
            value = getattr(self, name)
            whole = name == "attempts"
            if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
                kind = "a whole number" if whole else "a number"
                raise ConfigurationError(f"Retry.{name} is {kind}, not {value!r}")
        if self.attempts < 1:
            raise ConfigurationError("Retry.attempts must be at least 1 (1 means: never retry)")
        if self.initial <= 0 or self.factor < 1 or self.maximum < self.initial:
            raise ConfigurationError("Retry needs initial > 0, factor >= 1 and maximum >= initial")
        if not isinstance(self.give_up_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.give_up_on
        ):
            raise ConfigurationError(
                "Retry.give_up_on must be a tuple of exception classes, e.g. (*DEFAULT_PERMANENT, MyError)"
            )

    def gives_up(self, error: BaseException) -> bool:
        """Whether ``error`` is permanent under this policy (an instance of one of ``give_up_on``)."""
        return isinstance(error, self.give_up_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.initial * self.factor ** (attempt - 1), self.maximum))

    @property
    def delays(self) -> tuple[float, ...]:
        return tuple(self.delay(a) for a in range(1, self.attempts))


class Context:
    """What a handler gets besides the event: who it is, the attempt, a logger, and a way to publish
    follow-up events. Follow-ups carry the event's correlation id and have it as causation id. They are
    sent with pipelined confirms after the handler returns and before the message is acked, so they
    go out only if the handler succeeds."""

    __slots__ = ("attempt", "event", "handler", "log", "outbox", "service")

    def __init__(self, event: Event, service: str, handler: str, attempt: int) -> None:
        self.event = event
        self.service = service
        self.handler = handler
        self.attempt = attempt
        self.outbox: list[Event] = []
        self.log = structlog.get_logger(f"sagas.handler.{service}")

    def publish(
        self, type: str, payload: Mapping[str, Any] | None = None, *, headers: Mapping[str, str] | None = None
    ) -> Event:
        """Queue a follow-up event; returns it (with its id).

        The id is derived from the handled event's id, this handler and the follow-up's position, so a
        handler that runs again for the same event publishes the same ids, and receivers' inboxes can
        drop the repeats."""
        event_id = follow_up_id(self.event.id, f"{self.service}.{self.handler}", len(self.outbox))
        event = Event(
            type=type,
            payload=payload or {},
            source=self.service,
            id=event_id,
            correlation_id=self.event.correlation_id,
            causation_id=self.event.id,
            headers=_tracing.outgoing(type, event_id, headers or {}),
        )
        self.outbox.append(event)
        return event


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A handler as a decorator recorded it."""

    service: str
    name: str
    fn: Callable[..., Any]
    patterns: tuple[str, ...]
    delivery: Delivery
    retry: Retry
    idempotent: bool
    broadcast: bool
    prefetch: int
    wants_context: bool
    concurrency: int | None = None
    #: an ``async def`` handler: run on the worker's event loop, not on its thread pool
    is_async: bool = False
    #: a request handler (``@svc.handles``): its return value is the reply
    replies: bool = False
    cache_replies: bool = False
    #: stable identity of the handler: ``service.name`` (the inbox is keyed by it; read several times per
    #: message, so it is built once)
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.service}.{self.name}")

    def subscription(self, exchange: str, instance: str) -> Subscription:
        queue = f"{exchange}.{self.service}.{self.name}"
        if self.broadcast:
            queue = f"{queue}.{instance}"
        durable = self.delivery is Delivery.AT_LEAST_ONCE
        return Subscription(
            queue=queue,
            patterns=self.patterns,
            durable=durable,
            exclusive=self.broadcast,
            prefetch=self.prefetch,
            retry_delays=self.retry.delays if durable else (),
        )


class Service:
    """A named service whose handlers react to events.

    Every running instance of a service shares each handler's queue, so instances compete for the
    work; different services each get every event they subscribe to.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"invalid service name {name!r}: use 1-63 lowercase letters, digits, '_' or '-', starting with a letter"
            )
        self.name = name
        self._handlers: dict[str, HandlerSpec] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    @property
    def handlers(self) -> tuple[HandlerSpec, ...]:
        return tuple(self._handlers.values())

    def on(
        self,
        *patterns: str,
        delivery: Delivery | str = Delivery.AT_LEAST_ONCE,
        retry: Retry | None = None,
        idempotent: bool = False,
        broadcast: bool = False,
        name: str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        concurrency: int | None = None,
        _replies: bool = False,
        _cache_replies: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a handler for events matching one or more ``patterns`` (``*`` one word, ``#`` zero or more).

        The handler is ``fn(event)`` or ``fn(event, ctx)``, a plain function (run on the worker's thread
        pool) or an ``async def`` one (run on the worker's event loop, with the same guarantees).
        Options: ``delivery`` (at-least-once by default), ``retry`` (a :class:`Retry`), ``idempotent``
        (skip events whose id this handler already handled, through the inbox store), ``broadcast``
        (every instance gets every event; at-most-once only), ``name`` (the queue name part, default the function name),
        ``prefetch`` (messages the broker sends ahead), ``concurrency`` (at most this many calls of the
        handler at once in one worker; default: the worker's pool size).
        The function is returned unchanged.
        """
        if not patterns or callable(patterns[0]):
            raise ConfigurationError(
                f"@{self.name}.on needs the event name or pattern to subscribe to, "
                f"e.g. @{self.name}.on('ocis.sharing.share_created')"
            )
        all_patterns = patterns
        for p in all_patterns:
            validate_pattern(p)
        try:
            mode = Delivery(delivery)
        except ValueError:
            raise ConfigurationError(
                f"delivery must be one of {', '.join(d.value for d in Delivery)}, not {delivery!r}"
            ) from None
        if broadcast and mode is Delivery.AT_LEAST_ONCE:
            raise ConfigurationError(
                "broadcast handlers get a transient queue per instance: declare them with delivery=AT_MOST_ONCE"
            )
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"retry= takes a sagas.Retry, e.g. retry=Retry(attempts=5), not {retry!r}")
        for flag, value in (("idempotent", idempotent), ("broadcast", broadcast)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag}= is True or False, not {value!r}")
        for option, number in (("prefetch", prefetch), ("concurrency", concurrency)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
                raise ConfigurationError(f"{option}= is a whole number, not {number!r}")
        if retry is not None and mode is Delivery.AT_MOST_ONCE:
            raise ConfigurationError("at-most-once handlers are never retried; drop the retry= option")
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        if concurrency is not None and concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1 (or None for the worker's pool size)")

        def register(fn: Handler) -> Handler:
            hname: str = name or str(getattr(fn, "__name__", ""))
            if not _NAME_RE.fullmatch(hname):
                raise ConfigurationError(f"invalid handler name {hname!r}: pass name='...' (lowercase)")
            if hname in self._handlers:
                raise ConfigurationError(f"service {self.name!r} already has a handler named {hname!r}")
            self._handlers[hname] = HandlerSpec(
                service=self.name,
                name=hname,
                fn=fn,
                patterns=all_patterns,
                delivery=mode,
                retry=retry or Retry(),
                idempotent=idempotent,
                broadcast=broadcast,
                prefetch=prefetch,
                wants_context=_arity(fn) >= 2,
                concurrency=concurrency,
                is_async=_is_async(fn),
                replies=_replies,
                cache_replies=_cache_replies,
            )
            return fn

        return register

    def handles(
        self,
        request: str,
        *,
        cache_replies: bool = True,
        retry: Retry | None = None,
        name: str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        concurrency: int | None = None,
    ) -> Callable[[Handler], Handler]:
        """Declare the handler of a saga's request (``fn(event)`` or ``fn(event, ctx)``; ``async def`` too).

        Its return value (a JSON object, or None) becomes the success reply. Raising :class:`Failure`
        answers with a failure reply at once, and so does an error in ``retry.give_up_on`` (a reply
        that is not JSON, a TypeError: see :data:`DEFAULT_PERMANENT`). Any other exception is retried
        (at-least-once, with ``retry``) and becomes a failure reply once the retries run out. With
        ``cache_replies`` (the default), the reply is kept by request id, so a re-sent request gets the
        same reply without the work running again.
        """
        if not isinstance(request, str):
            raise ConfigurationError(
                f"@{self.name}.handles needs the request type it answers, "
                f"e.g. @{self.name}.handles('ocis.antivirus.scan')"
            )
        validate_pattern(request)
        if "*" in request or "#" in request:
            raise ConfigurationError("@handles takes one request type, not a pattern")
        return self.on(
            request,
            retry=retry,
            name=name,
            prefetch=prefetch,
            concurrency=concurrency,
            _replies=True,
            _cache_replies=cache_replies,
        )


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a coroutine function (``async def``, a partial of one, or an object whose
    ``__call__`` is one). An async generator is refused: a handler returns one reply, it does not yield."""
    call = None if inspect.isroutine(fn) else getattr(type(fn), "__call__", None)  # noqa: B004
    if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(call):
        raise ConfigurationError(
            f"handler {getattr(fn, '__qualname__', fn)!r} is an async generator: declare it 'async def' and return"
        )
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    if not 1 <= len(positional) <= 2:
        raise ConfigurationError(f"handler {getattr(fn, '__qualname__', fn)!r} must take (event) or (event, ctx)")
    return len(positional)


@dataclass
class App:
    """The services one worker process runs (``sagas run module:app``)."""

    services: list[Service] = field(default_factory=list)
    exchange: str = "sagas"
    sagas: list[type[Any]] = field(default_factory=list)
    #: how long the store keeps what it no longer needs (see :class:`sagas.Retention`)
    retention: Retention = field(default_factory=Retention)
    #: ended sagas' windows of the saga types that set ``keep_finished``, by type
    keep_finished: dict[str, float] = field(default_factory=dict)

    def __init__(
        self,
        *services: Service,
        sagas: Sequence[type[Any]] = (),
        exchange: str = "sagas",
        retention: Retention | None = None,
    ) -> None:
        for service in services:
            if not isinstance(service, Service):
                raise ConfigurationError(
                    f"App takes services as arguments, App(svc1, svc2, sagas=[...]), not {type(service).__name__}"
                )
        if isinstance(sagas, type) or not all(isinstance(s, type) for s in sagas):
            raise ConfigurationError("App(sagas=...) takes a list of saga classes, e.g. sagas=[Postprocessing]")
        names = [s.name for s in services]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigurationError(f"services named more than once: {', '.join(sorted(dupes))}")
        self.services = list(services)
        self.sagas = list(sagas)
        self.exchange = exchange
        for saga in self.sagas:
            saga.definition()  # a wrong definition fails here, at start-up, with what to fix
        if retention is not None and not isinstance(retention, Retention):
            raise ConfigurationError(f"retention= takes a sagas.Retention, not {type(retention).__name__}")
        self.retention = retention or Retention()
        self.keep_finished = check_retention(self.retention, self.sagas)

    @property
    def handlers(self) -> list[HandlerSpec]:
        return [h for s in self.services for h in s.handlers]
