"""Publishing from asyncio: an :class:`AsyncPublisher` whose ``await publish(...)`` returns once the
broker confirmed, without blocking the caller's event loop.

kombu and py-amqp are blocking and not thread-safe, so the publisher owns one :class:`EventBus` on one
daemon thread of its own, which alone touches it. ``publish()`` encodes the event on the caller's loop
(a bad payload raises there, at once), then queues it with a future of that loop; what one turn of the
loop published is handed to the thread in one piece. The thread sends everything queued at once
(:meth:`EventBus.send_encoded`) without waiting for the confirms of what is already in flight (up to
``confirm_window``), collects the confirms as they come (:meth:`EventBus.collect_confirms`), and hands
the outcomes back to the loop with one ``call_soon_threadsafe`` per round: thousands of concurrent awaits
go through in a few batches, and the broker always has work. Connecting, reconnecting and the errors a
publish raises are the bus's own, so an awaiting caller sees what a caller of :meth:`EventBus.publish`
would see.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from ._bus import EventBus
from ._envelope import DEFAULT_MAX_EVENT_SIZE, Event, encode
from ._errors import EventLoopMismatch, PublisherClosed, PublishError, PublishTimeout, Unroutable, seconds

__all__ = ["AsyncPublisher"]

log = structlog.get_logger("transport")

#: one queued publish: (routing key, body, message id, mandatory, timeout, the future to settle)
_Item = tuple[str, bytes, str, bool, "float | None", "asyncio.Future[None]"]
#: what the thread hands back to the loop: each future with its exception, or None when confirmed
_Outcome = tuple["asyncio.Future[None]", "BaseException | None"]

_STOP = object()
#: a turn of the loop that publishes more than this hands them over in pieces of this size, so the
#: thread publishes the first while the loop still encodes the next
_HANDOVER = 1024
#: seconds the thread waits for a confirm while nothing new is queued (it looks at the queue again after)
_COLLECT_WAIT = 0.005
#: futures settled per turn of the loop (see :meth:`AsyncPublisher._settle_slice`)
_SETTLE_SLICE = 64


class AsyncPublisher:
    """Publishes events from asyncio code and returns once the broker confirmed them.

    ``url`` and ``ssl`` follow the rules of :class:`EventBus` (``memory://``, ``amqp://``, ``amqps://``,
    several brokers separated by ``;``). Nothing connects until :meth:`start` or the first publish.

    One publisher serves one event loop: the loop of the first :meth:`start` or publish. It uses one
    thread (a daemon, named ``sagas-aio-publisher``) and one broker connection. :meth:`close` waits for
    what is in flight; :meth:`start` after :meth:`close` starts it again, on the calling loop.
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        exchange: str = "sagas",
        publish_timeout: float = 10.0,
        ssl: bool | Mapping[str, Any] | None = None,
        source: str = "",
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        connect_timeout: float = 5.0,
        heartbeat: float = 30.0,
        confirm_window: int = 1000,
        close_timeout: float = 2.0,
        memory_transport: type[Any] | None = None,
    ) -> None:
        self._bus = EventBus(
            url,
            exchange=exchange,
            max_event_size=max_event_size,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
            heartbeat=heartbeat,
            ssl=ssl,
            confirm_window=confirm_window,
            memory_transport=memory_transport,
            close_timeout=close_timeout,
        )
        self.source = source
        self._close_timeout = close_timeout
        #: batches the thread handed to the bus, and events the broker confirmed (for metrics and tests)
        self.batches = 0
        self.confirmed = 0
        #: the most events one batch held
        self.largest_batch = 0
        #: lists of publishes, one per turn of the loop that published, and _STOP
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: what this turn of the loop published so far
        self._pending: list[_Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closed = False
        #: what stopped the publisher's thread, if an error did (publishing then raises PublisherClosed)
        self._failure: Exception | None = None
        self._start_lock: asyncio.Lock | None = None
        #: outcomes to hand to their awaiters, slice by slice; whether that runs; a future set when it ends
        self._unsettled: collections.deque[_Outcome] = collections.deque()
        self._settling = False
        self._settled: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"AsyncPublisher({self._bus!r})"

    @property
    def bus(self) -> EventBus:
        """The bus the publisher's thread publishes on, to read its URL, exchange and declared queues.
        Publish through the publisher, never on this bus: its thread streams confirms on the bus's
        channel, and a publish from another thread would take them for its own."""
        return self._bus

    @property
    def started(self) -> bool:
        """Whether the publisher's thread runs (after :meth:`start` or a publish, until :meth:`close`)."""
        return self._thread is not None and not self._closed and self._failure is None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker and start the publisher's thread; a no-op once started.

        Raises :class:`BrokerUnavailable` (or :class:`LoginRefused`) as :meth:`EventBus.connect` does, after
        ``connect_timeout`` at most, and without blocking the loop while it waits."""
        loop = self._check_loop()
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.started:
                return
            try:
                await loop.run_in_executor(None, self._bus.connect)
            except BaseException:
                self._start_lock = None  # bound to this loop; a start on another one makes its own
                raise
            self._launch(loop)

    def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._closed = False
        self._failure = None
        self._queue = queue.SimpleQueue()  # a thread of an earlier start that outlived its close keeps its own
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="sagas-aio-publisher", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop taking publishes, wait for those in flight (``publish_timeout`` plus the close's bound at
        most), then close the connection. A no-op when not started."""
        if not self.started:
            self._closed = True
            return
        self._check_loop()
        self._closed = True
        self._flush()
        self._queue.put(_STOP)
        stopped = self._stopped
        assert stopped is not None  # set with the thread
        bound = self._bus.publish_timeout + self._close_timeout + 1.0
        try:
            await asyncio.wait_for(asyncio.shield(stopped), bound)
            if self._settling:  # the last outcomes are still being handed to their awaiters
                self._settled = asyncio.get_running_loop().create_future()
                await self._settled
            await asyncio.sleep(0)  # the tasks the last slice woke run before close() returns
        except TimeoutError:
            log.warning("publisher.close_timed_out", seconds=bound, broker=repr(self._bus))
        self._thread = None
        self._start_lock = None
        self._settled = None

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which must be the publisher's own once it was started."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise EventLoopMismatch(
                "AsyncPublisher is used from asyncio code: await its methods inside a running event loop "
                "(from threads without a loop, publish with transport.EventBus instead)"
            ) from None
        if self.started and loop is not self._loop:
            raise EventLoopMismatch(
                "this AsyncPublisher was started on another event loop: use one publisher per event loop "
                "(or close() it on its loop before starting it on this one)"
            )
        return loop

    # -- publishing ----------------------------------------------------------------------------------

    async def publish(
        self,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        mandatory: bool = False,
        timeout: float | None = None,
    ) -> Event:
        """Publish a new event ``type`` with ``payload``; return it once the broker confirmed it.

        A bad name or payload raises :class:`InvalidEventName`, :class:`InvalidEvent` or
        :class:`EventTooLarge` at once. A publish the broker did not take raises :class:`PublishError` (a
        :class:`PublishTimeout` after ``timeout``, default ``publish_timeout``, counted from when its batch
        is sent; :class:`Unroutable` when ``mandatory`` and no queue is bound to receive it)."""
        event = Event(
            type,
            payload if payload is not None else {},
            source=self.source,
            correlation_id=correlation_id or "",
            headers=headers if headers is not None else {},
        )
        await self.publish_event(event, mandatory=mandatory, timeout=timeout)
        return event

    async def publish_event(self, event: Event, *, mandatory: bool = False, timeout: float | None = None) -> None:
        """Publish ``event`` (built by the caller); return once the broker confirmed it. Errors as
        :meth:`publish`."""
        if timeout is not None:
            seconds("timeout", timeout)
        body = encode(event, self._bus.max_event_size)
        future = await self._enqueue([(event.type, body, event.id, mandatory, timeout)])
        await future[0]

    async def publish_many(
        self, events: Iterable[Event], *, mandatory: bool = False, timeout: float | None = None
    ) -> None:
        """Publish several events; return once all are confirmed.

        Every event is encoded before any is queued, so a bad one raises at once and none is sent. On
        failure, the :class:`PublishError` (:class:`Unroutable` when every failure is one) says in
        ``failed`` which ids were not confirmed and why; the others were."""
        limit = self._bus.max_event_size
        if timeout is not None:
            seconds("timeout", timeout)
        items = [(e.type, encode(e, limit), e.id, mandatory, timeout) for e in events]
        futures = await self._enqueue(items)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if not errors:
            return
        for error in errors:
            if not isinstance(error, PublishError):
                raise error
        refused = [e for e in errors if isinstance(e, PublishError)]
        failed: dict[str, str] = {}
        for error in refused:
            failed.update(error.failed)
        kinds = {type(e) for e in refused}
        cls = kinds.pop() if len(kinds) == 1 else PublishError
        raise cls(f"{len(errors)} of {len(items)} event(s) not taken by the broker: {errors[0]}", failed=failed)

    async def _enqueue(self, items: list[tuple[str, bytes, str, bool, float | None]]) -> list[asyncio.Future[None]]:
        if self._failure is not None:
            raise PublisherClosed(
                f"this AsyncPublisher's thread stopped on an error ({self._failure!r}): close() it and start() it "
                "again, or make a new one"
            )
        if self._closed:
            raise PublisherClosed(
                "this AsyncPublisher was closed: start() it again (on this loop) or make a new one to publish"
            )
        loop = self._check_loop()
        if not self.started:  # the first publish connects, on the thread, as the sync bus's first does
            self._launch(loop)
        futures: list[asyncio.Future[None]] = []
        pending = self._pending
        if not pending:  # the first of this turn of the loop: hand them all over at its end
            loop.call_soon(self._flush)
        for rk, body, mid, mandatory, timeout in items:
            future: asyncio.Future[None] = loop.create_future()
            futures.append(future)
            pending.append((rk, body, mid, mandatory, timeout, future))
            if len(pending) >= _HANDOVER:
                self._flush()
                pending = self._pending
                loop.call_soon(self._flush)
        return futures

    def _flush(self) -> None:
        """Hand what was published in this turn of the loop to the thread, in one piece: the thread wakes
        once for all of it, however many tasks published."""
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    # -- the publisher's thread --------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: send what the loop queued as soon as it comes, without waiting for the confirms of
        what is in flight (at most ``confirm_window`` unconfirmed), and hand each outcome back as its
        confirm arrives. While nothing is in flight, wait for publishes and keep the connection alive."""
        loop, stopped, work = self._loop, self._stopped, self._queue
        assert loop is not None
        assert stopped is not None
        bus = self._bus
        flight = _InFlight()
        stopping = False
        batch: list[_Item] = []
        try:
            while not (stopping and not flight.count):
                batch = []
                if not stopping and flight.count < bus.confirm_window:
                    if flight.count:
                        stopping = _take_queued(work, batch)
                    else:
                        try:
                            first = work.get(timeout=bus.tick)
                        except queue.Empty:
                            self._keep_alive()
                            continue
                        if first is _STOP:
                            break
                        batch.extend(first)
                        stopping = _take_queued(work, batch)
                outcomes: list[_Outcome] = []
                if batch:
                    self._send(batch, flight, outcomes)
                if flight.count:
                    wait = 0.0 if batch or not work.empty() else _COLLECT_WAIT
                    self._collect(flight, outcomes, wait)
                if outcomes:
                    self._hand_back(loop, outcomes)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave awaiters waiting for ever
            log.error("publisher.failed", error=repr(exc)[:500], events=flight.count)
            self._failure = exc
            failed = PublishError(f"not published: the publisher's thread stopped on an error: {exc!r}")
            queued: list[_Item] = []
            _take_queued(work, queued)
            lost = {id(f): f for f in [*flight.clear(), *(item[5] for item in [*batch, *queued])]}
            self._hand_back(loop, [(future, failed) for future in lost.values()])
        finally:
            with contextlib.suppress(Exception):
                bus.close()
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(_resolve, stopped)

    def _hand_back(self, loop: asyncio.AbstractEventLoop, outcomes: list[_Outcome]) -> None:
        """Hand outcomes to their awaiters, on their loop."""
        try:
            loop.call_soon_threadsafe(self._settle, outcomes)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            log.warning("publisher.loop_closed", events=len(outcomes))

    def _keep_alive(self) -> None:
        """While idle: service the connection's heartbeats, so that the broker keeps it open."""
        try:
            self._bus.keep_alive()
        except Exception as exc:  # noqa: BLE001 - the next publish reconnects, or raises what is wrong
            log.warning("publisher.keep_alive_failed", error=str(exc) or type(exc).__name__)

    def _send(self, batch: list[_Item], flight: _InFlight, outcomes: list[_Outcome]) -> None:
        """Send ``batch``; what fails at once (and, when the connection broke, everything in flight) goes
        to ``outcomes``."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        now = time.monotonic()
        default = self._bus.publish_timeout
        for _, _, mid, _, timeout, future in batch:
            flight.add(mid, future, now + (default if timeout is None else timeout))
        connect_within = min(default if item[4] is None else item[4] for item in batch)
        try:
            known = self._bus.send_encoded(
                [(rk, body, mid, mandatory) for rk, body, mid, mandatory, _, _ in batch], timeout=connect_within
            )
        except PublishError as exc:
            self._fail_all(flight, outcomes, exc)
            return
        except Exception as exc:  # noqa: BLE001 - not a publish failure (a refused login): every awaiter gets it
            log.warning("publisher.batch_failed", events=flight.count, error=str(exc) or type(exc).__name__)
            outcomes.extend((future, exc) for future in flight.clear())
            return
        self._outcomes_of(flight, known, outcomes)

    def _collect(self, flight: _InFlight, outcomes: list[_Outcome], wait: float) -> None:
        """Take the confirms that came; fail everything in flight when the connection broke or the oldest
        publish waited past its timeout (the connection is then dropped, as the sync bus does)."""
        try:
            self._outcomes_of(flight, self._bus.collect_confirms(wait), outcomes)
        except PublishError as exc:
            self._fail_all(flight, outcomes, exc)
            return
        except Exception as exc:  # noqa: BLE001 - not a publish failure: every awaiter gets it
            log.warning("publisher.batch_failed", events=flight.count, error=str(exc) or type(exc).__name__)
            outcomes.extend((future, exc) for future in flight.clear())
            return
        if flight.count and flight.expired(time.monotonic()):
            self._bus.lost(TimeoutError("no publisher confirm in time"))
            timeout = PublishTimeout(
                f"the broker did not confirm {flight.count} message(s) in time; they may or may not have been taken"
            )
            self._fail_all(flight, outcomes, timeout)

    def _outcomes_of(self, flight: _InFlight, known: list[tuple[str, str | None]], outcomes: list[_Outcome]) -> None:
        for mid, failure in known:
            future = flight.pop(mid)
            if future is None:
                continue
            if failure is None:
                self.confirmed += 1
                outcomes.append((future, None))
                continue
            cls = Unroutable if failure.startswith("unroutable") else PublishError
            outcomes.append(
                (future, cls(f"1 of 1 message(s) not taken by the broker: {failure}", failed={mid: failure}))
            )

    def _fail_all(self, flight: _InFlight, outcomes: list[_Outcome], exc: PublishError) -> None:
        """Every publish in flight gets an error like ``exc`` (of its class, with its own id in ``failed``)."""
        for mid, future in flight.items():
            outcomes.append((future, type(exc)(str(exc), failed={mid: str(exc)})))
        flight.clear()

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """On the loop: queue ``outcomes`` to be handed to their awaiters (see :meth:`_settle_slice`)."""
        self._unsettled.extend(outcomes)
        if not self._settling:
            self._settling = True
            self._settle_slice()

    def _settle_slice(self) -> None:
        """Resolve the next :data:`_SETTLE_SLICE` futures; a cancelled awaiter's future is left alone.

        The tasks a slice wakes run in the next turn of the loop, and the next slice is resolved then
        too: the awaiters of a batch of thousands wake over several turns, whatever the number of
        batches, and other tasks (timers, I/O) get turns in between instead of waiting for all of them."""
        unsettled = self._unsettled
        for _ in range(min(_SETTLE_SLICE, len(unsettled))):
            future, error = unsettled.popleft()
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if unsettled:
            asyncio.get_running_loop().call_soon(self._settle_slice)
            return
        self._settling = False
        if self._settled is not None:
            _resolve(self._settled)


def _take_queued(work: queue.SimpleQueue[Any], batch: list[_Item]) -> bool:
    """Add everything queued to ``batch`` without waiting; return whether the stop mark came."""
    while True:
        try:
            more = work.get_nowait()
        except queue.Empty:
            return False
        if more is _STOP:
            return True
        batch.extend(more)


class _InFlight:
    """The publishes sent and not yet settled, by message id (an id may be in flight twice), with their
    deadlines."""

    def __init__(self) -> None:
        self._by_id: dict[str, collections.deque[tuple[asyncio.Future[None], float]]] = {}
        self.count = 0
        self._earliest = float("inf")

    def add(self, mid: str, future: asyncio.Future[None], deadline: float) -> None:
        self._by_id.setdefault(mid, collections.deque()).append((future, deadline))
        self.count += 1
        self._earliest = min(self._earliest, deadline)

    def pop(self, mid: str) -> asyncio.Future[None] | None:
        waiting = self._by_id.get(mid)
        if not waiting:
            return None
        future, _ = waiting.popleft()
        if not waiting:
            del self._by_id[mid]
        self.count -= 1
        return future

    def expired(self, now: float) -> bool:
        """Whether a publish in flight is past its deadline."""
        if now < self._earliest:
            return False
        self._earliest = min((d for w in self._by_id.values() for _, d in w), default=float("inf"))
        return now >= self._earliest

    def items(self) -> list[tuple[str, asyncio.Future[None]]]:
        return [(mid, future) for mid, w in self._by_id.items() for future, _ in w]

    def clear(self) -> list[asyncio.Future[None]]:
        futures = [future for w in self._by_id.values() for future, _ in w]
        self._by_id.clear()
        self.count = 0
        self._earliest = float("inf")
        return futures


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
