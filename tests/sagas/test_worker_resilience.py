"""The worker and the bus under broker trouble: bounded publishes, reconnects, heartbeats, logs."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import structlog

from sagas import App, Context, Event, EventBus, Service, Worker
from tests.helpers import wait_for
from transport import PublishError


def test_publish_to_an_unreachable_broker_raises_in_bounded_time() -> None:
    """With no broker listening, publish raises PublishError within the connect timeout, never hangs."""
    bus = EventBus("amqp://guest:guest@127.0.0.1:1//", connect_timeout=1.0, publish_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(PublishError, match="not published"):
        bus.publish(Event("ocis.files.uploaded"))
    assert time.monotonic() - t0 < 3.0


@pytest.mark.rabbitmq
def test_worker_reconnects_after_the_connection_breaks(amqp_url: str, unique: str) -> None:
    """When its socket dies, the worker reconnects, consumes again, and nothing is lost."""
    got: list[int] = []
    svc = Service("survivor")
    svc.on("ocis.files.uploaded", name="count")(lambda e: got.append(e.payload["i"]))
    worker = Worker(App(svc, exchange=unique), broker=amqp_url, store="memory://")
    bus = EventBus(amqp_url, exchange=unique)
    try:
        with worker.running():
            bus.publish_many([Event("ocis.files.uploaded", {"i": i}) for i in range(100)])
            wait_for(lambda: len(set(got)) == 100, what="first 100")
            conn = worker.bus.connection
            assert conn is not None
            conn.connection.sock.shutdown(socket.SHUT_RDWR)  # the network goes away under the worker
            bus.publish_many([Event("ocis.files.uploaded", {"i": i}) for i in range(100, 200)])
            wait_for(lambda: len(set(got)) == 200, what="the next 100 after the reconnect")
        assert worker.reconnects >= 1
        assert set(got) == set(range(200))
    finally:
        bus.declared_queues |= worker.bus.declared_queues
        bus.delete_topology()
        bus.close()


@pytest.mark.rabbitmq
def test_heartbeats_continue_during_a_long_handler(amqp_url: str, unique: str) -> None:
    """A handler that runs for several heartbeat intervals does not lose the connection or its message."""
    calls: list[float] = []
    svc = Service("slow")

    @svc.on("ocis.files.uploaded")
    def crunch(event: Event) -> None:
        calls.append(time.monotonic())
        threading.Event().wait(3.5)  # longer than 2 heartbeat intervals of 1 s

    bus = EventBus(amqp_url, exchange=unique)
    worker = Worker(
        App(svc, exchange=unique),
        broker=amqp_url,
        store="memory://",
        bus=EventBus(amqp_url, exchange=unique, heartbeat=1),
    )
    try:
        with worker.running():
            bus.publish(Event("ocis.files.uploaded"))
            wait_for(lambda: worker.handled == 1, timeout=15, what="the long handler to finish")
        assert len(calls) == 1
        assert worker.reconnects == 0
    finally:
        bus.declared_queues |= worker.bus.declared_queues
        bus.delete_topology()
        bus.close()


def test_every_handled_message_is_logged_with_its_fields(unique: str) -> None:
    """The worker logs event id, type, service, handler, attempt, outcome and duration per message."""
    svc = Service("logged")
    svc.on("ocis.files.uploaded", name="note")(lambda e: None)
    worker = Worker(App(svc, exchange=unique), broker="memory://", store="memory://")
    bus = EventBus("memory://", exchange=unique)
    event = Event("ocis.files.uploaded")
    with structlog.testing.capture_logs() as logs:
        worker.start()
        bus.publish(event)
        worker.run_until(lambda: worker.handled == 1)
        worker.shutdown()
    (entry,) = [e for e in logs if e["event"] == "message.handled"]
    assert entry["event_id"] == event.id
    assert entry["event_type"] == "ocis.files.uploaded"
    assert entry["service"] == "logged"
    assert entry["handler"] == "note"
    assert entry["attempt"] == 1
    assert entry["outcome"] == "ok"
    assert entry["duration_ms"] >= 0


def test_logging_redacts_credentials() -> None:
    """configure_logging's processor hides passwords in URL fields."""
    from sagas._logging import redact_credentials

    out = redact_credentials(None, "info", {"broker": "amqp://svc:hunter2@rabbit:5672/ocis"})
    assert "hunter2" not in out["broker"]
    assert out["broker"] == "amqp://svc:***@rabbit:5672/ocis"


@pytest.mark.rabbitmq
def test_a_multi_host_url_fails_over_to_a_broker_that_answers(amqp_url: str, unique: str) -> None:
    """With the first broker of a ';'-separated URL down, the bus connects to the next one at once."""
    bus = EventBus(f"amqp://guest:guest@127.0.0.1:1//;{amqp_url}", exchange=unique, connect_timeout=2.0)
    try:
        t0 = time.monotonic()
        bus.publish(Event("ocis.files.uploaded"))
        assert time.monotonic() - t0 < 2.0
    finally:
        bus.delete_topology()
        bus.close()


