"""Retry and dead-letter copies of a message, and the dead-letter queue: browsing, replaying and dropping.

A message is never sent back or parked by a reject: a copy goes to the subscription's delay queue (a
retry, with the attempt count raised) or to the dead-letter queue (with the reason and the error in its
headers), and only once the broker confirmed that copy may the original be acked. The copy keeps the
original headers when they fit, and always the routing key the message was first published with, so a
replay puts it back where it came from and a letter that dies again still names its event.
"""

from __future__ import annotations

import sys
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from amqp.serialization import dumps as amqp_table
from kombu.message import Message

from ._connection import ConnectionLost, FailoverConnection, close_channel_quietly, is_connection_error
from ._consumer import ATTEMPT_HEADER, Inbound, int_header, to_message
from ._errors import PublishError, TransportError, Unroutable
from ._publisher import Outgoing, Publisher
from ._topology import Subscription, delay_queue

log = structlog.get_logger("transport")

#: Headers a dead letter carries.
DL_QUEUE = "x-sagas-queue"
DL_REASON = "x-sagas-reason"
DL_ERROR_TYPE = "x-sagas-error-type"
DL_ERROR_MESSAGE = "x-sagas-error-message"
DL_TRACEBACK = "x-sagas-traceback"
DL_ATTEMPTS = "x-sagas-attempts"
DL_DEAD_AT = "x-sagas-dead-at"
DL_ROUTING_KEY = "x-sagas-routing-key"
#: Set on a retry or dead-letter copy that could not carry the original headers (too big; see below).
DL_HEADERS_DROPPED = "x-sagas-headers-dropped"
# What a replay drops. The original routing key stays, so a letter that dies again still names its event.
_DL_HEADERS = (
    DL_QUEUE,
    DL_REASON,
    DL_ERROR_TYPE,
    DL_ERROR_MESSAGE,
    DL_TRACEBACK,
    DL_ATTEMPTS,
    DL_DEAD_AT,
    ATTEMPT_HEADER,
)
#: What RabbitMQ adds to a message it dead-letters or redelivers; a replay drops it too.
_BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
)
_MAX_TRACEBACK = 4000
#: How much of a dead letter's body :class:`DeadLetter` carries, to show.
_MAX_BODY_SHOWN = 64 * 1024
#: A retry or dead-letter copy carries the original headers only up to this encoded size. A copy's
#: headers must fit in one AMQP frame (128 KiB on RabbitMQ) together with the framework's own: a copy
#: that did not broke the connection, and the message and every one prefetched with it came back, until
#: the delivery limit dead-lettered them all.
_MAX_COPIED_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue, as ``sagas dead ls`` shows it."""

    id: str
    queue: str
    routing_key: str
    reason: str
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    dead_at: str
    content_type: str
    size: int
    #: the message body as text (UTF-8, invalid bytes replaced), up to 64 KiB
    body: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


class DeadLetterOffice:
    """Copies messages to delay queues and to the dead-letter queue, and reads that queue back.

    Copies go out through ``publisher``; ``declare`` declares a subscription's topology again when a
    copy finds its queue missing (deleted by hand). Acking the original is left to the caller, after
    the copy methods return.
    """

    def __init__(
        self,
        link: FailoverConnection,
        publisher: Publisher,
        *,
        exchange: str,
        dead_queue: str,
        declare: Callable[[Subscription], None],
    ) -> None:
        self._link = link
        self._publisher = publisher
        self._exchange = exchange
        self._dead_queue = dead_queue
        self._declare = declare

    def copy_to_retry(self, inbound: Inbound, delay: float, *, count_attempt: bool = True) -> None:
        """Copy the message, with the attempt count raised (kept with ``count_attempt=False``: a copy
        held back, not a failure), to its subscription's delay queue for ``delay`` seconds; return once
        the copy is confirmed."""
        sub = inbound.subscription
        if not sub.durable:
            raise TransportError("at-most-once messages are not retried")
        headers = _copyable(inbound.message.headers)
        headers.pop("x-delivery-count", None)
        headers[ATTEMPT_HEADER] = inbound.attempt + 1 if count_attempt else inbound.attempt
        self._keep_routing_key(inbound, headers)
        self._copy(inbound, delay_queue(sub.queue, delay), headers)

    def copy_to_dead(self, inbound: Inbound, reason: str, error: BaseException | None) -> None:
        """Copy the message, with ``reason`` and ``error`` in its headers, to the dead-letter queue;
        return once the copy is confirmed."""
        headers = _copyable(inbound.message.headers)
        headers.pop("x-delivery-count", None)
        for forged in (DL_ERROR_TYPE, DL_ERROR_MESSAGE, DL_TRACEBACK):  # only ever the framework's own
            headers.pop(forged, None)
        headers.update(
            {
                DL_QUEUE: inbound.subscription.queue,
                DL_REASON: reason[:1000],
                DL_ATTEMPTS: inbound.attempt,
                DL_DEAD_AT: datetime.now(UTC).isoformat(),
            }
        )
        self._keep_routing_key(inbound, headers)
        if error is not None:
            headers[DL_ERROR_TYPE] = public_name(type(error))
            headers[DL_ERROR_MESSAGE] = str(error)[:1000]
            tb = "".join(traceback.format_exception(error, limit=-8))
            headers[DL_TRACEBACK] = tb[-_MAX_TRACEBACK:]
        self._copy(inbound, self._dead_queue, headers)

    def _keep_routing_key(self, inbound: Inbound, headers: dict[str, Any]) -> None:
        """Record the routing key the message was first published with. A message straight from the events
        exchange has its own; one back from a delay queue or a replay keeps what was recorded then."""
        info = inbound.message.delivery_info or {}
        if info.get("exchange") == self._exchange or DL_ROUTING_KEY not in headers:
            headers[DL_ROUTING_KEY] = str(info.get("routing_key", ""))[:255]

    def _copy(self, inbound: Inbound, queue: str, headers: dict[str, Any]) -> None:
        """Publish a copy of ``inbound`` to ``queue`` (default exchange, mandatory) and wait for the
        confirm. If the queue went missing (deleted by hand), declare the topology again and retry once."""
        message = inbound.message
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        mid = inbound.message_id or f"dl-{uuid.uuid4().hex}"
        item: Outgoing = ("", queue, body, mid, headers, True)
        try:
            try:
                self._publisher.publish([item], None, content_type=message.content_type or "")
            except Unroutable:
                log.warning("bus.queue_missing", queue=queue, action="declaring the topology again")
                self._declare(inbound.subscription)
                self._publisher.publish([item], None, content_type=message.content_type or "")
        except PublishError as exc:
            if self._link.current is None:
                raise ConnectionLost(str(exc)) from None
            raise

    def browse(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first. They stay in the queue."""
        with self._channel() as ch:  # (closing it puts the unacked messages back in the queue)
            return [_dead_letter_of(m) for m in self._browse(ch, limit)]

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        """A channel for one dead-letter operation, closed after it.

        A bus used only for these operations (a console, a CLI command) sends no heartbeats between
        them, so the broker may have closed its idle connection: a connection found broken when the
        channel opens is dropped and opened again, once, before anything is done. One that breaks during
        the operation is dropped too, and raises :class:`ConnectionLost`: the next operation connects
        again instead of failing on the same dead socket."""
        with self._link.lock:
            try:
                ch = self._link.live().channel()
            except Exception as exc:
                conn = self._link.current
                if conn is None or not is_connection_error(conn, exc):
                    raise
                self._link.lost(exc)
                ch = self._link.live().channel()
            try:
                yield ch
            except TransportError:
                raise
            except Exception as exc:
                conn = self._link.current
                if conn is not None and is_connection_error(conn, exc):
                    raise self._link.lost(exc) from None
                raise
            finally:
                if self._link.current is not None:
                    close_channel_quietly(ch)

    def _browse(self, ch: Any, limit: int) -> Iterator[Message]:
        """Get up to ``limit`` dead letters on ``ch`` without acking them."""
        for _ in range(limit):
            message = ch.basic_get(self._dead_queue, no_ack=False)
            if message is None:
                return
            yield to_message(ch, message)[0]

    def replay(self, ids: Iterable[str] | None, *, timeout: float | None, skipped: dict[str, str] | None) -> list[str]:
        """Put dead letters back on the queue they came from, with a fresh attempt count.

        ``ids=None`` replays all. Returns the ids replayed. Each is acked off the dead-letter queue
        only after its copy was confirmed. A letter whose queue no longer exists stays in the
        dead-letter queue; its id and the reason go into ``skipped`` if given.
        """
        wanted = None if ids is None else set(ids)
        replayed: list[str] = []
        with self._channel() as ch:
            depth = ch.queue_declare(queue=self._dead_queue, passive=True).message_count
            for message in self._browse(ch, depth):
                dl = _dead_letter_of(message)
                if wanted is not None and dl.id not in wanted:
                    continue
                if not dl.queue:
                    if skipped is not None:
                        skipped[dl.id] = "it does not say which queue it came from"
                    continue
                headers = {
                    k: v
                    for k, v in (message.headers or {}).items()
                    if k not in _DL_HEADERS and k not in _BROKER_HEADERS
                }
                body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
                try:
                    self._publisher.publish(
                        [("", dl.queue, body, dl.id, headers, True)],
                        timeout,
                        content_type=message.content_type or "",
                    )
                except Unroutable:
                    if skipped is not None:
                        skipped[dl.id] = f"its queue {dl.queue!r} does not exist (any more)"
                    continue
                message.ack()
                replayed.append(dl.id)
        return replayed

    def drop(self, ids: Iterable[str] | None) -> list[str]:
        """Delete dead letters for good (``ids``, or all with None). Returns the ids deleted."""
        wanted = None if ids is None else set(ids)
        dropped: list[str] = []
        with self._channel() as ch:  # (closing it puts the letters kept back in the queue)
            depth = ch.queue_declare(queue=self._dead_queue, passive=True).message_count
            for message in self._browse(ch, depth):
                letter_id = str(message.properties.get("message_id") or "")
                if wanted is None or letter_id in wanted:
                    message.ack()
                    dropped.append(letter_id)
        return dropped


