"""``async def`` handlers and participants: run on the worker's event loop, beside sync ones.

The delivery promises themselves are checked for a mixed app by the conformance suite
(tests/sagas/test_delivery_conformance.py runs every test again with async handlers). Here: what is
particular to async handlers: the loop, its concurrency, the blocking-handler warning, and the
mistakes a handler can make.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog

from sagas import App, ConfigurationError, Event, EventBus, Retry, Service, Start, Step, StepSaga, Worker
from sagas._aio_runner import LoopWatch, timed
from tests.helpers import wait_for


def _worker(app: App, url: str, buses: list[object], **kw: Any) -> Worker:
    kw.setdefault("store", "memory://")
    worker = Worker(app, broker=url, **kw)
    buses.append(worker)
    return worker


def _bus(url: str, exchange: str, buses: list[object]) -> EventBus:
    bus = EventBus(url, exchange=exchange)
    buses.append(bus)
    return bus


def test_async_handlers_run_on_one_event_loop_beside_sync_ones(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """An async handler runs on the worker's one event loop (not on a pool thread), its follow-up goes
    out after it returns, and a sync handler of the same app handles that follow-up on the pool."""
    svc = Service("mixed")
    loops: set[int] = set()
    threads: dict[str, set[str]] = {"async": set(), "sync": set()}
    done: list[str] = []

    @svc.on("ocis.mixed.ping")
    async def ping(event: Event, ctx: Any) -> None:
        loops.add(id(asyncio.get_running_loop()))
        threads["async"].add(threading.current_thread().name)
        await asyncio.sleep(0.001)
        ctx.publish("ocis.mixed.pong", {"n": event.payload["n"]})

    @svc.on("ocis.mixed.pong")
    def pong(event: Event) -> None:
        threads["sync"].add(threading.current_thread().name)
        done.append(str(event.payload["n"]))

    assert [h.is_async for h in svc.handlers] == [True, False]
    bus = _bus(broker_url, unique, buses)
    with _worker(App(svc, exchange=unique), broker_url, buses).running():
        bus.publish_many([Event("ocis.mixed.ping", {"n": i}) for i in range(40)])
        wait_for(lambda: len(done) == 40, what="40 follow-ups handled")
    assert sorted(done, key=int) == [str(i) for i in range(40)]
    assert len(loops) == 1
    assert threads["async"] == {"sagas-loop"}
    assert all(name.startswith("sagas-handler") for name in threads["sync"])


def test_async_handlers_share_the_workers_concurrency(broker_url: str, unique: str, buses: list[object]) -> None:
    """With concurrency=3, at most three async handler calls run at once, although they all await."""
    svc = Service("limited")
    running, peak, done = [0], [0], []

    @svc.on("ocis.limited.work")
    async def work(event: Event) -> None:
        running[0] += 1  # (one loop thread: no lock needed)
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= 1
        done.append(event.id)

    bus = _bus(broker_url, unique, buses)
    with _worker(App(svc, exchange=unique), broker_url, buses, concurrency=3).running():
        bus.publish_many([Event("ocis.limited.work") for _ in range(30)])
        wait_for(lambda: len(done) == 30, what="30 handled")
    assert peak[0] == 3


class _Scan(StepSaga):
    """One request, answered by an async participant."""

    type = "scan"
    start = Start("ocis.upload.finished", key="upload_id")
    steps = [Step("scan", "ocis.antivirus.scan", timeout=30.0)]


def test_an_async_participant_answers_a_sagas_request(broker_url: str, unique: str, buses: list[object]) -> None:
    """``@svc.handles`` takes an ``async def``: its return value is the reply, and the saga completes
    with it; a failing async participant is retried like a sync one."""
    svc = Service("antivirus")
    calls: list[str] = []

    @svc.handles("ocis.antivirus.scan", retry=Retry(attempts=3, initial=0.05))
    async def scan(event: Event) -> dict[str, Any]:
        calls.append(event.payload["upload_id"])
        await asyncio.sleep(0)
        if calls.count(event.payload["upload_id"]) == 1:
            raise ConnectionError("the scanner is busy")  # (the first attempt of each: retried)
        return {"clean": True}

    bus = _bus(broker_url, unique, buses)
    worker = _worker(App(svc, sagas=[_Scan], exchange=unique), broker_url, buses)
    with worker.running():
        bus.publish_many([Event("ocis.upload.finished", {"upload_id": f"u{i}"}) for i in range(5)])

        def states() -> list[str]:
            return [(r.state if r else "-") for r in (worker.store.find_saga("scan", f"u{i}") for i in range(5))]

        wait_for(lambda: states() == ["completed"] * 5, what="five scans completed")
    assert sorted(calls) == sorted([f"u{i}" for i in range(5)] * 2)


def test_a_handler_that_blocks_the_loop_is_named(broker_url: str, unique: str, buses: list[object]) -> None:
    """An async handler that calls a blocking function stalls every async handler of the worker: a
    warning names it while it blocks (``handler.blocking_loop``, after a second) and once it returned
    (``handler.blocked_loop``, with how long), and a handler that awaits is not reported."""
    svc = Service("slow")
    returned: list[float] = []

    @svc.on("ocis.slow.work")
    async def blocks(event: Event) -> None:
        time.sleep(1.3)  # the mistake: a blocking call in an async handler
        returned.append(time.monotonic())

    @svc.on("ocis.slow.other")
    async def awaits(event: Event) -> None:
        await asyncio.sleep(0.3)  # as long, but awaiting: the loop turns
        returned.append(time.monotonic())

    bus = _bus(broker_url, unique, buses)
    seen: list[tuple[float, dict[str, Any]]] = []

    def keep(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if str(event_dict.get("event", "")).startswith("handler.block"):
            seen.append((time.monotonic(), {**event_dict, "level": name}))
        return event_dict

    worker = _worker(App(svc, exchange=unique), broker_url, buses)
    with structlog.testing.capture_logs(processors=[keep]), worker.running():
        bus.publish(Event("ocis.slow.other"))
        wait_for(lambda: len(returned) == 1, what="the awaiting handler")
        bus.publish(Event("ocis.slow.work"))
        wait_for(lambda: len(returned) == 2, what="the blocking handler")
        wait_for(lambda: len(seen) == 2, what="two warnings")
    (while_at, while_blocking), (after_at, after) = seen
    assert while_blocking["event"] == "handler.blocking_loop"
    assert while_blocking["handler"] == after["handler"] == "blocks"
    assert while_blocking["service"] == after["service"] == "slow"
    assert while_blocking["event_id"] == after["event_id"]
    assert while_blocking["level"] == after["level"] == "warning"
    assert while_at < returned[1] <= after_at  # named while it blocked, and after
    assert after["event"] == "handler.blocked_loop"
    assert 1300 <= after["blocked_ms"] < 5000
    assert "asyncio.to_thread" in after["reason"]


def test_slow_steps_are_reported_at_most_every_ten_seconds_per_handler() -> None:
    """A handler that blocks on every message gets one line per ten seconds, counting the slow steps."""

    async def blocking() -> str:
        time.sleep(0.02)
        await asyncio.sleep(0)
        time.sleep(0.02)
        return "done"

    watch = LoopWatch(slow_callback_duration=0.01)

    async def handle() -> str:
        return str(await timed(blocking(), {"service": "svc", "handler": "blocking"}, watch))

    with structlog.testing.capture_logs() as logs:
        results = [asyncio.run(handle()) for _ in range(3)]
    assert results == ["done"] * 3
    assert watch.slow_steps == 6
    assert [(e["event"], e["service"], e["handler"], e["slow_steps"]) for e in logs] == [
        ("handler.blocked_loop", "svc", "blocking", 1)
    ]


def test_a_timed_handler_sees_cancellation_and_exceptions_as_without_the_watch() -> None:
    """Timing the steps changes nothing a handler sees: errors thrown into it, its own errors, and the
    cancellation of its task."""

    async def catches() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "cancelled"
        return "slept"

    async def main() -> tuple[str, str]:
        watch = LoopWatch()
        task = asyncio.ensure_future(timed(catches(), {"handler": "h"}, watch))
        await asyncio.sleep(0.01)
        task.cancel()
        first = await task

        async def fails() -> None:
            await asyncio.sleep(0)
            raise KeyError("missing")

        try:
            await timed(fails(), {"handler": "h"}, watch)
        except KeyError as exc:
            return first, repr(exc)
        return first, "no error"

    assert asyncio.run(main()) == ("cancelled", "KeyError('missing')")


def test_a_sync_handler_that_returns_a_coroutine_is_dead_lettered_with_what_to_write(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A plain function that returns a coroutine (a decorator that hid the ``async def``) would never
    be awaited: the message is dead-lettered at once, saying to declare it ``async def``."""
    svc = Service("hidden")

    async def work(event: Event) -> None:
        return None

    svc.on("ocis.hidden.work", name="hidden")(lambda e: work(e))
    bus = _bus(broker_url, unique, buses)
    worker = _worker(App(svc, exchange=unique), broker_url, buses)
    with structlog.testing.capture_logs() as logs, worker.running():
        bus.publish(Event("ocis.hidden.work"))
        wait_for(lambda: any(e["event"] == "message.failed" for e in logs), what="the failure")
    failed = next(e for e in logs if e["event"] == "message.failed")
    assert failed["outcome"] == "dead-letter"
    assert "declare it 'async def'" in failed["error"]


def test_an_async_generator_is_refused_when_declared() -> None:
    svc = Service("gen")

    async def stream(event: Event) -> Any:
        yield event

    with pytest.raises(ConfigurationError, match="async generator"):
        svc.on("ocis.gen.work")(stream)


def test_an_object_with_an_async_call_is_an_async_handler() -> None:
    class Handler:
        async def __call__(self, event: Event) -> None:
            return None

    svc = Service("objects")
    svc.on("ocis.objects.work", name="work")(Handler())
    assert svc.handlers[0].is_async
