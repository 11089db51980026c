"""`AsyncPublisher`: awaits that return once the broker confirmed, batched on one thread, with the sync
bus's errors, on memory:// and RabbitMQ."""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.helpers import wait_for
from transport import (
    AsyncPublisher,
    Event,
    EventBus,
    EventLoopMismatch,
    Inbound,
    InvalidArgument,
    InvalidEvent,
    PublisherClosed,
    PublishError,
    Subscription,
    Unroutable,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _receive(bus: EventBus, queue: str, n: int) -> list[Event]:
    got: list[Inbound] = []

    def take(inbound: Inbound) -> None:
        got.append(inbound)
        bus.ack(inbound)

    def step() -> bool:
        while len(got) < n and bus.drain(0.05):  # one message per drain on memory://
            pass
        return len(got) >= n

    bus.consume([Subscription(queue, ("ocis.aio.#",))], take)
    wait_for(step, what=f"{n} events on {queue}")
    return [i.event for i in got if i.event is not None]


@pytest.fixture
def consumer(broker_url: str, unique: str, buses: list[object]) -> tuple[EventBus, str]:
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    queue = f"{unique}.aio.h"
    bus.declare(Subscription(queue, ("ocis.aio.#",)))
    return bus, queue


def _publisher(broker_url: str, unique: str, buses: list[object], **options: Any) -> AsyncPublisher:
    pub = AsyncPublisher(broker_url, exchange=unique, **options)
    buses.append(pub)  # its bus's queues and exchange are deleted after the test
    return pub


def test_publish_returns_the_confirmed_event_and_a_consumer_gets_it(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """`await publish(...)` returns the event once confirmed; the consumer receives that very event."""

    async def main() -> Event:
        async with _publisher(broker_url, unique, buses, source="uploads") as pub:
            return await pub.publish("ocis.aio.sent", {"n": 1}, headers={"k": "v"}, correlation_id="c1")

    event = run(main())
    (got,) = _receive(*consumer, 1)
    assert got.id == event.id
    assert (got.type, dict(got.payload), got.source, got.correlation_id) == ("ocis.aio.sent", {"n": 1}, "uploads", "c1")
    assert dict(got.headers) == {"k": "v"}


def test_two_thousand_concurrent_awaits_confirm_in_far_fewer_batches(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """2,000 concurrent publishes all confirm, in a few batches (at most 1 per 50 publishes)."""

    async def main() -> tuple[list[Event], AsyncPublisher]:
        async with _publisher(broker_url, unique, buses) as pub:
            events = await asyncio.gather(*(pub.publish("ocis.aio.many", {"n": i}) for i in range(2000)))
            return events, pub

    events, pub = run(main())
    assert pub.confirmed == 2000
    assert 1 <= pub.batches <= 40, pub.batches
    got = _receive(*consumer, 2000)
    assert sorted(e.id for e in got) == sorted(e.id for e in events)


def test_a_bad_payload_raises_at_once_and_loses_nothing_else(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """A payload that is not JSON raises InvalidEvent in the caller; the publishes around it confirm."""

    async def main() -> list[Any]:
        async with _publisher(broker_url, unique, buses) as pub:
            calls = [pub.publish("ocis.aio.mixed", {"n": i}) for i in range(10)]
            calls.insert(5, pub.publish("ocis.aio.mixed", {"bad": object()}))
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = run(main())
    assert isinstance(outcomes[5], InvalidEvent)
    assert "not JSON-serialisable" in str(outcomes[5])
    good = [o for i, o in enumerate(outcomes) if i != 5]
    assert all(isinstance(o, Event) for o in good)
    assert sorted(e.payload["n"] for e in _receive(*consumer, 10)) == list(range(10))


def test_an_unroutable_mandatory_publish_fails_alone(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """With mandatory=True, the one event nobody is bound to raises Unroutable; the others in its batch confirm."""

    async def main() -> list[Any]:
        async with _publisher(broker_url, unique, buses) as pub:
            calls = [pub.publish("ocis.aio.routed", {"n": i}, mandatory=True) for i in range(6)]
            calls.insert(3, pub.publish("nobody.listens.here", {}, mandatory=True))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert pub.batches == 1  # they did share a batch
            return outcomes

    outcomes = run(main())
    error = outcomes[3]
    assert isinstance(error, Unroutable)
    assert len(error.failed) == 1
    assert next(iter(error.failed.values())).startswith("unroutable")
    assert all(isinstance(o, Event) for i, o in enumerate(outcomes) if i != 3)
    assert len(_receive(*consumer, 6)) == 6


def test_publish_many_encodes_all_first_and_reports_the_unroutable_ids(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """publish_many sends nothing when one event is bad; otherwise it raises Unroutable naming the failed id."""
    lost = Event("nobody.listens.here", {})

    async def main() -> None:
        async with _publisher(broker_url, unique, buses) as pub:
            with pytest.raises(InvalidEvent):
                await pub.publish_many([Event("ocis.aio.never", {}), Event("ocis.aio.never", {"x": {1, 2}})])
            with pytest.raises(Unroutable) as raised:
                await pub.publish_many([Event("ocis.aio.batch", {"n": 0}), lost], mandatory=True)
            assert set(raised.value.failed) == {lost.id}
            await pub.publish("ocis.aio.last", {"n": 1})

    run(main())
    assert [e.type for e in _receive(*consumer, 2)] == ["ocis.aio.batch", "ocis.aio.last"]


def test_the_callers_loop_keeps_ticking_while_5000_publishes_go_through(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A ticker task on the caller's loop (a 5 ms sleep) keeps ticking while 5,000 publishes are awaited,
    500 at a time: its median gap stays under 20 ms and 95 % of its gaps under 50 ms. A publisher that
    blocked the loop for a batch of 500 would make most gaps that long. (Not the longest gap: on a busy
    host the scheduler alone can pause a thread that long. The test runner's own objects are frozen out
    of the garbage collector first: a full collection over them pauses every thread alike.)"""

    async def main() -> tuple[list[float], int]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with _publisher(broker_url, unique, buses) as pub:
            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.02)
            window = asyncio.Semaphore(500)  # 500 publishes awaited at a time

            async def one(i: int) -> None:
                try:
                    await pub.publish("ocis.aio.load", {"n": i})
                finally:
                    window.release()

            tasks = []
            for i in range(5000):
                await window.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            done.set()
            await tick
            return gaps, pub.confirmed

    gc.collect()
    gc.freeze()
    try:
        gaps, confirmed = run(main())
    finally:
        gc.unfreeze()
    median, p95 = statistics.median(gaps), statistics.quantiles(gaps, n=20)[-1]
    print(f"gaps between ticks: median {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, max {max(gaps) * 1000:.1f} ms")
    assert confirmed == 5000
    assert median < 0.02, f"the loop was blocked: median gap {median * 1000:.1f} ms"
    assert p95 < 0.05, f"the loop was blocked: 95th percentile gap {p95 * 1000:.1f} ms"


def test_a_cancelled_await_breaks_neither_the_thread_nor_other_awaits(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """Cancelling the tasks awaiting some publishes leaves the others confirmed and the publisher usable."""

    async def main() -> int:
        async with _publisher(broker_url, unique, buses) as pub:
            tasks = [asyncio.create_task(pub.publish("ocis.aio.cancel", {"n": i})) for i in range(200)]
            await asyncio.sleep(0)
            for t in tasks[::2]:
                t.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            await pub.publish("ocis.aio.after", {"n": -1})
            return sum(isinstance(o, Event) for o in outcomes)

    confirmed = run(main())
    assert confirmed >= 100  # the uncancelled ones (a cancel that came too late leaves a confirmed one too)
    after = [e for e in _receive(*consumer, 201) if e.type == "ocis.aio.after"]
    assert len(after) == 1  # the cancelled ones were already queued: they were sent all the same


def test_publishing_after_close_or_from_another_loop_raises_a_typed_error(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """After close(), publish raises PublisherClosed; from a second event loop, EventLoopMismatch; start()
    after close() works again."""
    pub = _publisher(broker_url, unique, buses)
    loop_a = asyncio.new_event_loop()
    try:
        loop_a.run_until_complete(pub.start())
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                asyncio.run(pub.publish("ocis.aio.other", {}))
            except EventLoopMismatch as exc:
                errors.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
        assert len(errors) == 1
        assert "one publisher per event loop" in str(errors[0])
        loop_a.run_until_complete(pub.close())
        with pytest.raises(PublisherClosed, match="start\\(\\) it again"):
            loop_a.run_until_complete(pub.publish("ocis.aio.closed", {}))
    finally:
        loop_a.close()

    async def again() -> Event:
        await pub.start()
        try:
            return await pub.publish("ocis.aio.again", {})
        finally:
            await pub.close()

    assert run(again()).type == "ocis.aio.again"


def test_close_waits_for_the_publishes_in_flight(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str]
) -> None:
    """close() called while 1,000 publishes are awaited returns after they are all confirmed."""

    async def main() -> list[Any]:
        pub = _publisher(broker_url, unique, buses)
        await pub.start()
        tasks = [asyncio.create_task(pub.publish("ocis.aio.closing", {"n": i})) for i in range(1000)]
        await asyncio.sleep(0)  # they are queued
        await pub.close()
        assert all(t.done() for t in tasks)
        return [t.result() for t in tasks]

    assert len(run(main())) == 1000
    assert len(_receive(*consumer, 1000)) == 1000


def test_a_broker_that_is_not_there_raises_publish_error_like_the_sync_bus(unique: str) -> None:
    """With nothing listening, publish raises the PublishError the sync bus raises, within the connect timeout."""
    url = "amqp://guest:guest@127.0.0.1:1//"
    sync = EventBus(url, exchange=unique, connect_timeout=0.3)
    with pytest.raises(PublishError) as sync_error:
        sync.publish(Event("ocis.aio.nowhere", {}))

    async def main() -> None:
        pub = AsyncPublisher(url, exchange=unique, connect_timeout=0.3)
        assert not pub.started  # nothing connects in the constructor
        with pytest.raises(PublishError) as raised:
            await pub.publish("ocis.aio.nowhere", {})
        assert type(raised.value) is type(sync_error.value)
        assert str(raised.value).startswith("not published: cannot reach the broker")
        await pub.close()

    run(main())


@pytest.mark.rabbitmq
def test_an_idle_publisher_keeps_its_connection_through_missed_heartbeats(amqp_url: str, unique: str) -> None:
    """Idle for 4 heartbeat intervals (heartbeat 1 s), the publisher keeps its connection open (its thread
    services the heartbeats), and the next publish confirms on that same connection. (Without that, the
    broker closes the connection after 2 missed heartbeats, and that publish fails.)"""
    url = f"{amqp_url}?heartbeat=1"

    async def main() -> None:
        async with AsyncPublisher(url, exchange=unique) as pub:
            await pub.publish("ocis.aio.idle", {})
            before = pub.bus.connection
            await asyncio.sleep(4)  # idle: the condition under test
            await pub.publish("ocis.aio.idle", {})
            assert pub.bus.connection is before
            pub.bus.delete_topology()

    run(main())


@pytest.mark.parametrize("timeout", ["5", -1, 0, float("nan"), True])
def test_a_bad_timeout_raises_at_the_caller_and_the_publisher_goes_on(
    broker_url: str, unique: str, buses: list[object], consumer: tuple[EventBus, str], timeout: Any
) -> None:
    """``timeout=`` is checked on the caller's side: a wrong one raises InvalidArgument at once and
    reaches neither the broker nor the publisher's thread, which goes on publishing."""

    async def main() -> None:
        async with _publisher(broker_url, unique, buses) as pub:
            with pytest.raises(InvalidArgument, match="timeout"):
                await pub.publish("ocis.aio.bad", {}, timeout=timeout)
            with pytest.raises(InvalidArgument, match="timeout"):
                await pub.publish_many([Event("ocis.aio.bad")], timeout=timeout)
            await pub.publish("ocis.aio.after", {"n": 1})

    run(main())
    assert [e.type for e in _receive(*consumer, 1)] == ["ocis.aio.after"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"publish_timeout": "x"}, "publish_timeout is a number of seconds"),
        ({"connect_timeout": 0}, "connect_timeout must be more than 0 seconds"),
        ({"confirm_window": 0}, "confirm_window is a number of messages"),
    ],
)
def test_bad_options_are_refused_when_the_publisher_is_made(options: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        AsyncPublisher("memory://", **options)
    with pytest.raises(InvalidArgument, match=says):
        EventBus("memory://", **options)
    with pytest.raises(InvalidArgument, match="broker URL is a string"):
        AsyncPublisher(123)  # type: ignore[arg-type]


def test_an_error_in_the_publishers_thread_fails_its_awaiters_instead_of_leaving_them_waiting(
    unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the publisher's thread ever fail (a bug), the publishes it held raise PublishError instead
    of waiting for ever, later ones raise PublisherClosed saying what to do, and close() then start()
    publishes again."""

    async def main() -> tuple[object, BaseException | None, Event]:
        pub = _publisher("memory://", unique, buses)
        await pub.start()
        with monkeypatch.context() as m:
            m.setattr(pub, "_send", lambda *a: 1 / 0)
            failed = await asyncio.wait_for(
                asyncio.gather(pub.publish("ocis.aio.lost", {}), return_exceptions=True), timeout=5
            )
        wait_for(lambda: not pub.started, what="the thread to stop")
        try:
            await pub.publish("ocis.aio.later", {})
        except PublisherClosed as exc:
            later: BaseException | None = exc
        else:
            later = None
        await pub.close()
        await pub.start()
        event = await pub.publish("ocis.aio.again", {})
        await pub.close()
        return failed[0], later, event

    first, later, event = run(main())
    assert isinstance(first, PublishError)
    assert "ZeroDivisionError" in str(first)
    assert isinstance(later, PublisherClosed)
    assert "close() it and start() it again" in str(later)
    assert event.type == "ocis.aio.again"