def public_name(cls: type) -> str:
    """A class's name as its users import it: ``transport.EventTooLarge`` for a class defined in the
    private ``transport._errors`` and exported by ``transport`` (the nearest public package that exports
    that very class), else its defining ``module.qualname``."""
    module = cls.__module__
    parts = module.split(".")
    if any(p.startswith("_") for p in parts[1:]):
        for end in range(len(parts) - 1, 0, -1):
            package = ".".join(parts[:end])
            if any(p.startswith("_") for p in parts[1:end]):
                continue
            if getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
                return f"{package}.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def _copyable(headers: Mapping[Any, Any] | None) -> dict[Any, Any]:
    """The headers a copy of a message carries: the original ones, unless they are too big to travel with
    the framework's own (``_MAX_COPIED_HEADERS``); then only its routing key, and a note."""
    original = dict(headers or {})
    try:
        size = len(amqp_table("F", [original]))
    except Exception:  # noqa: BLE001 - headers that cannot be encoded again cannot travel either
        size = -1
    if 0 <= size <= _MAX_COPIED_HEADERS:
        return original
    kept: dict[Any, Any] = {DL_HEADERS_DROPPED: f"the original headers ({size} bytes encoded) were too big to copy"}
    routing_key = original.get(DL_ROUTING_KEY)
    if isinstance(routing_key, str) and len(routing_key) <= 255:
        kept[DL_ROUTING_KEY] = routing_key
    return kept


