"""The event bus: a façade over one fail-over connection, a publisher, a consumer and the dead letters.

An :class:`EventBus` is not thread-safe for consuming: the thread that calls :meth:`EventBus.consume`
and :meth:`EventBus.drain` must also do every ack, retry and dead-letter, because neither kombu nor
py-amqp is thread-safe. Publishing is guarded by a lock, so a bus used only to publish can be shared.

Safe defaults, set here and in the modules it composes:

* every message is persistent (``delivery_mode=2``) and JSON;
* every publish waits for the broker's confirm, with a timeout; batches pipeline their confirms;
* nothing is ever acked unless it was handled, or copied to a retry or dead-letter queue and that copy
  was confirmed.

Every ack goes through :meth:`EventBus.ack`, also those of :meth:`~EventBus.ack_many`,
:meth:`~EventBus.retry` and :meth:`~EventBus.dead_letter`, so a subclass sees each one there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import structlog
from kombu.connection import Connection

from . import _memory
from ._connection import ConnectionLost, FailoverConnection, is_connection_error, queue_node_down, redact_url
from ._consumer import Consumer, Inbound
from ._deadletters import DeadLetter, DeadLetterOffice
from ._envelope import DEFAULT_MAX_EVENT_SIZE, Event, encode
from ._errors import InvalidArgument, QueueInUse, TopologyMismatch, TransportError, seconds
from ._publisher import Publisher
from ._topology import QueueInfo, Subscription, dead_queue, declare

__all__ = ["DeadLetter", "EventBus", "QueueInfo"]

log = structlog.get_logger("transport")


class EventBus:
    """A connection to the event bus: ``memory://`` or ``amqp://`` (``amqps://`` for TLS).

    ``url`` may list several brokers separated by ``;`` for fail-over. Nothing connects until
    :meth:`connect` (or the first publish).

    No call waits on a broker that stopped answering for longer than its bound: a publish raises within
    its ``timeout`` (or within 2 heartbeat intervals, if that is sooner), a wait for messages raises
    :class:`ConnectionLost` within 2 heartbeat intervals, and :meth:`close` waits for the broker's
    close-ok ``close_timeout`` seconds at most (see :mod:`transport._connection`).
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
        close_timeout: float = 2.0,
    ) -> None:
        if not isinstance(url, str):
            raise InvalidArgument(f"the broker URL is a string such as 'amqp://user:pass@host:5672/vhost', not {url!r}")
        if not isinstance(exchange, str) or not exchange.replace(".", "").replace("-", "").replace("_", "").isalnum():
            raise TransportError(f"invalid exchange name {exchange!r}: use letters, digits, '.', '-' and '_'")
        for name, value in (("publish_timeout", publish_timeout), ("connect_timeout", connect_timeout)):
            seconds(name, value)
        seconds("heartbeat", heartbeat, zero=True)
        seconds("close_timeout", close_timeout, zero=True)
        if isinstance(confirm_window, bool) or not isinstance(confirm_window, int) or confirm_window < 1:
            raise InvalidArgument(f"confirm_window is a number of messages, 1 or more, not {confirm_window!r}")
        self.url = url
        self.exchange = exchange
        self.dead_queue = dead_queue(exchange)
        self.max_event_size = max_event_size
        self._link = FailoverConnection(
            url,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            ssl=ssl,
            # an isolated broker instead of the process-wide one, for :mod:`sagas.testing`
            memory_transport=memory_transport or _memory.Transport,
            on_connect=self._set_up,
            on_close=self._forget_channels,
            close_timeout=close_timeout,
        )
        self.memory = self._link.memory
        self._publisher = Publisher(self._link, timeout=publish_timeout, confirm_window=confirm_window)
        self._consumer = Consumer(self._link, exchange=exchange)
        self._dead = DeadLetterOffice(
            self._link, self._publisher, exchange=exchange, dead_queue=self.dead_queue, declare=self.declare
        )
        #: every queue this bus declared (operators and tests use it to clean up)
        self.declared_queues: set[str] = set()

    # -- settings, kept by the parts that use them ------------------------------------------------

    @property
    def publish_timeout(self) -> float:
        """Seconds a publish that names no timeout waits for its confirms."""
        return self._publisher.timeout

    @publish_timeout.setter
    def publish_timeout(self, value: float) -> None:
        self._publisher.timeout = value

    @property
    def confirm_window(self) -> int:
        """The most messages of a batch that wait for their confirm at a time."""
        return self._publisher.confirm_window

    @confirm_window.setter
    def confirm_window(self, value: int) -> None:
        self._publisher.confirm_window = value

    @property
    def connect_timeout(self) -> float:
        """Seconds :meth:`connect` keeps trying by default."""
        return self._link.connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, value: float) -> None:
        self._link.connect_timeout = value

    @property
    def heartbeat(self) -> float:
        """The AMQP heartbeat of new connections, in seconds."""
        return self._link.heartbeat

    @heartbeat.setter
    def heartbeat(self, value: float) -> None:
        self._link.heartbeat = value

    @property
    def ssl(self) -> bool | Mapping[str, Any] | None:
        """The TLS options of new connections."""
        return self._link.ssl

    @ssl.setter
    def ssl(self, value: bool | Mapping[str, Any] | None) -> None:
        self._link.ssl = value

    @property
    def memory_transport(self) -> type[Any]:
        """The kombu transport class behind ``memory://``."""
        return self._link.memory_transport

    @memory_transport.setter
    def memory_transport(self, value: type[Any]) -> None:
        self._link.memory_transport = value

    # -- connection ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"EventBus({redact_url(self.url)!r}, exchange={self.exchange!r})"

    @property
    def connected(self) -> bool:
        return self._link.current is not None and self._publisher.channel is not None

    @property
    def connection(self) -> Connection | None:
        """The kombu connection while connected, else None: for diagnostics (its socket, say)."""
        return self._link.current

    def connect(self, timeout: float | None = None) -> None:
        """Connect, retrying with backoff for up to ``timeout`` seconds; raise :class:`BrokerUnavailable`."""
        self._link.connect(timeout)

    def _set_up(self, conn: Connection) -> None:
        """Declare the exchange and the dead-letter queue on a new channel of ``conn``, and publish on it.

        The dead-letter queue is a classic queue, which lives on one node of a cluster. While that node
        is down, RabbitMQ refuses its declaration (404, "home node ... is down or inaccessible"): the
        bus connects anyway and works, and only dead-lettering waits for the node to come back.
        """
        pub = conn.channel()
        try:
            self.declared_queues.update(declare(pub, self.exchange))
        except Exception as exc:
            if not queue_node_down(exc):
                raise
            log.warning("bus.dead_letter_queue_unavailable", queue=self.dead_queue, error=str(exc))
            pub = conn.channel()  # the broker closed the channel that got the error
            declare(pub, self.exchange, dead=False)
        self._publisher.attach(pub)
        log.debug("bus.connected", broker=redact_url(self.url), exchange=self.exchange)

    def _forget_channels(self) -> None:
        self._publisher.detach()
        self._consumer.reset()

    def channel(self) -> Any:
        """A new channel on the connection (connecting first if needed), for operator tools and tests
        that inspect or change the broker directly. The caller closes it."""
        with self._link.lock:
            return self._link.live().channel()

    def close(self) -> None:
        """Close the connection. Unacked messages go back to their queues (broker side)."""
        self._link.close()

    def __enter__(self) -> EventBus:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lost(self, exc: BaseException) -> ConnectionLost:
        """Close after the connection broke with ``exc``; return the :class:`ConnectionLost` to raise.
        The next connect tries the next broker of the URL first."""
        return self._link.lost(exc)

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        return self._link.connection_errors

    def health(self, timeout: float = 5.0) -> bool:
        """Whether the broker answers within ``timeout`` seconds (opens a channel; declares nothing)."""
        return self._link.health(timeout)

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
        if timeout is not None:
            seconds("timeout", timeout)
        exchange = self.exchange
        self._publisher.publish(
            [(exchange, rk, body, mid, {}, mandatory) for rk, body, mid, mandatory in items], timeout
        )

    def send_encoded(
        self, items: Sequence[tuple[str, bytes, str, bool]], *, timeout: float | None = None
    ) -> list[tuple[str, str | None]]:
        """Send already-encoded events ``(routing key, body, message id, mandatory)`` without waiting for
        their confirms, for a thread that publishes alone on this bus and collects the confirms with
        :meth:`collect_confirms` (the asyncio publisher). Returns the outcomes known at once, ``(message
        id, failure or None)``: all of them on ``memory://``. Raises :class:`PublishError` when no
        connection can be made within ``timeout`` (default ``publish_timeout``) or the connection broke;
        then every message sent and not yet confirmed is lost with it."""
        exchange = self.exchange
        return self._publisher.send(
            [(exchange, rk, body, mid, {}, mandatory) for rk, body, mid, mandatory in items],
            self._publisher.timeout if timeout is None else timeout,
        )

    def collect_confirms(self, wait: float) -> list[tuple[str, str | None]]:
        """The outcomes of messages sent by :meth:`send_encoded` whose confirm came meanwhile (waiting up
        to ``wait`` seconds for the broker): ``(message id, failure or None)``. Raises
        :class:`PublishError` when the connection broke."""
        return self._publisher.collect(wait)

    @property
    def unconfirmed(self) -> int:
        """Messages sent by :meth:`send_encoded` still waiting for their confirm."""
        return self._publisher.unconfirmed

    def keep_alive(self) -> None:
        """Service the heartbeats of a connection that only publishes, between publishes: an idle
        publisher calls this every :attr:`tick` seconds so that the broker does not close the
        connection for missed heartbeats. A connection found broken is dropped (the next publish
        connects again)."""
        self._publisher.keep_alive()

    @property
    def tick(self) -> float:
        """Seconds between two heartbeat checks: a quarter of the negotiated heartbeat, at most 1 s."""
        return self._link.tick()

    # -- topology ----------------------------------------------------------------------------------

    def declare(self, subscription: Subscription) -> None:
        """Declare the queue of ``subscription``, its bindings and its delay queues."""
        with self._link.lock:
            self.connect()
            self._declare(self._publisher.channel, subscription)

    def _declare(self, channel: Any, subscription: Subscription | None, *, dead: bool = True) -> None:
        try:
            self.declared_queues.update(declare(channel, self.exchange, subscription, dead=dead))
        except Exception as exc:
            conn = self._link.current
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

    def delete_topology(self) -> None:
        """Delete every queue this bus declared, and the exchange. For tests and teardown scripts:
        the messages in those queues are lost."""
        with self._link.lock:
            self.connect()
            pub = self._publisher.channel
            for queue in sorted(self.declared_queues):
                pub.queue_delete(queue=queue)
            pub.exchange_delete(exchange=self.exchange)
            self.declared_queues.clear()

    # -- queue administration (operator tools: orphaned queues) --------------------------------------
    #
    # AMQP cannot list the queues bound to an exchange (only the management plugin can, and it is not
    # always there): the caller names the queues, and these calls work on each, on a channel of its own
    # (RabbitMQ closes a channel that names a queue that does not exist).

    @contextlib.contextmanager
    def _admin_channel(self) -> Iterator[Any]:
        ch = self.channel()
        try:
            yield ch
        finally:
            if getattr(ch, "is_open", True):  # (RabbitMQ closed it after an error; memory's has no such flag)
                ch.close()

    def _channel_error(self, exc: BaseException) -> bool:
        conn = self._link.current
        return conn is not None and isinstance(exc, tuple(conn.channel_errors))

    def inspect_queue(self, queue: str) -> QueueInfo | None:
        """The messages ready in ``queue`` and the consumers attached to it now (a passive declare,
        which creates nothing), or None when no such queue exists."""
        with self._admin_channel() as ch:
            try:
                ok = ch.queue_declare(queue=queue, passive=True)
            except Exception as exc:
                if not self._channel_error(exc):
                    raise
                if getattr(exc, "code", None) in (404, "404"):
                    return None
                raise TransportError(f"the broker refused to inspect queue {queue!r}: {exc}") from None
        return QueueInfo(queue, int(ok.message_count), int(ok.consumer_count))

    def unbind_queue(self, queue: str, patterns: Sequence[str]) -> None:
        """Remove the bindings of ``queue`` to the events exchange by ``patterns``: from now on it
        receives no new events (what it holds stays). A queue that does not exist is a no-op."""
        if self.inspect_queue(queue) is None:
            return
        with self._admin_channel() as ch:
            try:
                for pattern in patterns:
                    ch.queue_unbind(queue=queue, exchange=self.exchange, routing_key=pattern)
            except Exception as exc:
                if not self._channel_error(exc):
                    raise
                raise TransportError(f"the broker refused to unbind queue {queue!r}: {exc}") from None

    def delete_queue(self, queue: str) -> int:
        """Delete ``queue`` and the messages in it; return how many it held (0 when it did not exist).

        Raises :class:`QueueInUse` when a consumer is attached to it. (The check is a passive declare
        just before the delete: RabbitMQ's quorum queues refuse ``if_unused``, so a consumer that
        attaches between the two is cancelled by the delete.)"""
        info = self.inspect_queue(queue)
        if info is None:
            return 0
        if info.consumers:
            raise QueueInUse(
                f"queue {queue!r} has {info.consumers} consumer(s): something still reads it; stop it first"
            )
        with self._admin_channel() as ch:
            try:
                held = ch.queue_delete(queue=queue)
            except Exception as exc:
                if not self._channel_error(exc):
                    raise
                raise TransportError(f"the broker refused to delete queue {queue!r}: {exc}") from None
        self.declared_queues.discard(queue)
        return int(held or 0)

    # -- consuming ---------------------------------------------------------------------------------

    def consume(self, subscriptions: Sequence[Subscription], on_message: Callable[[Inbound], None]) -> None:
        """Start consuming. ``on_message`` runs inside :meth:`drain`, on the calling thread.

        Raises :class:`ConnectionLost` when the connection breaks meanwhile, as it can while a cluster
        node goes down (RabbitMQ may close it with ``INTERNAL_ERROR``): connect again and retry."""
        try:
            ch = self._consumer.open()
            for sub in subscriptions:
                self._declare(ch, sub, dead=False)  # declared (or found unavailable) on connect
                self._consumer.subscribe(sub, on_message, self.max_event_size)
        except TransportError:
            raise
        except Exception as exc:
            conn = self._link.current
            if conn is not None and is_connection_error(conn, exc):
                raise self.lost(exc) from None
            raise

    def cancel(self) -> None:
        """Stop receiving new messages; messages already received can still be acked."""
        self._consumer.cancel()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for broker traffic and dispatch it. Returns whether anything came.

        Raises :class:`ConnectionLost` if the connection broke.
        """
        return self._consumer.drain(timeout)

    def ack(self, inbound: Inbound) -> None:
        """Acknowledge a message: at-least-once after it was handled, at-most-once just before. Once only."""
        self._consumer.ack(inbound)

    def ack_many(self, inbounds: Sequence[Inbound]) -> None:
        """Acknowledge messages that were all handled. The longest run of the oldest unsettled deliveries
        that they make up goes in one ``multiple`` ack (a message received before them and still being
        handled stops the run); the rest are acked one by one. On ``memory://``, one by one."""
        self._consumer.ack_oldest(inbounds)
        for inbound in inbounds:
            self.ack(inbound)

    # -- retries and dead letters ------------------------------------------------------------------

    def retry(
        self, inbound: Inbound, delay: float, error: BaseException | None = None, *, count_attempt: bool = True
    ) -> None:
        """Send the message back to its queue after ``delay`` seconds (one of the subscription's
        ``retry_delays``), with the attempt count raised, or kept as it is with ``count_attempt=False``
        (a message held back rather than failed); ack the original once the copy is confirmed."""
        self._dead.copy_to_retry(inbound, delay, count_attempt=count_attempt)
        self.ack(inbound)

    def dead_letter(self, inbound: Inbound, reason: str, error: BaseException | None = None) -> None:
        """Copy the message, with ``reason`` and ``error`` in its headers, to the dead-letter queue; ack
        the original once the copy is confirmed."""
        self._dead.copy_to_dead(inbound, reason, error)
        self.ack(inbound)

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first. They stay in the queue."""
        return self._dead.browse(limit)

    def replay_dead(
        self, ids: Iterable[str] | None = None, *, timeout: float | None = None, skipped: dict[str, str] | None = None
    ) -> list[str]:
        """Put dead letters back on the queue they came from, with a fresh attempt count.

        ``ids=None`` replays all. Returns the ids replayed. Each is acked off the dead-letter queue
        only after its copy was confirmed. A letter whose queue no longer exists stays in the
        dead-letter queue; its id and the reason go into ``skipped`` if given.
        """
        return self._dead.replay(ids, timeout=timeout, skipped=skipped)

    def drop_dead(self, ids: Iterable[str] | None = None) -> list[str]:
        """Delete dead letters for good: ``ids``, or every one with None. Returns the ids deleted."""
        return self._dead.drop(ids)
