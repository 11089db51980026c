"""A broker that stops answering without closing the connection (a partition, a paused host): issue 15, part 4.

Every test puts a :class:`~blackhole.BlackHoleProxy` (scripts/blackhole.py) between the client and a private
RabbitMQ node and makes it go black: nothing is forwarded either way and nothing is closed. On the code before
this work, a publish, a close and the worker's reconnect waited for the broker's close-ok until the partition
ended; here the partition ends by itself after ``PARTITION`` seconds so that such a wait shows up as a
duration, never as a hung run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from blackhole import BlackHoleProxy, black_hole
from private_services import RabbitNode, private_rabbit_node, rabbitmq_installed

from tests.conftest import _need_installed
from transport import AsyncPublisher, ConnectionLost, Event, EventBus, PublishError, PublishTimeout, Subscription

pytestmark = [pytest.mark.faults, pytest.mark.slow]

#: seconds after which a partition ends by itself (the code before this work returned only then)
PARTITION = 25.0
#: the heartbeat of the tests that wait for one to be missed, in seconds
HEARTBEAT = 2.0


@pytest.fixture
def proxy(private_rabbit: RabbitNode) -> Iterator[BlackHoleProxy]:
    """A black-hole proxy to the private node, forwarding until a test freezes it."""
    with black_hole(private_rabbit.port) as p:
        yield p


@pytest.fixture
def partition(proxy: BlackHoleProxy) -> Iterator[BlackHoleProxy]:
    """The proxy, frozen for the length of the test or ``PARTITION`` seconds, whichever ends first."""
    yield proxy
    proxy.thaw()


def _freeze(proxy: BlackHoleProxy) -> threading.Timer:
    proxy.freeze()
    timer = threading.Timer(PARTITION, proxy.thaw)
    timer.daemon = True
    timer.start()
    return timer


def _delete_topology(url: str, exchange: str, queues: set[str] | None = None) -> None:
    cleaner = EventBus(url, exchange=exchange)
    cleaner.declared_queues |= queues or set()
    cleaner.delete_topology()
    cleaner.close()


def test_publish_to_a_hung_broker_raises_within_its_timeout(
    partition: BlackHoleProxy, private_rabbit: RabbitNode, unique: str
) -> None:
    """publish(timeout=5) on a connection whose broker went silent raises PublishError in under 8 s (the
    timeout and the bounded close), not when the partition ends."""
    bus = EventBus(partition.url(private_rabbit.url), exchange=unique)
    try:
        bus.publish(Event("test.hung.ping", {"n": 0}), timeout=5)  # connected and confirmed before the partition
        timer = _freeze(partition)
        t0 = time.monotonic()
        with pytest.raises(PublishError) as raised:
            bus.publish(Event("test.hung.ping", {"n": 1}), timeout=5)
        elapsed = time.monotonic() - t0
        timer.cancel()
        assert elapsed < 8.0, f"publish(timeout=5) raised after {elapsed:.1f}s: {raised.value}"
        assert not bus.connected
    finally:
        partition.thaw()
        bus.close()
        _delete_topology(private_rabbit.url, unique)


def test_close_on_a_hung_broker_returns_within_its_bound(
    partition: BlackHoleProxy, private_rabbit: RabbitNode, unique: str
) -> None:
    """close() of a connection whose broker went silent returns within 4 s (a close-ok is waited for 2 s at
    most, then the socket is dropped), not when the partition ends."""
    bus = EventBus(partition.url(private_rabbit.url), exchange=unique)
    bus.publish(Event("test.hung.ping", {"n": 0}))
    timer = _freeze(partition)
    t0 = time.monotonic()
    bus.close()
    elapsed = time.monotonic() - t0
    timer.cancel()
    partition.thaw()
    _delete_topology(private_rabbit.url, unique)
    assert elapsed < 4.0, f"close() returned after {elapsed:.1f}s"
    assert not bus.connected


def test_a_silent_broker_is_dropped_within_two_heartbeats_during_one_long_drain(
    partition: BlackHoleProxy, private_rabbit: RabbitNode, unique: str
) -> None:
    """A consumer in one drain(timeout=30) on a broker that went silent raises ConnectionLost within 2
    heartbeat intervals (+1 s): heartbeats are checked on a timer inside the wait, not only between calls."""
    bus = EventBus(partition.url(private_rabbit.url), exchange=unique, heartbeat=HEARTBEAT)
    sub = Subscription(queue=f"{unique}.q", patterns=("test.hung.#",))
    try:
        bus.declare(sub)
        bus.consume([sub], lambda inbound: bus.ack(inbound))
        bus.publish(Event("test.hung.ping", {"n": 0}))
        bus.drain(1.0)
        timer = _freeze(partition)
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            bus.drain(30.0)
        elapsed = time.monotonic() - t0
        timer.cancel()
        assert elapsed <= 2 * HEARTBEAT + 1.0, f"noticed after {elapsed:.1f}s (heartbeat {HEARTBEAT:g}s)"
        assert not bus.connected
    finally:
        partition.thaw()
        bus.close()
        _delete_topology(private_rabbit.url, unique, bus.declared_queues)


@pytest.fixture(scope="module")
def second_rabbit() -> Iterator[RabbitNode]:
    """A second private node (not clustered with the first): the other host of a fail-over URL."""
    _need_installed(rabbitmq_installed(), "rabbitmq-server")
    with private_rabbit_node("sagas-test-b") as node:
        yield node


def test_a_worker_fails_over_from_a_silent_host_and_keeps_working(
    private_rabbit: RabbitNode, second_rabbit: RabbitNode, tmp_path: Path, unique: str
) -> None:
    """A worker process with URL hostA;hostB (heartbeat 2 s) whose hostA goes black notices within 2
    heartbeats (+1 s for the log and the poll), consumes on hostB soon after, and there handles the events
    and moves the sagas published to hostB during the partition; sagas caught in flight on hostA finish
    through their deadlines (re-sent on hostB). No saga is lost."""
    try:
        run = kit.black_hole_failover(
            private_rabbit, second_rabbit, tmp_path, unique, store=tmp_path / "s.db", heartbeat=HEARTBEAT
        )
    finally:
        for node in (private_rabbit, second_rabbit):
            kit.cleanup(unique, node, node.url)
    print(run)
    assert run.detect_seconds <= 2 * HEARTBEAT + 1.0, run
    assert run.failover_seconds <= run.detect_seconds + 5.0, run
    assert run.events_handled == run.events_during, run
    assert run.lost == 0, run
    assert run.moved >= run.started_during, run
    assert run.exit_code == 0, run


def test_awaited_publishes_to_a_hung_broker_raise_publish_timeout_within_their_timeout(
    partition: BlackHoleProxy, private_rabbit: RabbitNode, unique: str
) -> None:
    """50 publishes awaited with timeout=2 on a connection whose broker went silent all raise PublishTimeout
    in under 5 s (the timeout and the bounded close), not when the partition ends; the connection is dropped."""
    url = partition.url(private_rabbit.url)

    async def main() -> tuple[list[Any], float]:
        async with AsyncPublisher(url, exchange=unique) as pub:
            await pub.publish("ocis.aio.hung", {"n": 0})  # connected and confirmed before the partition
            timer = _freeze(partition)
            t0 = time.monotonic()
            outcomes = await asyncio.gather(
                *(pub.publish("ocis.aio.hung", {"n": i}, timeout=2) for i in range(50)), return_exceptions=True
            )
            elapsed = time.monotonic() - t0
            timer.cancel()
            assert not pub.bus.connected
            partition.thaw()
            return outcomes, elapsed

    try:
        outcomes, elapsed = asyncio.run(main())
    finally:
        partition.thaw()
        _delete_topology(private_rabbit.url, unique)
    assert all(isinstance(o, PublishTimeout) for o in outcomes), outcomes[:3]
    assert elapsed < 5.0, f"publish(timeout=2) raised after {elapsed:.1f}s"