def _dead_letter_of(message: Message) -> DeadLetter:
    h = message.headers or {}
    deaths = h.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    queue = str(h.get(DL_QUEUE) or death.get("queue") or "")
    reason = str(h.get(DL_REASON) or (f"broker dead-lettered it: {death.get('reason')}" if death else ""))
    if not h.get(DL_REASON) and death.get("reason") == "delivery_limit":
        reason = "delivered too many times without an ack (worker crash loop?)"
    body = message.body or b""
    keys = death.get("routing-keys")
    routing_key = str(h.get(DL_ROUTING_KEY) or (keys[0] if isinstance(keys, list) and keys else ""))
    return DeadLetter(
        id=str(message.properties.get("message_id") or ""),
        queue=queue,
        routing_key=routing_key,
        reason=reason,
        error_type=str(h.get(DL_ERROR_TYPE, "")),
        error_message=str(h.get(DL_ERROR_MESSAGE, "")),
        traceback=str(h.get(DL_TRACEBACK, "")),
        attempts=int_header(h.get(DL_ATTEMPTS), 0),
        dead_at=str(h.get(DL_DEAD_AT, "")),
        content_type=str(message.content_type or ""),
        size=len(body),
        body=bytes(body[:_MAX_BODY_SHOWN]).decode("utf-8", "replace")
        if isinstance(body, bytes | bytearray | memoryview)
        else str(body)[:_MAX_BODY_SHOWN],
    )
