"""The event bus: one connection to the broker, publishing with confirms, consuming with acks.

An :class:`EventBus` is not thread-safe for consuming: the thread that calls :meth:`EventBus.consume`
and :meth:`EventBus.drain` must also do every ack, retry and dead-letter, because neither kombu nor
py-amqp is thread-safe. Publishing is guarded by a lock, so a bus used only to publish can be shared.

Safe defaults, set here:

* every message is persistent (``delivery_mode=2``) and JSON;
* every publish waits for the broker's confirm, with a timeout; batches pipeline their confirms;
* nothing is ever acked unless it was handled, or copied to a retry or dead-letter queue and that copy
  was confirmed.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from amqp.serialization import dumps as amqp_table
from kombu.connection import Connection
from kombu.message import Message

from . import _memory
from ._envelope import CONTENT_TYPE, DEFAULT_MAX_EVENT_SIZE, Event, decode, encode
from ._errors import (
    BrokerUnavailable,
    DecodeError,
    PublishError,
    PublishTimeout,
    TopologyMismatch,
    TransportError,
    Unroutable,
)
from ._frames import frame_handler
from ._topology import Subscription, dead_queue, declare, delay_queue

log = structlog.get_logger("transport")

#: AMQP header with the attempt number of a retried message (1 for the first delivery).
ATTEMPT_HEADER = "x-sagas-attempt"
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
_MAX_TRACEBACK = 4000
#: kombu decompresses a body whose AMQP header ``compression`` names a codec as it builds the message,
#: before any size check: a few KiB of zlib become gigabytes. The bus takes the header off first, and
#: refuses the message.
_COMPRESSION = "compression"
#: The highest attempt number a message's headers can claim (a forged count must not break anything).
_MAX_ATTEMPT = 1_000_000
#: A retry or dead-letter copy carries the original headers only up to this encoded size. A copy's
#: headers must fit in one AMQP frame (128 KiB on RabbitMQ) together with the framework's own: a copy
#: that did not broke the connection, and the message and every one prefetched with it came back, until
#: the delivery limit dead-lettered them all.
_MAX_COPIED_HEADERS = 64 * 1024
#: one message to send: (exchange, routing key, body, message id, AMQP headers, mandatory)
_Outgoing = tuple[str, str, bytes, str, dict[str, Any], bool]


class ConnectionLost(TransportError):
    """The connection to the broker broke; reconnect and consume again."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (each host of a ``;``-separated list)."""
    parts = []
    for one in url.split(";"):
        try:
            u = urlsplit(one)
            if u.password is not None:
                host = u.hostname or ""
                if u.port:
                    host = f"{host}:{u.port}"
                one = urlunsplit(u._replace(netloc=f"{u.username or ''}:***@{host}"))
        except ValueError:
            one = "<unparseable url>"
        parts.append(one)
    return ";".join(parts)


def is_memory_url(url: str) -> bool:
    return url.startswith("memory://")


@dataclass(slots=True)
class Inbound:
    """A message received on a subscription. ``event`` is None when it could not be decoded."""

    subscription: Subscription
    message: Message
    event: Event | None
    error: str | None
    attempt: int
    received_at: float
    acked: bool = False

    @property
    def message_id(self) -> str:
        mid = self.message.properties.get("message_id")
        return str(mid) if mid else ""


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

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


class _Confirms:
    """Pipelined publisher confirms on a py-amqp channel (``confirm_select`` + ``basic_ack`` events)."""

    def __init__(self, channel: Any) -> None:
        self.seq = 0
        self.pending: dict[int, str] = {}
        self.failed: dict[str, str] = {}
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)

    def sent(self, message_id: str) -> int:
        self.seq += 1
        self.pending[self.seq] = message_id
        return self.seq

    def _settle(self, tag: int, multiple: bool, failure: str | None) -> None:
        if multiple:
            for seq in [s for s in self.pending if s <= tag]:
                mid = self.pending.pop(seq)
                if failure:
                    self.failed[mid] = failure
        else:
            mid = self.pending.pop(tag, "")
            if failure and mid:
                self.failed[mid] = failure

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, "the broker refused the message (nack)")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        mid = message.properties.get("message_id", "")
        self.failed[mid] = f"unroutable: no queue is bound to {exchange!r} for {routing_key!r}"