def test_a_store_failure_sends_the_message_back_instead_of_crashing(unique: str) -> None:
    """If the store fails while the worker dispatches or settles a message (a database restarting), the
    message comes back through a delay queue and is handled once the store answers; the worker runs on."""
    from sagas import MemoryStore

    class Flaky(MemoryStore):
        failures = 2

        def seen(self, consumer: str, message_id: str) -> bool:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the database is restarting")
            return super().seen(consumer, message_id)

        def answers(self, inbox: Any, replies: Any) -> Any:  # (the inbox read of claimed messages)
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the database is restarting")
            return super().answers(inbox, replies)

    got: list[str] = []
    svc = Service("steady")
    svc.on("ocis.files.uploaded", idempotent=True, name="note")(lambda e: got.append(e.id))
    store = Flaky()
    worker = Worker(App(svc, exchange=unique), broker="memory://", store=store)
    bus = EventBus("memory://", exchange=unique)
    event = Event("ocis.files.uploaded")
    with worker.running():
        bus.publish(event)
        wait_for(lambda: got == [event.id], timeout=15, what="the event handled after the store recovered")
    assert store.failures == 0
    assert store.seen("steady.note", event.id)


def test_a_store_failure_is_retried_with_the_handlers_own_retry_policy(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """When the worker itself fails on a message (the store is down), the message goes back through the
    handler's own delay queues. (It used the saga policy's 1 s delay, a queue a handler with
    Retry(initial=0.05) does not have: the copy was unroutable and the worker crashed.)"""
    from sagas import MemoryStore, Retry

    class FlakyStore(MemoryStore):
        failures = 2

        def seen(self, consumer: str, message_id: str) -> bool:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the store is restarting")
            return super().seen(consumer, message_id)

        def answers(self, inbox: Any, replies: Any) -> Any:  # (the inbox read of claimed messages)
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the store is restarting")
            return super().answers(inbox, replies)

    handled: list[str] = []
    svc = Service("indexer")

    @svc.on("ocis.files.uploaded", idempotent=True, retry=Retry(attempts=4, initial=0.05, factor=1.0))
    def index(event: Event) -> None:
        handled.append(event.id)

    store = FlakyStore()
    worker = Worker(App(svc, exchange=unique), broker=broker_url, store=store)
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        event = Event("ocis.files.uploaded")
        bus.publish(event)
        wait_for(lambda: handled == [event.id], 10, "the event handled once the store is back")
    assert store.failures == 0
    assert bus.dead_letters() == []


def test_a_dead_letter_the_broker_refuses_leaves_the_message_unacked(unique: str) -> None:
    """If the broker refuses a handler failure's dead-letter copy (its node is down, say), the worker
    keeps the message unacked and goes on, instead of crashing."""
    from sagas import Reject

    svc = Service("picky")
    handled: list[str] = []

    @svc.on("ocis.files.uploaded")
    def refuse(event: Event) -> None:
        raise Reject("not this one")

    @svc.on("ocis.files.deleted", name="later")
    def later(event: Event) -> None:
        handled.append(event.id)

    worker = Worker(App(svc, exchange=unique), broker="memory://", store="memory://")
    worker.start()
    try:

        def refused(*args: object, **kwargs: object) -> None:
            raise PublishError("home node of the dead-letter queue is down")

        worker.bus.dead_letter = refused  # type: ignore[method-assign]
        bus = EventBus("memory://", exchange=unique)
        bus.publish(Event("ocis.files.uploaded"))
        after = Event("ocis.files.deleted")
        bus.publish(after)
        with structlog.testing.capture_logs() as logs:
            assert worker.run_until(
                lambda: handled == [after.id] and any(e["event"] == "message.failed" for e in logs), timeout=5
            )
        kept = [e for e in logs if e["event"] == "message.kept_unacked"]
        assert len(kept) == 1
        assert [e["outcome"] for e in logs if e["event"] == "message.failed"] == ["kept-unacked"]
    finally:
        worker.shutdown()


# -- a handler that finishes after its connection broke ---------------------------------------------------


def test_a_request_handled_while_the_broker_restarted_is_answered_from_its_cache_not_run_again() -> None:
    """A participant's call is still running when the broker restarts: its message cannot be acked on
    the new connection and is redelivered. Its reply is published and cached all the same, so the
    redelivery is answered from the reply cache and the booking is made once (it was made twice)."""
    from sagas.testing import Harness
    from tests.properties.test_saga_properties import BROKEN, EFFECTS, app

    EFFECTS.clear()
    BROKEN.clear()  # (a property test's run may have left trips broken)
    with Harness(app, handler_seconds=1.0) as h:
        h.publish("travel.trips.requested", {"trip": "trip-1"})
        h.run()
        assert h.pending()["handling"] == 1  # the hotel's call runs (a virtual second)
        h.restart_broker()
        h.settle()
        assert {r.state for r in h.sagas()} == {"completed"}
    assert [name for name, *_ in EFFECTS] == ["book_hotel", "rent_car", "book_flight"]


def test_an_idempotent_handler_finished_after_the_broker_restarted_runs_once_and_publishes_once() -> None:
    """An idempotent handler's call outlives its connection: its follow-up is published and its inbox
    record committed on the new connection, so the redelivered event is skipped as a duplicate."""
    from sagas.testing import Harness

    svc = Service("indexer")
    ran: list[str] = []
    followed: list[str] = []

    @svc.on("ocis.files.uploaded", idempotent=True)
    def index(event: Event, ctx: Context) -> None:
        ran.append(event.id)
        ctx.publish("ocis.files.indexed", {"path": event.payload["path"]})

    @svc.on("ocis.files.indexed")
    def indexed(event: Event) -> None:
        followed.append(event.id)

    with Harness(svc, handler_seconds={"indexer.index": 1.0}) as h, structlog.testing.capture_logs() as logs:
        h.publish("ocis.files.uploaded", {"path": "/a.txt"})
        h.run()
        assert h.pending()["handling"] == 1
        h.restart_broker()
        h.settle()
    assert len(ran) == 1
    assert len(followed) == 1
    assert [line["kind"] for line in logs if line["event"] == "message.ignored"] == ["duplicate"]
