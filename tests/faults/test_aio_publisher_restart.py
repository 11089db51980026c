"""`AsyncPublisher` across a broker restart (``rabbitmqctl stop_app`` / ``start_app`` of the session's
private node): each awaited publish either confirms or raises the error a sync `EventBus` publishing
beside it raises in the same outage, and publishing works again once the broker is back."""

from __future__ import annotations

import asyncio
import threading
import time

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from private_services import RabbitNode

from transport import AsyncPublisher, Event, EventBus, PublishError, Subscription

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _kind(exc: BaseException) -> tuple[str, str]:
    """The class of a publish error and the start of its message: what a caller can tell apart."""
    return type(exc).__name__, str(exc).split(":")[0]


def test_awaited_publishes_across_a_broker_restart_confirm_or_raise_the_sync_bus_error(
    private_rabbit: RabbitNode, unique: str
) -> None:
    """Publishing every 20 ms through stop_app, 1 s down, start_app: every await confirms or raises a
    PublishError of a kind the sync bus also raised; some do fail; publishes after the restart confirm
    and every confirmed event is in the queue."""
    url = private_rabbit.url
    setup = EventBus(url, exchange=unique)
    queue = f"{unique}.aio.restart"
    setup.declare(Subscription(queue, ("ocis.aio.restart",)))
    setup.close()
    sync_kinds: set[tuple[str, str]] = set()
    stop = threading.Event()

    def sync_publisher() -> None:
        bus = EventBus(url, exchange=unique, connect_timeout=1.0, publish_timeout=5.0)
        try:
            while not stop.is_set():
                try:
                    bus.publish(Event("ocis.aio.sync", {}))
                except PublishError as exc:
                    sync_kinds.add(_kind(exc))
                time.sleep(0.02)
        finally:
            bus.close()

    async def main() -> tuple[list[str], dict[tuple[str, str], int], str]:
        confirmed: list[str] = []
        failures: dict[tuple[str, str], int] = {}
        done = asyncio.Event()

        async with AsyncPublisher(url, exchange=unique, connect_timeout=1.0, publish_timeout=5.0) as pub:

            async def publisher() -> None:
                while not done.is_set():
                    try:
                        confirmed.append((await pub.publish("ocis.aio.restart", {})).id)
                    except PublishError as exc:
                        failures[_kind(exc)] = failures.get(_kind(exc), 0) + 1
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(publisher())
            await asyncio.sleep(0.3)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, kit.restart_broker, private_rabbit, url, 1.0)
            await asyncio.sleep(0.5)  # a few more through the new connection
            done.set()
            await task
            after = (await pub.publish("ocis.aio.restart", {}, mandatory=True)).id
        return confirmed, failures, after

    sync = threading.Thread(target=sync_publisher)
    sync.start()
    try:
        confirmed, failures, after = asyncio.run(main())
    finally:
        stop.set()
        sync.join(30)
    try:
        assert failures, "no publish failed while the broker was down"
        assert set(failures) <= sync_kinds, (failures, sync_kinds)
        check = EventBus(url, exchange=unique)
        info = check.inspect_queue(queue)
        assert info is not None
        assert info.messages >= len(confirmed) + 1  # every confirmed one survived (the quorum queue keeps them)
        check.close()
        print(f"confirmed {len(confirmed)} + 1 after; failed {failures}; the sync bus raised {sync_kinds}")
        assert after
    finally:
        cleaner = EventBus(url, exchange=unique)
        cleaner.declared_queues.add(queue)
        cleaner.delete_topology()
        cleaner.close()
