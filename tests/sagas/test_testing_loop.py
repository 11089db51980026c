"""The harness's asyncio loop on virtual time, and the executor that runs async chunks on it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sagas.testing import InlineExecutor, NotVirtual, VirtualClock, VirtualTimeLoop


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    made = VirtualTimeLoop()
    yield made
    made.close()


def test_sleeps_and_gathers_take_virtual_time_only(loop: VirtualTimeLoop) -> None:
    """A coroutine that sleeps 30 s, then gathers 10 s and 20 s sleeps, reports 50 virtual seconds
    and returns in well under a real second."""
    order: list[str] = []

    async def nap(name: str, seconds: float) -> str:
        await asyncio.sleep(seconds)
        order.append(name)
        return name

    async def chunk() -> list[str]:
        await asyncio.sleep(30)
        return list(await asyncio.gather(nap("long", 20), nap("short", 10)))

    started = time.perf_counter()
    result, took = loop.run(chunk())
    assert time.perf_counter() - started < 0.5
    assert result == ["long", "short"]
    assert order == ["short", "long"]
    assert took == pytest.approx(50.0)
    assert loop.time() == pytest.approx(50.0)


def test_timeouts_fire_on_virtual_time(loop: VirtualTimeLoop) -> None:
    """asyncio.timeout and wait_for read the virtual clock: a 5 s timeout around a 60 s sleep fires
    after 5 virtual seconds."""

    async def chunk() -> str:
        try:
            await asyncio.wait_for(asyncio.sleep(60), timeout=5)
        except TimeoutError:
            return "timed out"
        return "slept"

    outcome, took = loop.run(chunk())
    assert outcome == "timed out"
    assert took == pytest.approx(5.0)


def test_callbacks_run_in_fifo_order_at_equal_times(loop: VirtualTimeLoop) -> None:
    """Tasks woken at the same virtual time run in the order they went to sleep, on every run."""

    async def chunk() -> list[int]:
        woke: list[int] = []

        async def one(i: int) -> None:
            await asyncio.sleep(1.0)
            woke.append(i)

        await asyncio.gather(*(one(i) for i in range(20)))
        return woke

    assert loop.run(chunk())[0] == list(range(20))


def test_to_thread_runs_inline_in_no_virtual_time(loop: VirtualTimeLoop) -> None:
    """Work handed to a thread runs at once on the loop's thread and takes no virtual time."""
    import threading

    async def chunk() -> int:
        return await asyncio.to_thread(threading.get_ident)

    ident, took = loop.run(chunk())
    assert ident == threading.get_ident()
    assert took == 0.0


def test_real_io_is_refused_even_when_the_handler_catches_it(loop: VirtualTimeLoop) -> None:
    """Opening a connection on the loop raises NotVirtual, and run() raises it even though the
    coroutine swallowed it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def chunk() -> str:
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except Exception:  # (what a careless handler does)
            return "swallowed"
        return "connected"

    try:
        with pytest.raises(NotVirtual, match="real I/O"):
            loop.run(chunk())
    finally:
        listener.close()


def test_an_await_nothing_completes_is_refused(loop: VirtualTimeLoop) -> None:
    """Awaiting a future nobody resolves raises NotVirtual instead of hanging, and the task is
    cancelled."""
    seen: list[str] = []

    async def chunk() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with pytest.raises(NotVirtual, match="nothing will ever complete"):
        loop.run(chunk())
    assert seen == ["cancelled"]


def test_the_executor_holds_an_async_chunk_for_its_virtual_duration() -> None:
    """An async chunk runs at once, its effects happen then, and its future completes only once the
    clock has moved as far as its awaits took, plus the seconds given for it."""
    clock = VirtualClock()
    effects: list[float] = []

    async def chunk(n: int) -> int:
        effects.append(clock())
        await asyncio.sleep(12.0)
        return n

    executor = InlineExecutor(clock=clock, seconds=lambda _result: 3.0, loop=VirtualTimeLoop())
    try:
        future = executor.submit(chunk, 7)
        assert effects == [clock()]
        assert not future.done()
        assert executor.next_done() == clock() + 15.0
        clock.advance(14.9)
        assert executor.release() == 0
        clock.advance(0.1)
        assert executor.release() == 1
        result: Any = future.result()  # (the executor awaited the coroutine)
        assert result == 7
    finally:
        executor.shutdown()


def test_the_loop_follows_the_clock_between_chunks() -> None:
    """Time that passes on the harness's clock between two chunks passes on the loop too: a timer a
    first chunk left behind fires in the next chunk once it is due."""
    clock = VirtualClock()
    fired: list[float] = []
    executor = InlineExecutor(clock=clock, loop=VirtualTimeLoop())
    assert executor.loop is not None
    loop = executor.loop

    async def leave_a_timer() -> None:
        loop.call_later(10.0, lambda: fired.append(loop.time()))

    async def nothing() -> None:
        await asyncio.sleep(0)

    try:
        executor.submit(leave_a_timer)
        clock.advance(4.0)
        executor.submit(nothing)
        assert fired == []
        clock.advance(6.0)
        executor.submit(nothing)
        assert fired == [pytest.approx(10.0)]
    finally:
        executor.shutdown()


def test_an_executor_without_a_loop_refuses_coroutines() -> None:
    """An InlineExecutor made without a loop says how to get one."""

    async def chunk() -> None:
        return None

    with pytest.raises(Exception, match="loop=VirtualTimeLoop"):
        _ = InlineExecutor().submit(chunk).result()


def test_same_coroutine_same_trace() -> None:
    """Two runs of the same tasks, sleeps and timeouts give the same trace of (virtual time, what)."""

    def trace() -> list[tuple[float, str]]:
        loop = VirtualTimeLoop()
        seen: list[tuple[float, str]] = []

        async def worker(i: int) -> None:
            for step in range(3):
                await asyncio.sleep((i * 7 + step * 3) % 5 + 0.5)
                seen.append((loop.time(), f"{i}.{step}"))
            try:
                async with asyncio.timeout(i % 3 + 0.25):
                    await asyncio.sleep(2.0)
                seen.append((loop.time(), f"{i} in time"))
            except TimeoutError:
                seen.append((loop.time(), f"{i} late"))

        async def chunk() -> None:
            await asyncio.gather(*(worker(i) for i in range(8)))

        try:
            loop.run(chunk())
        finally:
            loop.close()
        return seen

    first = trace()
    assert len(first) == 32
    assert trace() == first
