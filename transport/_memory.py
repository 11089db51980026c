"""kombu's memory transport, made to behave like RabbitMQ where the framework depends on it.

kombu's ``memory://`` keeps everything in process-global structures. It has topic routing, but gets
``#`` wrong, and it has no per-queue TTL, dead-letter exchange, auto-delete or mandatory routing.
This module subclasses it to add exactly those, so that the same topology (delay queues with TTL
that dead-letter back to the work queue, transient auto-delete queues) behaves the same on both
transports. It keeps its own global state, apart from plain ``kombu.transport.memory``.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from queue import Empty
from typing import Any, ClassVar

from amqp.exceptions import NotFound
from amqp.protocol import queue_declare_ok_t
from kombu.transport import memory, virtual
from kombu.transport.virtual.exchange import TopicExchange as _KombuTopicExchange

from ._errors import TopologyMismatch, Unroutable
from ._names import topic_matches

_SOURCE_QUEUE = "x-sagas-source-queue"
_delivery_tags = itertools.count(1)
_MAX_ROUTES = 10_000


class TopicExchange(_KombuTopicExchange):
    """Topic exchange with RabbitMQ's semantics: ``#`` matches zero or more words."""

    def lookup(self, table: Any, exchange: str, routing_key: str, default: Any) -> set[str]:
        return {queue for rkey, _pattern, queue in table if topic_matches(rkey, routing_key)}

    def prepare_bind(self, queue: str, exchange: str, routing_key: str, arguments: Any) -> tuple[str, str, str]:
        return routing_key, routing_key, queue

    def deliver(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        # kombu's, but the last queue takes the published message itself (it was built for this publish,
        # and nothing holds it after): only the others need a copy of their own (see Channel._put)
        # (the channel is this module's Channel: its _lookup and _put, as kombu's exchange types call them)
        channel = self.channel
        found = channel._lookup(exchange, routing_key)  # noqa: SLF001
        queues = [q for q in found if q and q != channel.deadletter_queue]
        for queue in queues[:-1]:
            channel._put(queue, message, **kwargs)  # noqa: SLF001
        if queues:
            channel._put(queue=queues[-1], message=message, handed_over=True, **kwargs)  # noqa: SLF001


class _KombuLog(io.TextIOBase):
    """The stream kombu's QoS prints to when it restores unacked messages at close: kombu before 5.7
    printed that on stderr, among the log lines; this sends it to kombu's logger, as kombu 5.7 does."""

    def write(self, text: str) -> int:
        if text.strip():
            logger = logging.getLogger("kombu.transport.virtual.base")
            logger.log(logging.ERROR if text.startswith("UNABLE") else logging.INFO, text.strip())
        return len(text)


class QoS(virtual.QoS):
    def restore_unacked_once(self, stderr: Any = None) -> None:
        super().restore_unacked_once(stderr=_KombuLog() if stderr is None else stderr)


class MessageQueue:
    """A queue of the in-process broker: ``queue.Queue``'s calls that kombu's memory channel makes, on a
    bare deque. Nothing ever blocks on these queues (the channel polls them), so the lock and the two
    conditions of ``queue.Queue`` were taken and notified for every message for nothing; ``deque``
    appends and pops are atomic on their own."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()

    def put(self, item: Any) -> None:
        self.queue.append(item)

    def get(self, block: bool = False, timeout: float | None = None) -> Any:
        try:
            return self.queue.popleft()
        except IndexError:
            raise Empty() from None

    def qsize(self) -> int:
        return len(self.queue)

    def empty(self) -> bool:
        return not self.queue


class Channel(memory.Channel):
    """Memory channel with TTL + dead-lettering, auto-delete queues and mandatory routing."""

    QoS = QoS
    do_restore = True
    # Broker state is process-global, as in kombu's memory transport: class attributes on purpose.
    queues = {}  # type: ignore[var-annotated]  # noqa: RUF012 - kombu's own global, redefined
    #: queue name -> declared arguments (``x-message-ttl``, ``x-dead-letter-*``, ``auto_delete``)
    queue_args: ClassVar[dict[str, dict[str, Any]]] = {}
    #: queue name -> number of consumers, for auto-delete
    consumer_counts: ClassVar[defaultdict[str, int]] = defaultdict(int)
    #: heap of (due, seq, queue, message) for messages waiting out a queue's TTL
    delayed: ClassVar[list[tuple[float, int, str, Any]]] = []
    #: (exchange, routing key) -> the queues bound for it; emptied whenever a binding changes
    routes: ClassVar[dict[tuple[str, str], list[str]]] = {}
    lock = threading.Lock()
    _seq = itertools.count()
    #: the clock queue TTLs are measured with (an isolated broker can run on a virtual one)
    clock = staticmethod(time.monotonic)
    #: bodies stay bytes in process (kombu's default base64-encodes them, for transports that store text)
    body_encoding = None  # type: ignore[assignment]  # kombu declares it str; None means "as is"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        types: dict[str, Any] = dict(self.exchange_types)
        types["topic"] = TopicExchange(self)
        self.exchange_types = types

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        args = dict(kwargs.get("arguments") or {})
        args["auto_delete"] = bool(kwargs.get("auto_delete"))
        known = self.queue_args.setdefault(queue, args)
        if known != args:
            # RabbitMQ refuses to re-declare a queue with other arguments (406 PRECONDITION_FAILED).
            raise TopologyMismatch(
                f"PRECONDITION_FAILED - queue {queue!r} exists with arguments {known}, not {args}. Changing "
                "them is a migration: drain and delete the old queue, or give the handler a new name="
            )
        self._queue_for(queue)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        if passive and queue is not None and queue in self.queues:
            # as RabbitMQ answers: the messages in the queue (here with those waiting out its TTL) and its
            # consumers, on every connection to this broker
            with self.lock:
                waiting = sum(1 for entry in self.delayed if entry[2] == queue)
                consumers = max(0, self.consumer_counts.get(queue, 0))
            return queue_declare_ok_t(queue, self._size(queue) + waiting, consumers)
        if passive:
            # RabbitMQ's answer (kombu's virtual channel raises a ChannelError with code 0)
            raise NotFound(f"NOT_FOUND - no queue {queue!r}", (50, 10), "Channel.queue_declare")
        return super().queue_declare(queue, passive, **kwargs)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return queue in self.queues

    def _queue_for(self, queue: str) -> MessageQueue:
        found: MessageQueue | None = self.queues.get(queue)
        if found is None:
            found = self.queues.setdefault(queue, MessageQueue())
        return found

    def _put(self, queue: str, message: Any, handed_over: bool = False, **kwargs: Any) -> None:
        # kombu hands every queue a message is routed to the same dict, delivery tag included; each queue
        # needs its own copy and tag, or marking a delivery's source queue (or dead-lettering it) in one
        # queue changes the others, and two copies delivered on one channel share a tag: the second
        # hid the first from the unacked messages that a closing channel gives back. (``handed_over``:
        # the caller gives this queue the message itself, which nothing else holds.)
        if not handed_over:
            message = _own_copy(message)
        message["properties"]["delivery_tag"] = self._next_delivery_tag()
        if queue not in self.queues:
            # RabbitMQ drops a message sent to a queue that does not exist; so do we.
            if kwargs.get("mandatory"):
                raise Unroutable(f"no queue named {queue!r}")
            return
        ttl = self.queue_args.get(queue, {}).get("x-message-ttl")
        if ttl is not None:
            with self.lock:
                heapq.heappush(self.delayed, (self.clock() + ttl / 1000.0, next(self._seq), queue, message))
            return
        self.queues[queue].put(message)

    def _next_delivery_tag(self) -> int:
        # kombu's virtual channels make a uuid4 per delivery; RabbitMQ's tags are integers
        return next(_delivery_tags)

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        if not exchange:
            return [routing_key]
        found = self.routes.get((exchange, routing_key))
        if found is None:
            try:
                found = list(self.typeof(exchange).lookup(self.get_table(exchange), exchange, routing_key, None))
            except KeyError:
                return []
            if len(self.routes) >= _MAX_ROUTES:
                self.routes.clear()  # many distinct routing keys: start over rather than grow
            self.routes[(exchange, routing_key)] = found
        return found

    # Every change of a binding empties the routing cache (declaring an exchange can change its type).
    def exchange_declare(self, *args: Any, **kwargs: Any) -> Any:
        self.routes.clear()
        return super().exchange_declare(*args, **kwargs)

    def exchange_delete(self, *args: Any, **kwargs: Any) -> Any:
        self.routes.clear()
        return super().exchange_delete(*args, **kwargs)

    def queue_bind(self, *args: Any, **kwargs: Any) -> Any:
        self.routes.clear()
        return super().queue_bind(*args, **kwargs)

    def queue_unbind(self, *args: Any, **kwargs: Any) -> Any:
        self.routes.clear()
        return super().queue_unbind(*args, **kwargs)

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        if kwargs.get("mandatory"):
            queues = self._lookup(exchange, routing_key)
            if not any(q in self.queues for q in queues):
                raise Unroutable(f"no queue is bound to {exchange!r} for {routing_key!r}")
        super().basic_publish(message, exchange, routing_key, **kwargs)

    def _poll(self, cycle: Any, callback: Any, timeout: float | None = None) -> Any:
        # kombu tries each consumed queue in turn, raising and catching Empty for every empty one; look
        # for one that holds a message instead, starting where the last turn stopped (fair to them all).
        if self.delayed:
            self._promote_due()
        queues = cycle.resources
        count = len(queues)
        for i in range(count):
            pos = (cycle.pos + i) % count
            found = self.queues.get(queues[pos])
            if found is not None and found.queue:  # (a hint: another consumer may take it first)
                cycle.pos = pos + 1
                with contextlib.suppress(Empty):
                    return self._get_and_deliver(queues[pos], callback)
        raise Empty()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        if self.delayed:
            self._promote_due()
        message = self._queue_for(queue).get(block=False)
        # Remember where it came from, so that a reject or a requeue goes back to this queue only.
        message["properties"][_SOURCE_QUEUE] = queue
        return message

    def _restore(self, message: Any) -> None:
        """Requeue an unacked message to the queue it came from, marked redelivered (as RabbitMQ does)."""
        raw = message.serializable()
        raw["redelivered"] = True
        queue = raw["properties"].get(_SOURCE_QUEUE)
        if queue in self.queues:
            self.queues[queue].put(raw)

    def _promote_due(self) -> None:
        """Dead-letter every message whose TTL has passed, as RabbitMQ does at a queue's head."""
        now = self.clock()
        due = []
        with self.lock:
            while self.delayed and self.delayed[0][0] <= now:
                due.append(heapq.heappop(self.delayed))
        for _due, _seq, queue, message in due:
            self._dead_letter(queue, message)

    def _dead_letter(self, queue: str, message: Any) -> None:
        args = self.queue_args.get(queue, {})
        exchange = args.get("x-dead-letter-exchange")
        if exchange is None:
            return
        routing_key = args.get("x-dead-letter-routing-key") or message["properties"]["delivery_info"]["routing_key"]
        message["properties"]["delivery_info"].update(exchange=exchange, routing_key=routing_key)
        for target in self._lookup(exchange, routing_key):
            if target in self.queues:
                self._put(target, message)

    def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        if not requeue:
            message = self.qos.get(delivery_tag)
            queue = self._tag_queue(message)
            if queue is not None:
                self._dead_letter(queue, message.serializable())
        super().basic_reject(delivery_tag, requeue=requeue)

    def _tag_queue(self, message: Any) -> str | None:
        queue: str | None = message.properties.get(_SOURCE_QUEUE)
        return queue

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        with self.lock:
            self.consumer_counts[queue] += 1
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is None:
            return
        with self.lock:
            self.consumer_counts[queue] -= 1
            gone = self.consumer_counts[queue] <= 0 and self.queue_args.get(queue, {}).get("auto_delete")
        if gone:
            self.queue_delete(queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any) -> int:
        size = self._size(queue) if queue in self.queues else 0
        if if_empty and size:
            return 0
        for exchange, routing_key, args in list(self.state.queue_bindings(queue)):
            self.queue_unbind(queue, exchange, routing_key, args)
        self.state.queue_bindings_delete(queue)
        self.queues.pop(queue, None)
        self.queue_args.pop(queue, None)
        return int(size)

    def close(self) -> None:
        # kombu's memory channel empties its *instance* view of the queues on close; the queues are
        # broker state and outlive any one channel, as on RabbitMQ.
        virtual.Channel.close(self)


def _own_copy(message: Any) -> Any:
    properties = dict(message.get("properties") or {})
    if "delivery_info" in properties:
        properties["delivery_info"] = dict(properties["delivery_info"])
    return {**message, "properties": properties}


class Transport(memory.Transport):
    """The ``memory://`` transport used by this framework (see the module docstring)."""

    Channel = Channel
    global_state = virtual.BrokerState()
    driver_name = "sagas-memory"

    #: how long an idle poll sleeps between looks at the queues
    polling_interval = 0.005


def isolated_transport(clock: Callable[[], float] = time.monotonic) -> type[Transport]:
    """A memory transport with a broker of its own: its queues, exchanges and delayed messages are
    shared by every connection made with it, and by nothing else. Queue TTLs use ``clock``, so a
    test can run delays on a virtual clock (see :mod:`sagas.testing`)."""

    class IsolatedChannel(Channel):
        queues = {}  # type: ignore[var-annotated]  # noqa: RUF012 - this broker's own state
        queue_args: ClassVar[dict[str, dict[str, Any]]] = {}
        consumer_counts: ClassVar[defaultdict[str, int]] = defaultdict(int)
        delayed: ClassVar[list[tuple[float, int, str, Any]]] = []
        routes: ClassVar[dict[tuple[str, str], list[str]]] = {}
        lock = threading.Lock()
        _seq = itertools.count()

    IsolatedChannel.clock = staticmethod(clock)

    class IsolatedTransport(Transport):
        Channel = IsolatedChannel
        global_state = virtual.BrokerState()
        polling_interval = 0.0

    return IsolatedTransport


def reset() -> None:
    """Forget every queue, exchange and delayed message (for tests)."""
    Channel.queues.clear()
    Channel.queue_args.clear()
    Channel.consumer_counts.clear()
    del Channel.delayed[:]
    Channel.routes.clear()
    Transport.global_state.clear()


__all__ = ["Channel", "Empty", "Transport", "isolated_transport", "reset"]
