"""`EventBus.ack_many`: one ``multiple`` ack for a run of the oldest deliveries, and never an ack for a
message that is still being handled (on RabbitMQ; memory:// acks one by one, with the same outcome)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import wait_for
from transport import Event, EventBus, Inbound, Subscription


def _drain_until(bus: EventBus, done: Any, what: str) -> None:
    def step() -> bool:
        bus.drain(0.05)
        return bool(done())

    wait_for(step, what=what)


def _consume(bus: EventBus, queue: str, n: int) -> list[Inbound]:
    got: list[Inbound] = []
    bus.consume([Subscription(queue, ("ocis.acks.#",))], got.append)
    _drain_until(bus, lambda: len(got) >= n, f"{n} deliveries")
    return got


def _redelivered(url: str, unique: str, queue: str) -> list[int]:
    """Consume again on a new connection for half a second: the numbers of the events that came back."""
    bus = EventBus(url, exchange=unique)
    try:
        got: list[Inbound] = []
        bus.consume([Subscription(queue, ("ocis.acks.#",))], got.append)
        until = time.monotonic() + 0.5
        _drain_until(bus, lambda: time.monotonic() > until, "half a second of redeliveries")
        return sorted(int(i.event.payload["n"]) for i in got if i.event is not None)
    finally:
        bus.close()


@pytest.fixture
def setup(broker_url: str, unique: str, buses: list[object]) -> tuple[EventBus, str]:
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    queue = f"{unique}.acks.h"
    bus.declare(Subscription(queue, ("ocis.acks.#",)))
    bus.publish_many([Event("ocis.acks.made", {"n": i}) for i in range(6)])
    return bus, queue


def _spy_acks(got: list[Inbound]) -> list[tuple[Any, bool]]:
    calls: list[tuple[Any, bool]] = []
    channel = got[0].message.channel
    real = channel.basic_ack

    def basic_ack(tag: Any, multiple: bool = False) -> Any:
        calls.append((tag, multiple))
        return real(tag, multiple=multiple)

    channel.basic_ack = basic_ack
    return calls


def test_a_run_of_the_oldest_deliveries_is_acked_at_once(
    broker_url: str, unique: str, setup: tuple[EventBus, str]
) -> None:
    bus, queue = setup
    got = _consume(bus, queue, 6)
    calls = _spy_acks(got)
    bus.ack_many(got)
    assert all(i.acked for i in got)
    if broker_url.startswith("amqp"):
        assert calls == [(got[-1].message.delivery_tag, True)]  # one frame for six messages
    else:
        assert len(calls) == 6
    bus.close()
    assert _redelivered(broker_url, unique, queue) == []


def test_a_message_still_being_handled_is_not_covered(
    broker_url: str, unique: str, setup: tuple[EventBus, str]
) -> None:
    bus, queue = setup
    got = _consume(bus, queue, 6)
    calls = _spy_acks(got)
    first, *rest = got
    bus.ack_many(rest[:2])  # the oldest is still running: these two are acked one by one
    bus.ack(first)  # now the oldest unsettled is the fourth
    bus.ack_many(rest[2:])
    if broker_url.startswith("amqp"):
        tags = [i.message.delivery_tag for i in got]
        assert calls == [(tags[1], False), (tags[2], False), (tags[0], False), (tags[5], True)]
    bus.close()
    assert _redelivered(broker_url, unique, queue) == []


def test_an_unsettled_message_older_than_the_run_comes_back(
    broker_url: str, unique: str, setup: tuple[EventBus, str]
) -> None:
    bus, queue = setup
    got = _consume(bus, queue, 6)
    n = {int(i.event.payload["n"]): i for i in got if i.event is not None}
    bus.ack_many([n[0], n[1], n[3], n[4], n[5]])  # n=2 is kept unacked (say, its dead-letter copy failed)
    assert not n[2].acked
    bus.close()  # the broker gives back what was not acked: only that one
    assert _redelivered(broker_url, unique, queue) == [2]
