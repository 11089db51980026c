"""Queue and exchange layout, the same on RabbitMQ and on memory.

For an exchange named ``E`` (default ``sagas``):

* ``E`` is the durable topic exchange every event is published to, with the event name as routing key.
* ``E.dead`` is the dead-letter queue. Each dead letter keeps the queue it came from and why it died in
  its headers, so ``sagas dead replay`` can put it back.
* A subscription queue ``Q`` is bound to ``E`` with its patterns. At-least-once queues are durable
  quorum queues with a delivery limit; a message that keeps killing its worker is dead-lettered by the
  broker. At-most-once queues are transient and auto-delete: nothing is kept while nobody listens.
* ``Q.delay.<ms>`` holds a failed message for ``ms`` milliseconds (per-queue TTL), then dead-letters it
  back to ``Q`` through the default exchange. One queue per delay level, so there is no head-of-line
  blocking, and no delayed message is held unacked in a worker's memory.

Changing a queue's arguments on RabbitMQ fails with ``PRECONDITION_FAILED``; treat such a change as a
migration (new queue name, or delete and re-create the queue while nothing is in it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._errors import TransportError
from ._names import validate_pattern

#: The broker dead-letters a message after this many redeliveries (crash loops of a poison message).
DEFAULT_DELIVERY_LIMIT = 20
DEFAULT_PREFETCH = 64
_QUEUE_NAME_LIMIT = 255


@dataclass(frozen=True, slots=True)
class Subscription:
    """A queue to consume, bound to the events exchange by ``patterns``.

    ``durable=True`` is at-least-once (quorum queue, acked after handling); ``False`` is at-most-once
    (auto-delete queue, acked just before handling). ``exclusive`` gives each worker its own queue
    (broadcast). ``retry_delays`` (seconds) are the delay levels a failed message can wait in.
    """

    queue: str
    patterns: tuple[str, ...]
    durable: bool = True
    exclusive: bool = False
    prefetch: int = DEFAULT_PREFETCH
    retry_delays: tuple[float, ...] = ()
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    arguments: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.queue or len(self.queue) > _QUEUE_NAME_LIMIT - 20:
            raise TransportError(f"queue name must be 1 to {_QUEUE_NAME_LIMIT - 20} characters: {self.queue!r}")
        if not self.patterns:
            raise TransportError(f"subscription {self.queue!r} has no patterns")
        for p in self.patterns:
            validate_pattern(p)
        if self.prefetch < 1:
            raise TransportError("prefetch must be at least 1")
        if self.durable and self.exclusive:
            raise TransportError("a broadcast (exclusive) subscription cannot be durable: use at-most-once")
        if any(d <= 0 for d in self.retry_delays):
            raise TransportError("retry delays must be positive")


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What the broker says about a queue that exists: the messages ready in it (not those delivered
    and unacked) and the consumers attached to it now."""

    queue: str
    messages: int
    consumers: int


def delay_ms(delay: float) -> int:
    """A delay in seconds, rounded to the millisecond level its queue is named by."""
    return max(1, round(delay * 1000))


def delay_queue(queue: str, delay: float) -> str:
    return f"{queue}.delay.{delay_ms(delay)}"


def dead_queue(exchange: str) -> str:
    return f"{exchange}.dead"


def declare(channel: Any, exchange: str, sub: Subscription | None = None, *, dead: bool = True) -> list[str]:
    """Declare the exchange, the dead-letter queue (unless ``dead`` is false) and, if given, one
    subscription with its delay queues. Returns the names of the queues declared."""
    dlq = dead_queue(exchange)
    channel.exchange_declare(exchange=exchange, type="topic", durable=True, auto_delete=False)
    if dead:
        # Classic, not quorum: browsing dead letters requeues them, and a quorum queue's delivery limit
        # would eventually drop them. A classic queue lives on one node of a cluster (see EventBus.connect).
        channel.queue_declare(
            queue=dlq, durable=True, exclusive=False, auto_delete=False, arguments={"x-queue-type": "classic"}
        )
    if sub is None:
        return [dlq] if dead else []
    if sub.durable:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": sub.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq,
        }
        args.update(sub.arguments)
        channel.queue_declare(queue=sub.queue, durable=True, exclusive=False, auto_delete=False, arguments=args)
    else:
        # Auto-delete: gone with its last consumer, so nothing is kept while no instance runs. Durable
        # only because RabbitMQ 4 deprecates transient non-exclusive queues; messages in it do not
        # outlive its consumers anyway.
        args = {"x-queue-type": "classic", **sub.arguments}
        channel.queue_declare(
            queue=sub.queue, durable=not sub.exclusive, exclusive=sub.exclusive, auto_delete=True, arguments=args
        )
    for pattern in sub.patterns:
        channel.queue_bind(queue=sub.queue, exchange=exchange, routing_key=pattern)
    declared = [dlq, sub.queue] if dead else [sub.queue]
    for delay in sorted(set(sub.retry_delays)):
        declared.append(delay_queue(sub.queue, delay))
        channel.queue_declare(
            queue=delay_queue(sub.queue, delay),
            durable=True,
            exclusive=False,
            auto_delete=False,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay_ms(delay),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": sub.queue,
            },
        )
    return declared
