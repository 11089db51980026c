"""Consuming with acks: the consume channel, decoding deliveries, and acking them (alone or in runs).

Neither kombu nor py-amqp is thread-safe, so the thread that consumes and drains must also do every
ack. Nothing is ever acked before its handler is done with it, and a ``multiple`` ack never covers a
delivery that is still being handled: the consumer keeps the delivery tags of the consume channel in
order until they are settled.

A delivery becomes an :class:`Inbound`. One that must not be decoded (a compressed body, properties
that are not UTF-8) or cannot be (not a valid event, or a routing key that disagrees with its type)
still becomes one, with ``event=None`` and the reason in ``error``, so that it can be dead-lettered.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kombu.message import Message

from ._connection import ConnectionLost, FailoverConnection, is_connection_error
from ._envelope import Event, decode
from ._errors import DecodeError
from ._topology import Subscription

#: AMQP header with the attempt number of a retried message (1 for the first delivery).
ATTEMPT_HEADER = "x-sagas-attempt"
#: kombu decompresses a body whose AMQP header ``compression`` names a codec as it builds the message,
#: before any size check: a few KiB of zlib become gigabytes. The consumer takes the header off first,
#: and refuses the message.
_COMPRESSION = "compression"
#: The highest attempt number a message's headers can claim (a forged count must not break anything).
_MAX_ATTEMPT = 1_000_000
#: unsettled deliveries tracked per channel for multiple acks (beyond: single acks until the next channel)
_MAX_TRACKED = 100_000


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


class Consumer:
    """The consume channel of a :class:`FailoverConnection`: subscriptions, draining, and acks.

    :meth:`open` starts a new channel (and forgets the old one's delivery tags); :meth:`reset` forgets
    it when the connection closes.
    """

    def __init__(self, link: FailoverConnection, *, exchange: str) -> None:
        self._link = link
        self._exchange = exchange
        self._channel: Any = None
        self._consumer_tags: list[str] = []
        #: delivery tags received on the consume channel (RabbitMQ), oldest first, until known settled,
        #: and the tags settled out of order that are still in it: :meth:`ack_oldest` uses them to ack a
        #: run of the oldest messages with one ``multiple`` ack. None: not tracked (memory://, or too many
        #: unsettled on this channel; then every ack is single until the next channel).
        self._delivered: deque[int] | None = None
        self._settled: set[int] = set()

    def open(self) -> Any:
        """A new consume channel on the live connection (connecting first if needed)."""
        ch = self._channel = self._link.live().channel()
        self._delivered = None if self._link.memory else deque()  # tags count from 1 again on a new channel
        self._settled = set()
        return ch

    def reset(self) -> None:
        """Forget the consume channel and its consumers (the connection closed)."""
        self._channel = None
        self._consumer_tags = []

    def subscribe(self, sub: Subscription, on_message: Callable[[Inbound], None], max_event_size: int) -> None:
        """Consume ``sub``'s queue (already declared) on the channel of :meth:`open`, with its prefetch."""
        ch = self._channel
        ch.basic_qos(0, sub.prefetch, False)
        tag = f"{sub.queue}.{uuid.uuid4().hex[:8]}"
        ch.basic_consume(
            queue=sub.queue,
            no_ack=False,
            consumer_tag=tag,
            callback=self._receiver(ch, sub, on_message, max_event_size),
        )
        self._consumer_tags.append(tag)

    def cancel(self) -> None:
        """Stop receiving new messages; messages already received can still be acked."""
        ch, tags, self._consumer_tags = self._channel, self._consumer_tags, []
        if ch is None:
            return
        for tag in tags:
            try:
                ch.basic_cancel(tag)
            except Exception as exc:
                conn = self._link.current
                if conn is None or not is_connection_error(conn, exc):
                    raise

    def _receiver(
        self, ch: Any, sub: Subscription, on_message: Callable[[Inbound], None], max_size: int
    ) -> Callable[[Any], None]:
        exchange = self._exchange

        def receive(raw: Any) -> None:
            message, refused = to_message(ch, raw)
            if self._delivered is not None:
                if len(self._delivered) < _MAX_TRACKED:
                    self._delivered.append(message.delivery_tag)
                else:  # a tag left out would be covered by a later multiple ack: stop batching instead
                    self._delivered = None
            headers = message.headers or {}
            attempt = int_header(headers.get(ATTEMPT_HEADER), 1) + int_header(headers.get("x-delivery-count"), 0)
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
        link = self._link
        conn = link.current
        if conn is None:
            raise ConnectionLost("not connected")
        # The wait is cut in slices of at most link.tick() seconds, with a heartbeat check before each: a
        # broker that stopped answering is noticed within 2 heartbeat intervals however long the drain.
        deadline = time.monotonic() + timeout
        tick = link.tick()
        try:
            while True:
                if not link.memory:
                    conn.heartbeat_check()
                remaining = deadline - time.monotonic()
                try:
                    conn.drain_events(timeout=max(0.0, min(remaining, tick)))
                    return True
                except TimeoutError:
                    if remaining <= tick:
                        return False
        except Exception as exc:
            if is_connection_error(conn, exc):
                raise link.lost(exc) from None
            raise

    def ack(self, inbound: Inbound) -> None:
        """Acknowledge one message, once."""
        if not inbound.acked:
            self._settle(inbound.message.ack)
            inbound.acked = True
            delivered = self._delivered
            if delivered is not None and inbound.message.channel is self._channel:
                self._settled.add(inbound.message.delivery_tag)
                while delivered and delivered[0] in self._settled:
                    self._settled.discard(delivered.popleft())

    def ack_oldest(self, inbounds: Sequence[Inbound]) -> None:
        """Ack, with one ``multiple`` ack, the longest run of the oldest unsettled deliveries that
        ``inbounds`` make up, and mark them acked. A message received before them and still being handled
        stops the run. The rest of ``inbounds`` is left for :meth:`ack`. Does nothing on ``memory://``."""
        delivered, settled = self._delivered, self._settled
        mine = (
            {}
            if delivered is None
            else {i.message.delivery_tag: i for i in inbounds if not i.acked and i.message.channel is self._channel}
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

    def _settle(self, op: Callable[[], None]) -> None:
        try:
            op()
        except Exception as exc:
            conn = self._link.current
            if conn is not None and is_connection_error(conn, exc):
                raise self._link.lost(exc) from None
            raise


def to_message(ch: Any, raw: Any) -> tuple[Message, str | None]:
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


def int_header(value: object, default: int) -> int:
    """A header's value as an int (any publisher can set it, to anything), or ``default``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value)) if value is not None else default
    except ValueError:
        return default
