"""Topology changes, missing queues and replays: clear errors, nothing lost."""

from __future__ import annotations

import pytest

from sagas import AT_MOST_ONCE, App, ConfigurationError, Context, Event, EventBus, Reject, Retry, Service, Worker
from tests.helpers import wait_for
from transport import Subscription, TopologyMismatch


def test_follow_up_ids_are_stable_across_reruns() -> None:
    """A handler that runs twice for one event publishes follow-ups with the same ids both times."""
    event = Event("ocis.files.uploaded")
    first, second = Context(event, "svc", "h", 1), Context(event, "svc", "h", 2)
    a = [first.publish("ocis.files.scanned"), first.publish("ocis.files.indexed")]
    b = [second.publish("ocis.files.scanned"), second.publish("ocis.files.indexed")]
    assert [e.id for e in a] == [e.id for e in b]
    assert a[0].id != a[1].id
    assert Context(event, "svc", "other", 1).publish("ocis.files.scanned").id != a[0].id


def test_worker_refuses_a_bus_on_another_exchange() -> None:
    """Passing a bus whose exchange differs from the app's is a configuration error."""
    svc = Service("x")
    svc.on("ocis.a.b", name="h")(lambda e: None)
    with pytest.raises(ConfigurationError, match="same exchange"):
        Worker(App(svc, exchange="one"), bus=EventBus("memory://", exchange="two"))


def test_changed_queue_arguments_raise_topology_mismatch(broker_url: str, unique: str, buses: list[object]) -> None:
    """Re-declaring a queue with other arguments fails with TopologyMismatch and says it is a migration."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    bus.declare(Subscription(queue=f"{unique}.svc.h", patterns=("ocis.#",), delivery_limit=20))
    with pytest.raises(TopologyMismatch, match="migration"):
        bus.declare(Subscription(queue=f"{unique}.svc.h", patterns=("ocis.#",), delivery_limit=5))


def test_retry_recreates_a_deleted_delay_queue(broker_url: str, unique: str, buses: list[object]) -> None:
    """If an operator deleted a delay queue, the next retry declares it again instead of failing."""
    calls: list[int] = []
    svc = Service("flaky")

    @svc.on("ocis.files.uploaded", retry=Retry(attempts=2, initial=0.05))
    def work(event: Event, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("transient")

    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        delay_queue = f"{unique}.flaky.work.delay.50"
        assert delay_queue in worker.bus.declared_queues
        ch = bus.channel()
        ch.queue_delete(queue=delay_queue)
        ch.close()
        bus.publish(Event("ocis.files.uploaded"))
        wait_for(lambda: calls == [1, 2], what="the retry")


def test_replay_keeps_letters_whose_queue_is_gone(broker_url: str, unique: str, buses: list[object]) -> None:
    """Replaying a dead letter whose queue no longer exists leaves it in the dead-letter queue, with why."""
    svc = Service("gone")

    @svc.on("ocis.files.uploaded", delivery=AT_MOST_ONCE)
    def work(event: Event) -> None:
        raise Reject("bad")

    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        bus.publish(Event("ocis.files.uploaded"))
        (letter,) = wait_for(lambda: bus.dead_letters(), what="dead letter")
    # The at-most-once queue was auto-deleted with its last consumer.
    skipped: dict[str, str] = {}
    assert bus.replay_dead(skipped=skipped) == []
    assert "does not exist" in skipped[letter.id]
    assert [d.id for d in bus.dead_letters()] == [letter.id]


def test_at_most_once_prefetch_bounds_what_a_worker_holds(broker_url: str, unique: str, buses: list[object]) -> None:
    """At-most-once messages are acked as their handler starts, so prefetch still bounds the backlog a
    worker takes from the queue."""
    import threading

    release = threading.Event()
    started: list[str] = []
    svc = Service("bounded")

    @svc.on("ocis.users.seen", delivery=AT_MOST_ONCE, prefetch=5, concurrency=1)
    def seen(event: Event) -> None:
        started.append(event.id)
        release.wait(10)

    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://", concurrency=1)
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        bus.publish_many([Event("ocis.users.seen") for _ in range(50)])
        wait_for(lambda: started, what="first handler")
        ch = bus.channel()
        try:
            ready = wait_for(
                lambda: (n := ch.queue_declare(queue=f"{unique}.bounded.seen", passive=True).message_count) <= 45 and n,
                what="the worker to fill its prefetch",
            )
        finally:
            ch.close()
        assert ready >= 44  # the worker holds at most its prefetch of 5 (one acked and running)
        release.set()
        wait_for(lambda: len(started) == 50, what="all handled")


def test_a_worker_that_fails_to_start_leaves_nothing_open(broker_url: str, unique: str, buses: list[object]) -> None:
    """A start that fails on the topology (not on an unreachable broker) closes the worker's connection."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    bus.declare(Subscription(queue=f"{unique}.svc.h", patterns=("ocis.#",), delivery_limit=5))
    svc = Service("svc")
    svc.on("ocis.files.uploaded", name="h")(lambda e: None)
    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://", grace_period=2)
    buses.append(worker)
    with pytest.raises(TopologyMismatch):
        worker.start()
    assert not worker.bus.connected
    with pytest.raises(RuntimeError, match="shutdown"):
        worker.handlers.pool.submit(print)  # the pool was shut down: no thread is left behind