class EventBus:
    """A connection to the event bus: ``memory://`` or ``amqp://`` (``amqps://`` for TLS).

    ``url`` may list several brokers separated by ``;`` for fail-over. Nothing connects until
    :meth:`connect` (or the first publish).
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        exchange: str = "sagas",
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        heartbeat: float = 30.0,
        ssl: bool | Mapping[str, Any] | None = None,
        confirm_window: int = 1000,
        memory_transport: type[Any] | None = None,
    ) -> None:
        if not exchange or not exchange.replace(".", "").replace("-", "").replace("_", "").isalnum():
            raise TransportError(f"invalid exchange name {exchange!r}: use letters, digits, '.', '-' and '_'")
        self.url = url
        self.exchange = exchange
        self.dead_queue = dead_queue(exchange)
        self.max_event_size = max_event_size
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.ssl = ssl
        self.confirm_window = confirm_window
        self.memory = is_memory_url(url)
        #: the kombu transport class behind ``memory://`` (an isolated broker, for :mod:`sagas.testing`)
        self.memory_transport = memory_transport or _memory.Transport
        #: the brokers of a ``;``-separated URL, tried in turn (fail-over); ``_next_host`` goes first
        self._hosts = [h for h in url.split(";") if h] or [url]
        self._next_host = 0
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._pub: Any = None
        self._confirms: _Confirms | None = None
        self._consume_ch: Any = None
        self._consumer_tags: list[str] = []
        #: delivery tags received on the consume channel (RabbitMQ), oldest first, until known settled,
        #: and the tags settled out of order that are still in it: :meth:`ack_many` uses them to ack a run
        #: of the oldest messages with one ``multiple`` ack. None: not tracked (memory://, or too many
        #: unsettled on this channel; then every ack is single until the next channel).
        self._delivered: deque[int] | None = None
        self._settled: set[int] = set()
        #: every queue this bus declared (operators and tests use it to clean up)
        self.declared_queues: set[str] = set()

    # -- connection ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"EventBus({redact_url(self.url)!r}, exchange={self.exchange!r})"

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._pub is not None

    def _new_connection(self, connect_timeout: float | None = None) -> Connection:
        if self.memory:
            return Connection("memory://", transport=self.memory_transport)
        host = self._hosts[self._next_host % len(self._hosts)]
        return Connection(
            host,
            heartbeat=self.heartbeat,
            connect_timeout=self.connect_timeout if connect_timeout is None else connect_timeout,
            # A copy per connection: kombu fills a None server_hostname in with the host it connects to,
            # in place, which pinned the first host's name for every other host of a ';'-separated URL.
            ssl=dict(self.ssl) if isinstance(self.ssl, Mapping) else self.ssl,
            transport_options={"confirm_publish": False, "frame_handler": frame_handler},
        )

    def connect(self, timeout: float | None = None) -> None:
        """Connect, retrying with backoff for up to ``timeout`` seconds; raise :class:`BrokerUnavailable`."""
        with self._lock:
            if self.connected:
                return
            deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
            delay = 0.1
            while True:
                conn = self._new_connection()
                try:
                    # One attempt per loop turn: kombu's own connect() would wait 2 s and retry.
                    conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
                    pub = self._declare_base(conn)
                    confirms = None if self.memory else _Confirms(pub)
                except Exception as exc:
                    _close_quietly(conn)
                    if not (_is_connection_error(conn, exc) or _login_refused(exc)):
                        raise
                    # Fail over: the next broker of the URL is tried at once; after a whole round, wait.
                    self._next_host += 1
                    if self._next_host % len(self._hosts) and time.monotonic() < deadline:
                        log.warning("bus.broker_unreachable", broker=redact_url(conn.as_uri()), error=str(exc))
                        continue
                    if time.monotonic() + delay > deadline:
                        raise BrokerUnavailable(f"cannot reach the broker at {redact_url(self.url)}: {exc}") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self._conn, self._pub, self._confirms = conn, pub, confirms
                log.debug("bus.connected", broker=redact_url(self.url), exchange=self.exchange)
                return

    def _declare_base(self, conn: Connection) -> Any:
        """Declare the exchange and the dead-letter queue on a new channel of ``conn``; return the channel.

        The dead-letter queue is a classic queue, which lives on one node of a cluster. While that node
        is down, RabbitMQ refuses its declaration (404, "home node ... is down or inaccessible"): the
        bus connects anyway and works, and only dead-lettering waits for the node to come back.
        """
        pub = conn.channel()
        try:
            self.declared_queues.update(declare(pub, self.exchange))
        except Exception as exc:
            if not _queue_node_down(exc):
                raise
            log.warning("bus.dead_letter_queue_unavailable", queue=self.dead_queue, error=str(exc))
            pub = conn.channel()  # the broker closed the channel that got the error
            declare(pub, self.exchange, dead=False)
        return pub

    def close(self) -> None:
        """Close the connection. Unacked messages go back to their queues (broker side)."""
        with self._lock:
            conn, self._conn, self._pub, self._confirms = self._conn, None, None, None
            self._consume_ch = None
            self._consumer_tags = []
            if conn is not None:
                _close_quietly(conn)

    def __enter__(self) -> EventBus:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lost(self, exc: BaseException) -> ConnectionLost:
        self.close()
        self._next_host += 1  # reconnect to the next broker first, in case this one is going down
        return ConnectionLost(f"connection to {redact_url(self.url)} lost: {exc}")

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        conn = self._conn or self._new_connection()
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    def health(self, timeout: float = 5.0) -> bool:
        """Whether the broker answers within ``timeout`` seconds (opens a channel; declares nothing)."""
        if self.memory:
            return True
        conn = self._new_connection(connect_timeout=timeout)
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            conn.channel().close()
        except Exception as exc:
            if not (_is_connection_error(conn, exc) or _login_refused(exc)):
                raise
            return False
        finally:
            _close_quietly(conn)
        return True

    # -- publishing --------------------------------------------------------------------------------

    def publish(self, event: Event, *, mandatory: bool = False, timeout: float | None = None) -> None:
        """Publish ``event`` and return once the broker confirmed it.

        Raises :class:`PublishError` (or a subclass) if the broker refused it, did not confirm it within
        ``timeout`` (default ``publish_timeout``), or, with ``mandatory``, nobody is bound to receive it.
        """
        self.publish_many([event], mandatory=mandatory, timeout=timeout)

    def publish_many(self, events: Iterable[Event], *, mandatory: bool = False, timeout: float | None = None) -> None:
        """Publish several events with pipelined confirms; return once all are confirmed.

        On failure, :class:`PublishError` says which event ids were not confirmed; the others were.
        """
        self.publish_encoded(
            [(e.type, encode(e, self.max_event_size), e.id, mandatory) for e in events], timeout=timeout
        )

    def publish_encoded(self, items: Sequence[tuple[str, bytes, str, bool]], *, timeout: float | None = None) -> None:
        """Publish already-encoded events ``(routing key, body, message id, mandatory)`` with pipelined
        confirms, as an outbox relay does. Raises :class:`PublishError` whose ``failed`` maps the ids
        that were not taken to the reason; the others were confirmed."""
        self._publish_raw(
            [(self.exchange, rk, body, mid, {}, mandatory) for rk, body, mid, mandatory in items], timeout
        )

    def _publish_raw(self, items: Sequence[_Outgoing], timeout: float | None, content_type: str = CONTENT_TYPE) -> None:
        if not items:
            return
        limit = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            if not self.connected:
                try:
                    self.connect(timeout=max(0.0, min(self.connect_timeout, deadline - time.monotonic())))
                except BrokerUnavailable as exc:
                    raise PublishError(f"not published: {exc}") from None
            ch, confirms = self._pub, self._confirms
            ids = []
            unroutable: dict[str, str] = {}
            try:
                for exchange, routing_key, body, message_id, headers, mandatory in items:
                    message = ch.prepare_message(
                        body,
                        content_type=content_type,
                        content_encoding="utf-8",
                        headers=headers,
                        properties={"message_id": message_id, "delivery_mode": 2},
                    )
                    try:
                        ch.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                    except Unroutable as exc:  # raised at once by the memory transport
                        unroutable[message_id] = f"unroutable: {exc}"
                        continue
                    ids.append(message_id)
                    if confirms is not None:
                        confirms.sent(message_id)
                        if len(confirms.pending) >= self.confirm_window:
                            self._wait_confirms(confirms, deadline, self.confirm_window // 2)
                if confirms is not None:
                    self._wait_confirms(confirms, deadline, 0)
            except PublishTimeout:
                self.close()
                raise
            except Exception as exc:
                if self._conn is not None and _is_connection_error(self._conn, exc):
                    self.close()
                    raise PublishError(f"publish failed, the broker connection broke: {exc}") from None
                raise
            failed = dict(unroutable)
            if confirms is not None and confirms.failed:
                failed.update({i: confirms.failed.pop(i) for i in ids if i in confirms.failed})
                confirms.failed.clear()
            if failed:
                first = next(iter(failed.values()))
                cls = Unroutable if all(f.startswith("unroutable") for f in failed.values()) else PublishError
                raise cls(f"{len(failed)} of {len(items)} message(s) not taken by the broker: {first}", failed=failed)

    def _connection(self) -> Connection:
        """The live connection, connecting first if needed."""
        self.connect()
        if self._conn is None:
            raise ConnectionLost(f"not connected to {redact_url(self.url)}")
        return self._conn

    def _wait_confirms(self, confirms: _Confirms, deadline: float, until_pending: int) -> None:
        conn = self._connection()
        while len(confirms.pending) > until_pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout(
                    f"the broker did not confirm {len(confirms.pending)} message(s) in time; "
                    "they may or may not have been taken"
                )
            try:
                conn.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue

    # -- consuming ---------------------------------------------------------------------------------

    def declare(self, subscription: Subscription) -> None:
        """Declare the queue of ``subscription``, its bindings and its delay queues."""
        with self._lock:
            self.connect()
            self._declare(self._pub, subscription)

    def _declare(self, channel: Any, subscription: Subscription | None, *, dead: bool = True) -> None:
        try:
            self.declared_queues.update(declare(channel, self.exchange, subscription, dead=dead))
        except Exception as exc:
            conn = self._conn
            if conn is None or not isinstance(exc, tuple(conn.channel_errors)):
                raise
            self.close()  # the channel is closed by the broker after such an error
            code = getattr(exc, "code", None)
            if code == 406:
                raise TopologyMismatch(
                    f"{exc}. A queue or exchange already exists with other settings; changing them is a "
                    "migration: drain and delete the old queue, or give the handler a new name="
                ) from None
            if code == 403:
                raise TransportError(f"{exc}. The broker user lacks a permission (see docs/security.md)") from None
            raise TransportError(f"the broker refused to declare the topology: {exc}") from None

    def consume(self, subscriptions: Sequence[Subscription], on_message: Callable[[Inbound], None]) -> None:
        """Start consuming. ``on_message`` runs inside :meth:`drain`, on the calling thread."""
        ch = self._consume_ch = self._connection().channel()
        self._delivered = None if self.memory else deque()  # tags count from 1 again on a new channel
        self._settled = set()
        for sub in subscriptions:
            self._declare(ch, sub, dead=False)  # declared (or found unavailable) on connect
            ch.basic_qos(0, sub.prefetch, False)
            tag = f"{sub.queue}.{uuid.uuid4().hex[:8]}"
            ch.basic_consume(
                queue=sub.queue, no_ack=False, consumer_tag=tag, callback=self._receiver(ch, sub, on_message)
            )
            self._consumer_tags.append(tag)

    def cancel(self) -> None:
        """Stop receiving new messages; messages already received can still be acked."""
        ch, tags, self._consumer_tags = self._consume_ch, self._consumer_tags, []
        if ch is None:
            return
        for tag in tags:
            try:
                ch.basic_cancel(tag)
            except Exception as exc:
                if self._conn is None or not _is_connection_error(self._conn, exc):
                    raise

    def _receiver(self, ch: Any, sub: Subscription, on_message: Callable[[Inbound], None]) -> Callable[[Any], None]:
        max_size, exchange = self.max_event_size, self.exchange

        def receive(raw: Any) -> None:
            message, refused = _to_message(ch, raw)
            if self._delivered is not None:
                if len(self._delivered) < _MAX_TRACKED:
                    self._delivered.append(message.delivery_tag)
                else:  # a tag left out would be covered by a later multiple ack: stop batching instead
                    self._delivered = None
            headers = message.headers or {}
            attempt = _int(headers.get(ATTEMPT_HEADER), 1) + _int(headers.get("x-delivery-count"), 0)
            # Any publisher can set these headers: a forged count must not pick a delay level that does
            # not exist (that crashed the worker); at worst it shortens this message's own retries.
            attempt = min(max(attempt, 1), _MAX_ATTEMPT)
            event: Event | None = None
            error = refused
            if refused is None:
                try:
                    event = decode(message.body, message.content_type, max_size)
                except DecodeError as exc:
                    error = exc.reason
            info = message.delivery_info or {}
            if event is not None and info.get("exchange") == exchange and info.get("routing_key") != event.type:
                # Routing (and RabbitMQ's topic permissions) went by the routing key: a body claiming
                # another type would reach handlers that never subscribed to it.
                rk = str(info.get("routing_key"))[:255]
                error = f"routing key {rk!r} does not match the event type {event.type!r}"
                event = None
            on_message(Inbound(sub, message, event, error, attempt, time.monotonic()))

        return receive

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for broker traffic and dispatch it. Returns whether anything came.

        Raises :class:`ConnectionLost` if the connection broke.
        """
        conn = self._conn
        if conn is None:
            raise ConnectionLost("not connected")
        try:
            if not self.memory:
                conn.heartbeat_check()
            conn.drain_events(timeout=timeout)
            return True
        except TimeoutError:
            return False
        except Exception as exc:
            if _is_connection_error(conn, exc):
                raise self._lost(exc) from None
            raise

    def ack(self, inbound: Inbound) -> None:
        """Acknowledge a message: at-least-once after it was handled, at-most-once just before. Once only."""
        if not inbound.acked:
            self._settle(inbound.message.ack)
            inbound.acked = True
            delivered = self._delivered
            if delivered is not None and inbound.message.channel is self._consume_ch:
                self._settled.add(inbound.message.delivery_tag)
                while delivered and delivered[0] in self._settled:
                    self._settled.discard(delivered.popleft())

    def ack_many(self, inbounds: Sequence[Inbound]) -> None:
        """Acknowledge messages that were all handled. The longest run of the oldest unsettled deliveries
        that they make up goes in one ``multiple`` ack (a message received before them and still being
        handled stops the run); the rest are acked one by one. On ``memory://``, one by one."""
        delivered, settled = self._delivered, self._settled
        mine = (
            {}
            if delivered is None
            else {i.message.delivery_tag: i for i in inbounds if not i.acked and i.message.channel is self._consume_ch}
        )
        top: Inbound | None = None
        while len(mine) > 1 and delivered:
            tag = delivered[0]
            if tag in mine:
                top = mine[tag]
            elif tag in settled:
                settled.discard(tag)
            else:
                break  # still being handled, or kept unacked: a multiple ack must not cover it
            delivered.popleft()
        if top is not None:
            newest = top.message  # acked with every unsettled delivery before it on the channel
            last = newest.delivery_tag
            self._settle(lambda: newest.ack(multiple=True))
            for tag, inbound in mine.items():
                inbound.acked = inbound.acked or tag <= last
        for inbound in inbounds:
            self.ack(inbound)

    def _settle(self, op: Callable[[], None]) -> None:
        try:
            op()
        except Exception as exc:
            if self._conn is not None and _is_connection_error(self._conn, exc):
                raise self._lost(exc) from None
            raise

    def retry(self, inbound: Inbound, delay: float, error: BaseException | None = None) -> None:
        """Send the message back to its queue after ``delay`` seconds (one of the subscription's
        ``retry_delays``), with the attempt count raised; ack the original once the copy is confirmed."""
        sub = inbound.subscription
        if not sub.durable:
            raise TransportError("at-most-once messages are not retried")
        headers = _copyable(inbound.message.headers)
        headers.pop("x-delivery-count", None)
        headers[ATTEMPT_HEADER] = inbound.attempt + 1
        self._keep_routing_key(inbound, headers)
        self._copy(inbound, delay_queue(sub.queue, delay), headers)
        self.ack(inbound)

    def dead_letter(self, inbound: Inbound, reason: str, error: BaseException | None = None) -> None:
        """Copy the message, with ``reason`` and ``error`` in its headers, to the dead-letter queue; ack
        the original once the copy is confirmed."""
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
            headers[DL_ERROR_TYPE] = f"{type(error).__module__}.{type(error).__qualname__}"
            headers[DL_ERROR_MESSAGE] = str(error)[:1000]
            tb = "".join(traceback.format_exception(error, limit=-8))
            headers[DL_TRACEBACK] = tb[-_MAX_TRACEBACK:]
        self._copy(inbound, self.dead_queue, headers)
        self.ack(inbound)

    def _keep_routing_key(self, inbound: Inbound, headers: dict[str, Any]) -> None:
        """Record the routing key the message was first published with. A message straight from the events
        exchange has its own; one back from a delay queue or a replay keeps what was recorded then."""
        info = inbound.message.delivery_info or {}
        if info.get("exchange") == self.exchange or DL_ROUTING_KEY not in headers:
            headers[DL_ROUTING_KEY] = str(info.get("routing_key", ""))[:255]

    def _copy(self, inbound: Inbound, queue: str, headers: dict[str, Any]) -> None:
        """Publish a copy of ``inbound`` to ``queue`` (default exchange, mandatory) and wait for the
        confirm. If the queue went missing (deleted by hand), declare the topology again and retry once."""
        message = inbound.message
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        mid = inbound.message_id or f"dl-{uuid.uuid4().hex}"
        item: _Outgoing = ("", queue, body, mid, headers, True)
        try:
            try:
                self._publish_raw([item], None, content_type=message.content_type or "")
            except Unroutable:
                log.warning("bus.queue_missing", queue=queue, action="declaring the topology again")
                self.declare(inbound.subscription)
                self._publish_raw([item], None, content_type=message.content_type or "")
        except PublishError as exc:
            if self._conn is None:
                raise ConnectionLost(str(exc)) from None
            raise

    def delete_topology(self) -> None:
        """Delete every queue this bus declared, and the exchange. For tests and teardown scripts:
        the messages in those queues are lost."""
        with self._lock:
            self.connect()
            for queue in sorted(self.declared_queues):
                self._pub.queue_delete(queue=queue)
            self._pub.exchange_delete(exchange=self.exchange)
            self.declared_queues.clear()

    # -- dead letters ------------------------------------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first. They stay in the queue."""
        with self._lock:
            ch = self._connection().channel()
            try:
                return [_dead_letter_of(m) for m in self._browse_dead(ch, limit)]
            finally:
                ch.close()  # unacked messages go back to the queue

    def _browse_dead(self, ch: Any, limit: int) -> Iterator[Message]:
        """Get up to ``limit`` dead letters on ``ch`` without acking them."""
        for _ in range(limit):
            message = ch.basic_get(self.dead_queue, no_ack=False)
            if message is None:
                return
            yield _to_message(ch, message)[0]

    def replay_dead(
        self, ids: Iterable[str] | None = None, *, timeout: float | None = None, skipped: dict[str, str] | None = None
    ) -> list[str]:
        """Put dead letters back on the queue they came from, with a fresh attempt count.

        ``ids=None`` replays all. Returns the ids replayed. Each is acked off the dead-letter queue
        only after its copy was confirmed. A letter whose queue no longer exists stays in the
        dead-letter queue; its id and the reason go into ``skipped`` if given.
        """
        wanted = None if ids is None else set(ids)
        replayed: list[str] = []
        with self._lock:
            ch = self._connection().channel()
            try:
                depth = ch.queue_declare(queue=self.dead_queue, passive=True).message_count
                for message in self._browse_dead(ch, depth):
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
                        if k not in _DL_HEADERS
                        and k
                        not in (
                            "x-death",
                            "x-first-death-exchange",
                            "x-first-death-queue",
                            "x-first-death-reason",
                            "x-delivery-count",
                        )
                    }
                    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
                    try:
                        self._publish_raw(
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
            finally:
                if self._conn is not None:
                    _close_channel_quietly(ch)
        return replayed


#: unsettled deliveries tracked per channel for multiple acks (beyond: single acks until the next channel)
_MAX_TRACKED = 100_000


def _to_message(ch: Any, raw: Any) -> tuple[Message, str | None]:
    """The kombu message for a delivery, and why it must be refused before its body is looked at (or None).

    kombu is never allowed to decompress a body (see ``_COMPRESSION``). On memory:// kombu has built the
    message already, in process, so only the refusal is left to do."""
    if isinstance(raw, Message):
        codec = raw.headers.get(_COMPRESSION) if raw.headers else None
    else:
        app_headers = (getattr(raw, "properties", None) or {}).get("application_headers")
        codec = app_headers.pop(_COMPRESSION, None) if isinstance(app_headers, dict) else None
        invalid = getattr(raw, "invalid_properties", None)
        raw = ch.message_to_python(raw)
        if invalid:
            return raw, f"its AMQP properties cannot be decoded ({invalid}); they must be UTF-8 text"
        if codec is not None:
            raw.headers[_COMPRESSION] = codec  # kept for the dead letter; kombu decompresses only on building
    if codec is not None:
        return raw, f"compressed messages are not accepted (AMQP header 'compression' is {str(codec)[:80]!r})"
    return raw, None


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
        attempts=_int(h.get(DL_ATTEMPTS), 0),
        dead_at=str(h.get(DL_DEAD_AT, "")),
        content_type=str(message.content_type or ""),
        size=len(body),
    )


