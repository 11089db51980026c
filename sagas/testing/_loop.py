"""An asyncio event loop on virtual time, for running ``async def`` handlers in the harness.

:class:`VirtualTimeLoop` is asyncio's own selector event loop with two things replaced:

- its clock (:meth:`asyncio.AbstractEventLoop.time`, the one every timer, ``asyncio.sleep``,
  ``asyncio.timeout`` and ``wait_for`` reads) is virtual: it starts at 0 and moves only when the loop
  has nothing ready to run;
- its selector never waits: asked to wait ``timeout`` seconds for I/O, it moves the clock that far
  instead (asyncio asks for exactly the time until its next timer), so ``await asyncio.sleep(30)``
  returns at once in real time, and callbacks run in asyncio's usual order (FIFO, timers by due time).

It relies only on stable, documented seams of asyncio: the ``selector`` argument of
:class:`asyncio.SelectorEventLoop` (a :class:`selectors.BaseSelector`), the loop's :meth:`time`,
:meth:`call_at` and :meth:`run_in_executor` methods, and :meth:`run_until_complete`. asyncio calls ``select(timeout)``
with the time until its next timer, ``0`` when callbacks are ready, and ``None`` when nothing at all
is scheduled.

What it cannot run is refused with :class:`NotVirtual`, whose message says what to do:

- real I/O: the loop registers its own wake-up socket when it is built; any other file descriptor
  (a socket of ``asyncio.open_connection``, an HTTP client's connection, a subprocess pipe) is
  refused, because the harness runs no real network and its time does not move with the world's;
- an await that nothing can ever complete (a future nobody resolves, an event nobody sets): asyncio
  would wait for ever; here the selector is asked to wait with no timer pending, and refuses.

Work handed to a thread (``asyncio.to_thread``, ``loop.run_in_executor``) runs inline, at once, on the
loop's thread, taking no virtual time: no threads, so that a run is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import selectors
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Executor
from contextvars import Context
from types import MappingProxyType
from typing import Any, TypeVar, TypeVarTuple

from .._errors import SagasError

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class NotVirtual(SagasError):
    """An ``async def`` handler did what the harness cannot run on virtual time: real I/O, or an await
    that nothing will ever complete."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that never waits: it moves the loop's virtual clock by the timeout instead, and
    refuses file descriptors registered after :meth:`seal` (real I/O)."""

    def __init__(self, advance: Callable[[float], None], refused: list[NotVirtual]) -> None:
        self._advance = advance
        self._refused = refused
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._sealed = False

    def seal(self) -> None:
        """From now on, registering a file descriptor is real I/O, and refused."""
        self._sealed = True

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
        if self._sealed:
            error = NotVirtual(
                "an async handler started real I/O (a socket, a connection, a subprocess) on the "
                "harness's loop, which runs on virtual time with no network: replace the client "
                "with a fake in the test (for HTTP, httpx.MockTransport), or test that handler "
                "against real services instead of in the harness"
            )
            self._refused.append(error)
            raise error
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            error = NotVirtual(
                "an async handler awaits something that nothing will ever complete (a future, an "
                "event or a queue that no task or timer will set): on a real loop it would hang "
                "for ever; give the await a timeout (asyncio.timeout) or complete it in the test"
            )
            self._refused.append(error)
            raise error
        if timeout > 0:
            self._advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return MappingProxyType(self._keys)

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a virtual clock that moves only when nothing is ready to run.

    :meth:`run` runs a coroutine to completion and says how much virtual time its awaits took.
    """

    def __init__(self) -> None:
        self._virtual_now = 0.0
        #: the due times asked for, and the last due time given to a timer for each (see call_at)
        self._ties: dict[float, float] = {}
        #: errors refused since the last :meth:`run` (raised by it, even if a handler caught them)
        self._refusals: list[NotVirtual] = []
        selector = _VirtualSelector(self._move, self._refusals)
        super().__init__(selector)
        selector.seal()  # (what the loop registered itself is its wake-up socket)

    def time(self) -> float:
        """The virtual time, in seconds from when the loop was made."""
        return self._virtual_now

    def _move(self, seconds: float) -> None:
        self._virtual_now += seconds
        self._ties = {due: last for due, last in self._ties.items() if due > self._virtual_now}

    def call_at(
        self, when: float, callback: Callable[[*Ts], object], *args: *Ts, context: Context | None = None
    ) -> asyncio.TimerHandle:
        """Schedule as asyncio does, keeping timers due at the same virtual time in the order they
        were set (asyncio orders its timers by due time alone; a real clock rarely gives two the same
        time): each later one is due the next float after the one before."""
        last = self._ties.get(when)
        self._ties[when] = due = when if last is None else math.nextafter(last, math.inf)
        return super().call_at(due, callback, *args, context=context)

    def advance_to(self, when: float) -> None:
        """Move the clock forward to ``when`` (never back), as time passing outside the loop: timers
        that come due run the next time the loop runs."""
        self._move(max(0.0, when - self._virtual_now))

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
        """Run ``func`` now, inline, taking no virtual time (no threads in the harness)."""
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine, as a pool would
            future.set_exception(exc)
        return future

    def run(self, awaitable: Awaitable[T] | Coroutine[Any, Any, T]) -> tuple[T, float]:
        """Run ``awaitable`` to completion. Returns its result and the virtual seconds it took.

        Raises :class:`NotVirtual` if it started real I/O (even if it caught the error) or awaited
        something nothing could complete.
        """
        start = self._virtual_now
        self._refusals.clear()
        task = asyncio.ensure_future(awaitable, loop=self)
        try:
            result = self.run_until_complete(task)
        except NotVirtual:
            self._cancel(task)
            raise
        except BaseException:
            if self._refusals:
                raise self._refusals[0] from None
            raise
        if self._refusals:
            raise self._refusals[0]
        return result, self._virtual_now - start

    def _cancel(self, task: asyncio.Future[Any]) -> None:
        """Cancel a task stuck on an await, and let it unwind (once: if it awaits for ever again
        while unwinding, it is left as it is)."""
        task.cancel()
        with contextlib.suppress(NotVirtual):
            self.run_until_complete(asyncio.wait([task]))


__all__ = ["NotVirtual", "VirtualTimeLoop"]
