"""The worker's event loop for ``async def`` handlers, and the watch on handlers that block it.

A worker whose app has async handlers runs one asyncio event loop, on a thread of its own
(:class:`LoopExecutor`). The handler pipeline hands it chunks of async handler calls exactly as it
hands chunks of sync calls to the thread pool: ``submit(run_handlers_async, chunk)`` returns a
:class:`concurrent.futures.Future` of the outcomes, and the I/O thread settles them in the same way
(publish, commit, ack). So an async handler has every guarantee of a sync one.

A handler that blocks the loop (a ``time.sleep``, a blocking client, a long computation) stalls every
other async handler of the worker. Each step of a handler's coroutine (the code between two
``await``\\ s that suspend) is timed (:func:`timed`), so such a handler is named:

- ``handler.blocked_loop`` (warning) once a step that took ``slow_callback_duration`` seconds or more
  returned, with how long it took (at most once per handler every :data:`REPORT_EVERY` seconds, with
  the number of slow steps since the last line);
- ``handler.blocking_loop`` (warning) while a step has been running for :data:`STILL_BLOCKED` seconds
  (a watchdog thread looks every quarter of that), so a handler stuck for ever is named before it
  returns.

asyncio's own debug mode (``loop.slow_callback_duration``) would report slow steps too, but debug mode
costs every callback of the loop a traceback; timing the handlers' steps costs one generator per call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Mapping
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("sagas.worker")

T = TypeVar("T")

#: a step of a handler's coroutine that runs this long (seconds) is reported (asyncio's default too)
DEFAULT_SLOW_CALLBACK = 0.1
#: a handler's slow steps are reported at most once in this many seconds (with how many there were)
REPORT_EVERY = 10.0
#: a step still running after this many seconds is reported while it runs
STILL_BLOCKED = 1.0


class LoopWatch:
    """Which handler's step runs on the loop now, and since when; reports slow steps."""

    def __init__(self, slow_callback_duration: float = DEFAULT_SLOW_CALLBACK) -> None:
        self.threshold = slow_callback_duration
        #: (the handler's log fields, started at) of the step running now, or None
        self.current: tuple[Mapping[str, str], float] | None = None
        #: steps reported slow, in all
        self.slow_steps = 0
        #: (service, handler) -> (last line at, slow steps since)
        self._reported: dict[tuple[str, str], tuple[float, int]] = {}
        self._still: tuple[Mapping[str, str], float] | None = None  # the running step reported as still blocking

    def slow(self, fields: Mapping[str, str], seconds: float) -> None:
        """A step of the handler of ``fields`` (service, handler, event_id) took ``seconds`` (at least the
        threshold)."""
        self.slow_steps += 1
        now = time.monotonic()
        key = (fields.get("service", ""), fields.get("handler", ""))
        last, since = self._reported.get(key, (-REPORT_EVERY, 0))
        if now - last < REPORT_EVERY:
            self._reported[key] = (last, since + 1)
            return
        self._reported[key] = (now, 0)
        log.warning(
            "handler.blocked_loop",
            **fields,
            blocked_ms=round(seconds * 1000, 1),
            slow_steps=since + 1,
            reason=(
                "an async handler ran this long without awaiting: every async handler of the worker waited."
                " Await non-blocking calls, or move blocking work to a thread (asyncio.to_thread)"
            ),
        )

    def check(self) -> None:
        """From another thread: report a step that has been running for :data:`STILL_BLOCKED` seconds."""
        current = self.current
        if current is None or current == self._still:
            return
        fields, started = current
        running = time.perf_counter() - started
        if running >= max(STILL_BLOCKED, self.threshold):
            self._still = current
            log.warning(
                "handler.blocking_loop",
                **fields,
                blocked_ms=round(running * 1000, 1),
                reason="an async handler has not awaited for this long: the worker's other async handlers wait",
            )


class _Timed:
    """Awaits a handler's coroutine, timing each of its steps (see :func:`timed`)."""

    __slots__ = ("_coro", "_fields", "_watch")

    def __init__(self, coro: Coroutine[Any, Any, Any], fields: Mapping[str, str], watch: LoopWatch) -> None:
        self._coro = coro
        self._fields = fields
        self._watch = watch

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, fields, watch = self._coro, self._fields, self._watch
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.perf_counter()
            watch.current = (fields, started)
            try:
                signal = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            finally:
                watch.current = None
                took = time.perf_counter() - started
                if took >= watch.threshold:
                    watch.slow(fields, took)
            try:
                value, error = (yield signal), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - e.g. the task's cancellation: passed on to the handler
                value, error = None, exc


def timed(coro: Coroutine[Any, Any, T], fields: Mapping[str, str], watch: LoopWatch | None) -> Any:
    """``await timed(coro, ...)`` awaits ``coro``, timing each step it runs on the loop with ``watch``
    (plain ``coro`` without one); ``fields`` (service, handler, event_id) name the handler in its lines."""
    return coro if watch is None else _Timed(coro, fields, watch)


class LoopExecutor(Executor):
    """One asyncio event loop on a thread of its own: ``submit(coro_fn, *args)`` runs
    ``coro_fn(*args)`` there and returns a :class:`concurrent.futures.Future` of its result."""

    def __init__(self, *, slow_callback_duration: float = DEFAULT_SLOW_CALLBACK, name: str = "sagas-loop") -> None:
        self.watch = LoopWatch(slow_callback_duration)
        self.loop = asyncio.new_event_loop()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch_loop, name=f"{name}-watch", daemon=True)
        self._watchdog.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def _watch_loop(self) -> None:
        while not self._stopped.wait(STILL_BLOCKED / 4):
            self.watch.check()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._stopped.is_set():
            raise RuntimeError("the worker's event loop is shut down")
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self.loop)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the loop: with ``cancel_futures``, the calls still running are cancelled first; with
        ``wait``, return once the loop's thread ended."""
        if self._stopped.is_set():
            return
        self._stopped.set()

        def stop() -> None:
            if cancel_futures:
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
            self.loop.call_soon(self.loop.stop)  # (after the cancellations were delivered)

        self.loop.call_soon_threadsafe(stop)
        if wait:
            self._thread.join()


__all__ = ["DEFAULT_SLOW_CALLBACK", "LoopExecutor", "LoopWatch", "timed"]
