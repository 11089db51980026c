"""The worker: consumes every handler's queue, runs handlers, and acks, retries or dead-letters.

One thread (the one that calls :meth:`Worker.run`) owns the broker connection and the store: it
receives messages, does every ack and publish, and keeps heartbeats going. Handlers run on a small
thread pool, so a long handler never starves the connection. The order for one message is::

    receive -> (inbox: seen? ack and stop) -> handler -> publish follow-ups (confirmed)
            -> inbox: remember -> ack

and on failure: retry through a delay queue (copy confirmed, then ack), or after the last attempt,
dead-letter with the error (copy confirmed, then ack).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from transport import (
    CONTENT_TYPE,
    BrokerUnavailable,
    ConnectionLost,
    Event,
    EventBus,
    Inbound,
    PublishError,
    Subscription,
    TransportError,
    encode,
    redact_url,
)
from transport import decode as decode_event

from ._errors import ConfigurationError, Failure, NoReply, Reject, SagasError
from ._protocol import reply_event
from ._saga_engine import Applied, SagaEngine
from ._service import App, Context, Delivery, HandlerSpec, Retry, Service
from ._store import OutboxRow, Store, open_store

log = structlog.get_logger("sagas.worker")

#: Exit code of a worker that lost its broker for longer than the grace period.
EXIT_BROKER_UNAVAILABLE = 3
#: How a saga message whose step raised (a bug in a guard or action, or the store) is retried.
SAGA_RETRY = Retry(attempts=5, initial=1.0, factor=2.0, maximum=30.0)


#: a handler's message ready to run: (handler, message, event, connection generation)
_Work = tuple[HandlerSpec, Inbound, Event, int]
#: messages a pool thread takes at once at most (fewer when fewer wait: each free thread gets some)
_CHUNK = 32


@dataclass(slots=True)
class _Outcome:
    inbound: Inbound
    event: Event
    spec: HandlerSpec
    generation: int
    error: BaseException | None = None
    outbox: list[Event] = field(default_factory=list)
    duration: float = 0.0
    result: Any = None


@dataclass(slots=True)
class _Settling:
    """A finished message on its way to be acked, retried or dead-lettered."""

    o: _Outcome
    error: BaseException | None
    reply: Event | None
    #: the reply as published (and then cached): encoded once
    reply_body: bytes = b""

    def fields(self, outcome: str) -> dict[str, Any]:
        o = self.o
        return {
            "event_id": o.event.id,
            "event_type": o.event.type,
            "service": o.spec.service,
            "handler": o.spec.name,
            "attempt": o.inbound.attempt,
            "outcome": outcome,
            "duration_ms": round(o.duration * 1000, 3),
        }


def _debug_enabled() -> bool:
    """Whether per-message debug lines would be written (they are skipped, unbuilt, otherwise)."""
    return log.is_enabled_for(logging.DEBUG) if hasattr(log, "is_enabled_for") else True


class Worker:
    """Runs the services of an :class:`App` against a broker and a store.

    Nothing happens in ``__init__``; :meth:`start` connects, :meth:`run` loops until :meth:`stop`
    (or SIGTERM/SIGINT with ``install_signals``), then finishes in-flight work and acks it.
    ``bus`` and ``store`` exist once the worker has started.
    """

    bus: EventBus
    store: Store
    _pool: Executor

    def __init__(
        self,
        app: App | Service,
        *,
        broker: str | None = None,
        store: str | Store | None = None,
        exchange: str | None = None,
        concurrency: int = 4,
        grace_period: float = 60.0,
        shutdown_timeout: float = 60.0,
        timer_interval: float = 0.2,
        relay_interval: float = 5.0,
        instance: str | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        executor: Executor | None = None,
        ssl: bool | Mapping[str, Any] | None = None,
        batch_size: int = 256,
    ) -> None:
        if isinstance(app, Service):
            app = App(app)
        if not isinstance(app, App):
            raise ConfigurationError(f"a worker runs an App (or one Service), not {type(app).__name__}")
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.app = app
        self.broker = broker or os.environ.get("SAGAS_BROKER_URL") or "memory://"
        self.exchange = exchange or app.exchange
        self.concurrency = concurrency
        self.grace_period = grace_period
        self.shutdown_timeout = shutdown_timeout
        if bus is not None and bus.exchange != self.exchange:
            raise ConfigurationError(
                f"the bus publishes to exchange {bus.exchange!r} but the app uses {self.exchange!r}: "
                "create the EventBus with the same exchange"
            )
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"[:60].lower()
        self._store_arg = store
        self._bus_arg = bus
        #: TLS options for the bus the worker creates (as EventBus takes them); unused when ``bus`` is given
        self.ssl = ssl
        self._routes: dict[str, HandlerSpec] = {}
        self._ready: deque[tuple[int, Inbound]] = deque()
        self._outcomes: queue.SimpleQueue[list[_Outcome]] = queue.SimpleQueue()
        self._inflight = 0  # messages handed to the pool and not settled yet
        self._tasks = 0  # chunks of them running or queued on the pool (at most ``concurrency``)
        #: messages read from the broker in one turn of the loop, at most, and settled as one group
        self.batch_size = batch_size
        #: (handler key, event id) of idempotent messages being handled, and duplicates waiting on them
        self._busy: dict[tuple[str, str], list[tuple[int, Inbound]]] = {}
        #: handlers running now, and messages waiting for a handler that is at its concurrency limit
        self._running: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, deque[tuple[int, Inbound]]] = collections.defaultdict(deque)
        self._generation = 0
        self._stop = threading.Event()
        self._started = False
        self.engine: SagaEngine | None = None
        self._saga_routes: dict[str, str] = {}
        self._subscriptions: list[Subscription] = []
        #: wall clock of deadlines and timers; ``rng`` jitters deadlines; ``executor`` runs handlers
        #: (a thread pool of ``concurrency`` threads by default). :mod:`sagas.testing` replaces all three.
        self.clock = clock
        self.rng = rng
        self._executor = executor
        self.timer_interval = timer_interval
        self.relay_interval = relay_interval
        self._next_timers = 0.0
        self._next_relay = 0.0
        #: messages handled successfully, and reconnections after a lost connection
        self.handled = 0
        self.reconnects = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, connect to the broker (within the grace period) and start consuming."""
        if self._started:
            return
        handlers = self.app.handlers
        if not handlers and not self.app.sagas:
            raise ConfigurationError("the app has no handlers and no sagas: declare some with @service.on(...)")
        self.store = open_store(self._store_arg)
        self.bus = self._bus_arg or EventBus(self.broker, exchange=self.exchange, ssl=self.ssl)
        self._routes = {}
        self._subscriptions = []
        for spec in handlers:
            sub = spec.subscription(self.exchange, self.instance)
            self._routes[sub.queue] = spec
            self._subscriptions.append(sub)
        self.engine = SagaEngine(self.app.sagas, self.store, clock=self.clock, rng=self.rng) if self.app.sagas else None
        self._saga_routes = {}
        for d in self.engine.definitions.values() if self.engine else ():
            sub = Subscription(
                queue=f"{self.exchange}.saga.{d.type}",
                patterns=d.patterns,
                prefetch=256,
                retry_delays=SAGA_RETRY.delays,
            )
            self._saga_routes[sub.queue] = d.type
            self._subscriptions.append(sub)
        self._pool = self._executor or ThreadPoolExecutor(self.concurrency, thread_name_prefix="sagas-handler")
        try:
            self._connect(time.monotonic() + self.grace_period)
        except BaseException:
            self._close()  # e.g. a permission or topology error: leave no connection, thread or store open
            raise
        self._started = True
        log.info(
            "worker.started",
            broker=redact_url(self.broker),
            exchange=self.exchange,
            services=[s.name for s in self.app.services],
            handlers=len(self._routes),
            concurrency=self.concurrency,
        )

    def _connect(self, deadline: float) -> None:
        subs = self._subscriptions
        delay = 0.2
        while True:
            try:
                self.bus.connect(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                self.bus.consume(subs, self._on_message)
                return
            except (BrokerUnavailable, ConnectionLost, PublishError, OSError) as exc:
                self.bus.close()
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise BrokerUnavailable(
                        f"broker {redact_url(self.broker)} unreachable for the grace period "
                        f"({self.grace_period:.0f}s): {exc}"
                    ) from None
                log.warning("worker.broker_unreachable", error=str(exc), retry_in=round(delay, 2))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        """Ask the worker to stop gracefully (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, *, install_signals: bool = False) -> int:
        """Run until stopped. Returns the process exit code: 0, or 3 if the broker stayed away."""
        if install_signals:
            self._install_signals()
        try:
            self.start()
            while not self._stop.is_set():
                self.step()
        except BrokerUnavailable as exc:
            log.error("worker.broker_unavailable", error=str(exc))
            self._close()
            return EXIT_BROKER_UNAVAILABLE
        self.shutdown()
        return 0

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                raise KeyboardInterrupt
            log.info("worker.stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def shutdown(self) -> None:
        """Stop receiving, finish the messages already being handled, ack them, and disconnect."""
        if not self._started:
            return
        bus = self.bus
        with contextlib.suppress(TransportError, *bus.connection_errors):
            bus.cancel()
        # Messages that did not start are unacked: they go back to the queue when the connection closes.
        self._drop_pending()
        deadline = time.monotonic() + self.shutdown_timeout
        while (self._inflight or self._ready) and time.monotonic() < deadline:
            try:
                self._process_outcomes()
                self._dispatch()
                if self._inflight:
                    self._wait_outcome(0.05)
            except ConnectionLost:
                break
        self._close()
        log.info("worker.stopped", handled=self.handled)

    def _close(self) -> None:
        if hasattr(self, "bus"):
            self.bus.close()
        if hasattr(self, "_pool"):
            # A handler still running after the shutdown timeout is abandoned; its message was not
            # acked and goes back to the queue.
            self._pool.shutdown(wait=self._inflight == 0, cancel_futures=True)
        if hasattr(self, "store"):
            self.store.close()
        self._started = False

    @contextlib.contextmanager
    def running(self) -> Iterator[Worker]:
        """Run in a background thread for the duration of a ``with`` block, then stop gracefully."""
        self.start()
        errors: list[BaseException] = []

        def loop() -> None:
            try:
                while not self._stop.is_set():
                    self.step()
                self.shutdown()
            except BaseException as exc:
                errors.append(exc)
                raise

        thread = threading.Thread(target=loop, name="sagas-worker", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(timeout=90)
        if errors:
            raise errors[0]

    # -- the loop ------------------------------------------------------------------------------------

    def step(self, timeout: float = 0.05) -> None:
        """One turn of the loop: settle finished handlers, start ready messages, read from the broker."""
        if not self._started:
            raise SagasError("the worker is not running: call start() first")
        try:
            self._process_outcomes()
            self._dispatch()
            if self._tasks >= self.concurrency:
                self._wait_outcome(timeout)
            if self.engine is not None and self.clock() >= self._next_timers:
                self._run_timers()
            self._read(0.001 if (self._inflight or self._ready) else timeout)
        except ConnectionLost as exc:
            self._on_connection_lost(exc)

    def _read(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a message, then take what else the broker has sent, up to a batch."""
        if not self.bus.drain(timeout):
            return
        for _ in range(self.batch_size - 1):
            if len(self._ready) >= self.batch_size or not self.bus.drain(0):
                return

    def _on_message(self, inbound: Inbound) -> None:
        self._ready.append((self._generation, inbound))

    def _dispatch(self) -> None:
        """Start what is ready: saga messages as one group here, handlers in chunks on the pool."""
        sagas: dict[str, list[Inbound]] = {}
        work: list[_Work] = []
        room = (self.concurrency - self._tasks) * _CHUNK
        try:
            while self._ready and len(work) < room:
                generation, inbound = self._ready.popleft()
                if generation != self._generation:
                    continue  # came on a connection that broke: the broker redelivers it
                saga_type = self._saga_routes.get(inbound.subscription.queue)
                if saga_type is not None:
                    sagas.setdefault(saga_type, []).append(inbound)
                    continue
                try:
                    item = self._admit(generation, inbound)
                except (ConnectionLost, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. the store is restarting: try it later
                    self._give_back(inbound, exc)
                    continue
                if item is not None:
                    work.append(item)
        except ConnectionLost:
            # Admitted work starts even when the connection broke meanwhile: it settles as from a lost
            # connection and frees its place, so a redelivery of it is not parked for ever.
            if work:
                self._start(work)
            raise
        if work:
            self._start(work)
        for saga_type, inbounds in sagas.items():
            self._handle_sagas(saga_type, inbounds)

    def _give_back(self, inbound: Inbound, exc: Exception) -> None:
        """The worker (not the handler) failed on a message, typically because the store is down."""
        log.error(
            "message.not_processed", message_id=inbound.message_id, error=repr(exc)[:500], attempt=inbound.attempt
        )
        if not inbound.acked:  # (an at-most-once message whose handler had started was acked)
            self._retry_or_dead_letter(inbound, exc, "the worker could not process it")

    def _retry_or_dead_letter(self, inbound: Inbound, exc: BaseException, reason: str) -> str:
        """Send a message back through a delay queue (with its handler's retry policy, or the saga
        policy), or dead-letter it after the last attempt, so nothing is lost or stuck."""
        spec = self._routes.get(inbound.subscription.queue)
        retry = spec.retry if spec is not None else SAGA_RETRY
        if inbound.subscription.durable and inbound.attempt < retry.attempts:
            return self._send_back(inbound, exc, retry.delay(inbound.attempt))
        return self._send_back(inbound, exc, None, f"{reason}: {exc!r}")

    def _send_back(self, inbound: Inbound, error: BaseException | None, delay: float | None, reason: str = "") -> str:
        """Retry the message after ``delay`` seconds, or (``delay`` None) dead-letter it with ``reason``.
        Returns the outcome. If the broker refuses the copy (say the dead-letter queue's node is down),
        the message stays unacked: it goes back to its queue when this connection closes."""
        try:
            if delay is not None:
                self.bus.retry(inbound, delay, error)
                return "retry"
            self.bus.dead_letter(inbound, reason, error)
            return "dead-letter"
        except ConnectionLost:
            raise
        except TransportError as err:
            log.error("message.kept_unacked", message_id=inbound.message_id, error=str(err)[:500])
            return "kept-unacked"

    def _admit(self, generation: int, inbound: Inbound) -> _Work | None:
        """Decide whether a handler's message runs now; answer duplicates and re-sent requests at once."""
        spec = self._routes[inbound.subscription.queue]
        event = inbound.event
        if event is None:
            self._send_back(inbound, None, None, f"undecodable message: {inbound.error}")
            log.warning(
                "message.dead_lettered",
                service=spec.service,
                handler=spec.name,
                message_id=inbound.message_id,
                reason=inbound.error,
                outcome="dead-letter",
            )
            return None
        dedupe = spec.idempotent or (spec.replies and spec.cache_replies)
        if dedupe:
            busy = self._busy.get((spec.key, event.id))
            if busy is not None:
                # The same event is being handled right now: decide once that one has settled.
                busy.append((generation, inbound))
                return None
            if spec.idempotent and self.store.seen(spec.key, event.id):
                self.bus.ack(inbound)
                log.debug(
                    "message.handled",
                    event_id=event.id,
                    event_type=event.type,
                    service=spec.service,
                    handler=spec.name,
                    attempt=inbound.attempt,
                    outcome="duplicate",
                    duration_ms=0.0,
                )
                return None
        if spec.replies and spec.cache_replies:
            cached = self.store.cached_reply(spec.key, event.id)
            if cached is not None:
                # A re-sent request: answer as before, without running the work again.
                reply = decode_event(cached.encode(), CONTENT_TYPE)
                self.bus.publish(reply)
                self.bus.ack(inbound)
                log.debug(
                    "message.handled",
                    event_id=event.id,
                    event_type=event.type,
                    service=spec.service,
                    handler=spec.name,
                    attempt=inbound.attempt,
                    outcome="cached-reply",
                    duration_ms=0.0,
                )
                return None
        if spec.concurrency is not None and self._running[spec.key] >= spec.concurrency:
            self._waiting[spec.key].append((generation, inbound))
            return None
        if dedupe:
            self._busy[(spec.key, event.id)] = []
        if not inbound.subscription.durable:
            self.bus.ack(inbound)  # at-most-once: acked before it is handled
        self._running[spec.key] += 1
        return spec, inbound, event, generation

    def _start(self, work: list[_Work]) -> None:
        """Hand the work to the pool in up to one chunk per free thread; each chunk runs in order."""
        chunks = min(self.concurrency - self._tasks, len(work))
        size = -(-len(work) // chunks)
        for i in range(0, len(work), size):
            chunk = work[i : i + size]
            self._inflight += len(chunk)
            self._tasks += 1
            self._pool.submit(_run_handlers, chunk).add_done_callback(self._outcomes_ready)

    def _outcomes_ready(self, future: Future[list[_Outcome]]) -> None:
        self._outcomes.put(future.result())

    def _wait_outcome(self, timeout: float) -> None:
        try:
            first = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle([first, *self._take_outcomes()])

    def _process_outcomes(self) -> None:
        finished = self._take_outcomes()
        if finished:
            self._settle(finished)

    def _take_outcomes(self) -> list[list[_Outcome]]:
        finished: list[list[_Outcome]] = []
        while True:
            try:
                finished.append(self._outcomes.get_nowait())
            except queue.Empty:
                return finished

    def _settle(self, chunks: list[list[_Outcome]]) -> None:
        """Ack, retry or dead-letter finished messages, as a group (on the I/O thread): publish every
        follow-up and reply with pipelined confirms, commit every inbox record and cached reply in one
        transaction, then ack. A message is acked only after its own publishes and records."""
        self._tasks -= len(chunks)
        outcomes = [o for chunk in chunks for o in chunk]
        self._inflight -= len(outcomes)
        for o in outcomes:
            self._running[o.spec.key] -= 1
            waiting = self._waiting.get(o.spec.key)
            if waiting:
                # All of them, in order: one that turns out to be a duplicate does not take the free slot,
                # and must not keep the next one waiting for a settle that never comes.
                self._ready.extendleft(reversed(waiting))
                waiting.clear()
        try:
            settling = [s for s in map(self._decide, outcomes) if s is not None]
            self._publish_settling(settling)
            done = [s for s in settling if s.error is None]
            if done:
                try:
                    with self.store.group():
                        for s in done:
                            if s.o.spec.idempotent:
                                self.store.remember(s.o.spec.key, s.o.event.id)
                            if s.reply is not None and s.o.spec.cache_replies:
                                self.store.cache_reply(s.o.spec.key, s.o.event.id, s.reply_body.decode())
                except (ConnectionLost, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. the store failed after the handlers ran
                    for s in done:
                        self._give_back(s.o.inbound, exc)
                    done = []
            self.bus.ack_many([s.o.inbound for s in done])
            self.handled += len(done)
            debug = _debug_enabled()
            for s in settling:
                if s.error is not None:
                    self._fail(s)
                elif debug:
                    log.debug(
                        "message.handled",
                        **s.fields("failure-reply" if s.reply is not None and not s.reply.payload["ok"] else "ok"),
                    )
        finally:
            for o in outcomes:
                # Duplicates that waited on this one go first, and now meet the inbox.
                self._ready.extendleft(reversed(self._busy.pop((o.spec.key, o.event.id), [])))

    def _decide(self, o: _Outcome) -> _Settling | None:
        """What a finished message turns into: its reply (for a request), its error, what it publishes."""
        spec, inbound, event = o.spec, o.inbound, o.event
        durable = spec.delivery is Delivery.AT_LEAST_ONCE
        if durable and o.generation != self._generation:
            # The connection this message came on is gone, so it will be redelivered. If the handler
            # succeeded with nothing to publish, remember it so the redelivery is skipped.
            if o.error is None and not o.outbox and spec.idempotent:
                try:
                    self.store.remember(spec.key, event.id)
                except Exception as exc:  # noqa: BLE001 - then the redelivery runs it again
                    log.error("message.not_remembered", event_id=event.id, error=repr(exc)[:500])
            return None
        error = o.error
        reply: Event | None = None
        if spec.replies:
            exhausted = error is not None and (not durable or inbound.attempt >= spec.retry.attempts)
            if error is None:
                if o.result is None or isinstance(o.result, Mapping):
                    reply = reply_event(event, spec.key, spec.service, ok=True, result=o.result)
                else:
                    error = Failure(f"handler returned {type(o.result).__name__}, not a JSON object")
            if isinstance(error, NoReply):
                error = None
            elif error is not None and (isinstance(error, Failure | Reject) or exhausted):
                reply = reply_event(event, spec.key, spec.service, ok=False, reason=str(error) or type(error).__name__)
                error = None
            if reply is not None:
                o.outbox.append(reply)
        return _Settling(o, error, reply)

    def _publish_settling(self, settling: list[_Settling]) -> None:
        """Publish the follow-ups and replies of every message that succeeded, with pipelined confirms.
        A message with a publish the broker did not take fails (it is retried, and publishes again)."""
        sending = [s for s in settling if s.error is None and s.o.outbox]
        if not sending:
            return
        try:
            items = []
            for s in sending:
                for e in s.o.outbox:
                    body = encode(e, self.bus.max_event_size)
                    if e is s.reply:
                        s.reply_body = body
                    items.append((e.type, body, e.id, False))
            self.bus.publish_encoded(items)
        except ConnectionLost:
            raise
        except TransportError as exc:
            if not self.bus.connected:
                raise ConnectionLost(str(exc)) from None
            failed = getattr(exc, "failed", None) or {}
            for s in settling:
                if s.error is None and s.o.outbox and (not failed or any(e.id in failed for e in s.o.outbox)):
                    s.error = exc

    def _fail(self, s: _Settling) -> None:
        spec, inbound, error = s.o.spec, s.o.inbound, s.error
        assert error is not None
        if isinstance(error, Reject):
            outcome = self._send_back(inbound, error, None, f"rejected by handler {spec.key}: {error}")
        else:
            failed = (
                f"handler {spec.key} failed {inbound.attempt} time(s)"
                if inbound.subscription.durable
                else f"at-most-once handler {spec.key} failed"
            )
            outcome = self._retry_or_dead_letter(inbound, error, failed)
        log.warning("message.failed", error=repr(error)[:500], **s.fields(outcome))

    # -- sagas -----------------------------------------------------------------------------------------

    def _handle_sagas(self, saga_type: str, inbounds: list[Inbound]) -> None:
        """Apply messages to their sagas, inline on the I/O thread (no user I/O runs here), as one group:
        every state change in one transaction (group commit), then their outbox rows published with
        pipelined confirms and marked sent, then the acks."""
        assert self.engine is not None
        applied: list[tuple[Inbound, Applied]] = []
        failed: list[tuple[Inbound, Exception]] = []
        try:
            with self.store.group():
                for inbound in inbounds:
                    event = inbound.event
                    if event is None:
                        continue
                    try:
                        with self.store.group():  # a message that fails rolls back alone
                            applied.append((inbound, self.engine.handle(saga_type, event)))
                    except Exception as exc:  # noqa: BLE001 - a failing saga step is retried, then dead-lettered
                        failed.append((inbound, exc))
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - the commit failed (the store is down): try them later
            applied, failed = [], [(i, error) for i in inbounds if i.event is not None]
        try:
            self._publish_rows([row for _, a in applied for row in a.rows])
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - committed: the relay sends what is still unsent
            log.error("saga.outbox_not_published", error=repr(exc)[:500], relay_in=self.relay_interval)
        self.bus.ack_many([inbound for inbound, _ in applied])
        self.handled += len(applied)
        debug = _debug_enabled()
        for inbound, a in applied:
            if debug:
                event = inbound.event
                assert event is not None
                log.debug(
                    "message.handled",
                    event_id=event.id,
                    event_type=event.type,
                    saga_type=saga_type,
                    saga_id=a.saga.id if a.saga else None,
                    attempt=inbound.attempt,
                    outcome="moved" if a.moved else "ignored",
                    note=a.note or None,
                )
        for inbound, problem in failed:
            outcome = self._retry_or_dead_letter(inbound, problem, f"saga {saga_type} could not apply it")
            log.warning(
                "saga.message_failed",
                saga_type=saga_type,
                message_id=inbound.message_id,
                error=repr(problem)[:500],
                attempt=inbound.attempt,
                outcome=outcome,
            )
        for inbound in inbounds:
            if inbound.event is None:
                self._send_back(inbound, None, None, f"undecodable message: {inbound.error}")

    def _publish_rows(self, rows: list[OutboxRow]) -> None:
        """Publish committed outbox rows with pipelined confirms, then mark them sent. A request nobody
        is bound to receive fails its saga step at once."""
        assert self.engine is not None
        for _ in range(10):
            if not rows:
                return
            try:
                self.bus.publish_encoded([(r.routing_key, r.body.encode(), r.message_id, r.mandatory) for r in rows])
                failed: dict[str, str] = {}
            except ConnectionLost:
                raise
            except PublishError as exc:
                if not self.bus.connected:
                    raise ConnectionLost(str(exc)) from None
                failed = exc.failed
                if not failed or any(not f.startswith("unroutable") for f in failed.values()):
                    raise
            self.store.mark_sent([r.id for r in rows])
            more: list[OutboxRow] = []
            for r in rows:
                if r.message_id in failed:
                    log.warning("saga.request_unroutable", saga_id=r.saga_id, request=r.routing_key)
                    more += self.engine.request_unroutable(
                        r.saga_id, r.message_id, f"no service is bound to receive {r.routing_key}"
                    )
            rows = more

    def _run_timers(self) -> None:
        """Fire due deadlines, and republish outbox rows a crash left unsent."""
        assert self.engine is not None
        self._next_timers = self.clock() + self.timer_interval
        try:
            self._publish_rows(self.engine.fire_due())
            now = self.clock()
            if now >= self._next_relay:
                self._next_relay = now + self.relay_interval
                self._publish_rows(self.store.unsent(created_before=now - self.relay_interval))
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the store may be restarting; the next tick tries again
            log.error("worker.timers_failed", error=repr(exc)[:500])

    def _drop_pending(self) -> None:
        """Forget messages that did not start: nothing acked them (an at-most-once message is acked just
        before its handler starts), so they go back to their queue when the connection closes."""
        self._ready.clear()
        self._waiting.clear()
        for waiting in self._busy.values():
            waiting.clear()

    def _on_connection_lost(self, exc: ConnectionLost) -> None:
        log.warning("worker.connection_lost", error=str(exc))
        self._generation += 1
        # Unacked at-least-once messages will be redelivered; at-most-once ones were acked: keep them.
        self._drop_pending()
        self.bus.close()
        self._connect(time.monotonic() + self.grace_period)
        self.reconnects += 1
        log.info("worker.reconnected", broker=redact_url(self.broker))

    # -- helpers for tests and the demo ---------------------------------------------------------------

    def run_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Step the loop on this thread until ``predicate()`` is true or ``timeout`` passes."""
        self.start()
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.step(0.01)
        return True


def _run_handlers(work: list[_Work]) -> list[_Outcome]:
    """Run a chunk of handlers in order, on a pool thread."""
    return [_run_handler(*item) for item in work]


def _run_handler(spec: HandlerSpec, inbound: Inbound, event: Event, generation: int) -> _Outcome:
    """Run one handler on a pool thread. Never raises: the outcome carries the error."""
    outcome = _Outcome(inbound, event, spec, generation)
    ctx = Context(event, spec.service, spec.name, inbound.attempt)
    t0 = time.perf_counter()
    # The handler's own log lines carry the event; tokens put back whatever was bound before.
    tokens = structlog.contextvars.bind_contextvars(
        event_id=event.id,
        event_type=event.type,
        correlation_id=event.correlation_id,
        service=spec.service,
        handler=spec.name,
        attempt=inbound.attempt,
    )
    try:
        if spec.wants_context:
            outcome.result = spec.fn(event, ctx)
        else:
            outcome.result = spec.fn(event)
    except BaseException as exc:  # noqa: BLE001 - every handler error is retried or dead-lettered
        # SystemExit or KeyboardInterrupt raised inside a handler thread would otherwise vanish with
        # the thread's future and leave the message unsettled; they count as failures too.
        outcome.error = exc
    else:
        outcome.outbox = ctx.outbox
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    outcome.duration = time.perf_counter() - t0
    return outcome