def _int(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value)) if value is not None else default
    except ValueError:
        return default


def _is_connection_error(conn: Connection, exc: BaseException) -> bool:
    try:
        errors = tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
    except Exception:  # noqa: BLE001 - a broken transport cannot tell; treat the error as a connection error
        return True
    return isinstance(exc, (*errors, OSError, ConnectionError))


def _queue_node_down(exc: BaseException) -> bool:
    """Whether a declare failed because the queue's home node (in a cluster) is down."""
    text = str(exc)
    return getattr(exc, "reply_code", None) == 404 and ("home node" in text or "down or inaccessible" in text)


def _login_refused(exc: BaseException) -> bool:
    """Whether the broker closed the connection in the handshake with 403: a wrong user or password.
    py-amqp raises that as a channel error, which crashed the worker and the CLI with a traceback; it is
    reported like an unreachable broker instead (the message says why), and never shows the password."""
    return getattr(exc, "reply_code", None) == 403 and getattr(exc, "method_sig", None) == (0, 0)


def _close_quietly(conn: Connection) -> None:
    try:
        conn.release()
    except Exception as exc:  # noqa: BLE001 - the connection is being thrown away; the reason is logged
        log.debug("bus.close_failed", error=repr(exc))


def _close_channel_quietly(ch: Any) -> None:
    try:
        ch.close()
    except Exception as exc:  # noqa: BLE001 - closing requeues; a failure means the connection is gone
        log.debug("bus.channel_close_failed", error=repr(exc))
