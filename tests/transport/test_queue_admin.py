"""`EventBus.inspect_queue`, `unbind_queue` and `delete_queue`: the queue administration that finds and
removes orphaned queues, the same on memory:// and RabbitMQ."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for
from transport import Event, EventBus, Inbound, QueueInfo, QueueInUse, Subscription


def _fill(bus: EventBus, unique: str, n: int) -> Subscription:
    sub = Subscription(f"{unique}.svc.h", ("ocis.thing.#",), retry_delays=(5.0,))
    bus.declare(sub)
    bus.publish_many([Event("ocis.thing.made", {"n": i}) for i in range(n)])
    return sub


def test_inspect_counts_messages_and_consumers(broker_url: str, unique: str, buses: list[object]) -> None:
    """A passive look: the messages waiting in the queue, then the consumer attached to it."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    sub = _fill(bus, unique, 3)
    wait_for(lambda: bus.inspect_queue(sub.queue) == QueueInfo(sub.queue, 3, 0), what="3 messages, no consumer")
    reader = EventBus(broker_url, exchange=unique)
    buses.append(reader)
    got: list[Inbound] = []
    reader.consume([sub], got.append)
    info = bus.inspect_queue(sub.queue)
    assert info is not None
    assert info.consumers == 1
    reader.close()
    wait_for(lambda: (bus.inspect_queue(sub.queue) or QueueInfo("", 0, 9)).consumers == 0, what="no consumer")


def test_inspect_a_missing_queue_is_none_and_creates_nothing(broker_url: str, unique: str, buses: list[object]) -> None:
    """A queue that does not exist is None, twice (the passive look did not create it), and the bus
    still works afterwards (RabbitMQ closed only the channel of the look)."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    assert bus.inspect_queue(f"{unique}.nobody") is None
    assert bus.inspect_queue(f"{unique}.nobody") is None
    sub = _fill(bus, unique, 1)
    wait_for(lambda: bus.inspect_queue(sub.queue) == QueueInfo(sub.queue, 1, 0), what="the message")


def test_an_unbound_queue_receives_nothing_new(broker_url: str, unique: str, buses: list[object]) -> None:
    """After unbind_queue, new events do not reach the queue; what it held stays."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    sub = _fill(bus, unique, 2)
    wait_for(lambda: bus.inspect_queue(sub.queue) == QueueInfo(sub.queue, 2, 0), what="2 messages")
    other = Subscription(f"{unique}.svc.other", ("ocis.thing.#",))
    bus.declare(other)  # so that the events below are routed somewhere
    bus.unbind_queue(sub.queue, sub.patterns)
    bus.publish_many([Event("ocis.thing.made", {"n": i}) for i in range(4)])
    wait_for(lambda: bus.inspect_queue(other.queue) == QueueInfo(other.queue, 4, 0), what="4 in the other queue")
    assert bus.inspect_queue(sub.queue) == QueueInfo(sub.queue, 2, 0)
    bus.unbind_queue(f"{unique}.nobody", ("x.#",))  # a missing queue: nothing to do, no error


def test_delete_removes_the_queue_and_says_what_it_held(broker_url: str, unique: str, buses: list[object]) -> None:
    """delete_queue returns the messages it dropped, and the queue is gone; deleting again is 0."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    sub = _fill(bus, unique, 2)
    wait_for(lambda: bus.inspect_queue(sub.queue) == QueueInfo(sub.queue, 2, 0), what="2 messages")
    assert bus.delete_queue(sub.queue) == 2
    assert bus.inspect_queue(sub.queue) is None
    assert sub.queue not in bus.declared_queues
    assert bus.delete_queue(sub.queue) == 0


def test_delete_refuses_a_queue_with_a_consumer(broker_url: str, unique: str, buses: list[object]) -> None:
    """A queue something reads is not deleted: QueueInUse, and its messages stay."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    sub = _fill(bus, unique, 0)
    reader = EventBus(broker_url, exchange=unique)
    buses.append(reader)
    reader.consume([sub], lambda inbound: None)
    with pytest.raises(QueueInUse, match="consumer"):
        bus.delete_queue(sub.queue)
    info = bus.inspect_queue(sub.queue)
    assert info is not None
    assert info.consumers == 1
