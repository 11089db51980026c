"""The worker: one process's I/O loop over a handler pipeline and a saga pipeline.

One thread (the one that calls :meth:`Worker.run`, or :meth:`Worker.step` in a harness) owns the
broker connection and the store: it receives messages, does every ack and publish, and keeps
heartbeats going. Each turn of the loop (:meth:`Worker.step`):

1. settles the handlers that finished (:mod:`sagas._handlers`: replies, follow-ups, inbox, acks);
2. dispatches what was received: saga messages as one group (:mod:`sagas._saga_pipeline`), handler
   messages to the pool;
3. fires the deadlines that passed and relays unsent outbox rows (also the saga pipeline);
4. reads the next batch from the broker.

Handlers run on a small thread pool (``async def`` ones on an event loop of their own: see
:mod:`sagas._aio_runner`), so a long handler never starves the connection. A lost
connection is reconnected within the grace period; messages that came on it and were not acked are
redelivered by the broker.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from types import FrameType
from typing import Any

import structlog

from transport import (
    BrokerUnavailable,
    ConnectionLost,
    EventBus,
    Inbound,
    LoginRefused,
    PublishError,
    Subscription,
    TransportError,
    redact_url,
)

from . import _queues, _tracing
from ._aio_runner import DEFAULT_SLOW_CALLBACK, LoopExecutor, LoopWatch
from ._clock import SteadyClock
from ._errors import ConfigurationError, SagasError
from ._handlers import DEFAULT_CLAIM_LEASE, HandlerPipeline, Ready, Work
from ._observe import DOWN, NULL_OBSERVER, RECONNECTED, UP, Observer
from ._outbox import OutboxPublisher
from ._retention import Pruner, pruner_store
from ._saga_engine import SagaEngine
from ._saga_pipeline import SAGA_RETRY, SagaPipeline
from ._service import App, HandlerSpec, Service
from ._store import Store, open_store
from ._versions import CompatibilityReport, StrandedSagas, check, park, record_definitions

log = structlog.get_logger("sagas.worker")

#: Exit code of a worker that lost its broker for longer than the grace period.
EXIT_BROKER_UNAVAILABLE = 3
#: Exit code of a worker whose saga definitions would strand live sagas (see :mod:`sagas._versions`):
#: a human must act, and restarting does not help.
EXIT_STRANDED = 4
#: Exit code of a worker whose broker refused the login (a wrong user or password: not retried). It
#: was 4, shared with stranded sagas, before: a supervisor can tell them apart now.
EXIT_LOGIN_REFUSED = 5
#: messages a saga type's queue sends ahead
_SAGA_PREFETCH = 256


class Worker:
    """Runs the services and sagas of an :class:`App` against a broker and a store.

    Nothing happens in ``__init__``; :meth:`start` connects, :meth:`run` loops until :meth:`stop`
    (or SIGTERM/SIGINT with ``install_signals``), then finishes in-flight work and acks it.
    ``bus``, ``store``, ``handlers`` and ``sagas`` (the pipelines; ``sagas`` is None for an app
    without sagas) exist once the worker has started.

    ``clock`` is the host's wall clock and ``monotonic`` the clock of local waits (timer and relay
    turns, claim renewals). Deadlines and leases read :attr:`now`, a steady clock that starts at the
    database's clock on PostgreSQL (at ``clock`` otherwise, or when ``clock`` is given) and never jumps
    when the host's clock is stepped (see :mod:`sagas._clock`). ``rng`` jitters deadlines and
    ``executor`` runs sync handlers (a thread pool of ``concurrency`` threads by default) and
    ``async_executor`` the ``async def`` ones (one event loop on a thread of its own, made only when the
    app has async handlers): :mod:`sagas.testing` replaces them to make a run reproducible. The two share
    ``concurrency``: at most that many handler calls run at once. An async handler step that runs
    ``slow_callback_duration`` seconds or more without awaiting is logged (``handler.blocked_loop``).

    ``claim_lease`` (seconds; default ``SAGAS_CLAIM_LEASE`` or 30) is how long this worker's claim on a
    de-duplicated message outlives the worker if it dies; while the handler runs it is renewed every
    third of it. ``instance`` names the worker in those claims: it must be unique among the workers.

    ``observer`` is told what the worker does as it goes (see :mod:`sagas._observe`; the metrics extra's
    :class:`sagas._metrics.Metrics` is one): nothing by default.

    Before it connects, a worker of an app with sagas compares its definitions with the live sagas in
    the store (:func:`sagas._versions.check`) and refuses to start (:class:`StrandedSagas`, exit code 4
    from :meth:`run`) when some would be stranded; with ``allow_stranded`` it parks those in ``failed``
    and starts. ``shared_store``: other apps keep their own saga types in this store (their sagas are
    not judged). :attr:`compatibility` holds the report.
    """

    bus: EventBus
    store: Store
    handlers: HandlerPipeline
    sagas: SagaPipeline | None
    outbox: OutboxPublisher

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
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        executor: Executor | None = None,
        async_executor: Executor | None = None,
        slow_callback_duration: float = DEFAULT_SLOW_CALLBACK,
        ssl: bool | Mapping[str, Any] | None = None,
        batch_size: int = 256,
        claim_lease: float | None = None,
        observer: Observer | None = None,
        prune: bool = True,
        prune_interval: float = 300.0,
        allow_stranded: bool = False,
        shared_store: bool = False,
    ) -> None:
        if isinstance(app, Service):
            app = App(app)
        if not isinstance(app, App):
            raise ConfigurationError(f"a worker runs an App (or one Service), not {type(app).__name__}")
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if claim_lease is None:
            try:
                claim_lease = float(os.environ.get("SAGAS_CLAIM_LEASE") or DEFAULT_CLAIM_LEASE)
            except ValueError:
                raise ConfigurationError("SAGAS_CLAIM_LEASE must be a number of seconds") from None
        if not claim_lease > 0:
            raise ConfigurationError("claim_lease must be more than 0 seconds")
        #: seconds a claim on a de-duplicated message lasts unless renewed (see :mod:`sagas._handlers`)
        self.claim_lease = claim_lease
        self.app = app
        self.broker = broker or os.environ.get("SAGAS_BROKER_URL") or "memory://"
        _tracing.set_system(self.broker)
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
        self._host_clock = clock is None
        self.clock: Callable[[], float] = clock or time.time
        self.monotonic = monotonic
        #: the steady clock of deadlines and leases (set by :meth:`start`)
        self.now: Callable[[], float] = self.clock
        self.rng = rng
        self._executor = executor
        self.timer_interval = timer_interval
        self.relay_interval = relay_interval
        #: messages read from the broker in one turn of the loop, at most, and settled as one group
        self.batch_size = batch_size
        #: received messages not dispatched yet, with the connection generation they came on
        self._ready: deque[Ready] = deque()
        self._generation = 0
        self._stop = threading.Event()
        self._started = False
        self._pool: Executor | None = None
        self._async_executor = async_executor
        #: runs the app's async handlers (an event loop of its own: see :mod:`sagas._aio_runner`)
        self._async_pool: Executor | None = None
        if not slow_callback_duration > 0:
            raise ConfigurationError("slow_callback_duration must be more than 0 seconds")
        self.slow_callback_duration = slow_callback_duration
        self.sagas = None
        self._subscriptions: list[Subscription] = []
        #: reconnections after a lost connection
        self.reconnects = 0
        #: what the worker reports to (see :mod:`sagas._observe`)
        self.observer: Observer = observer or NULL_OBSERVER
        if not prune_interval > 0:
            raise ConfigurationError("prune_interval must be more than 0 seconds")
        #: whether this worker runs a pruner (pruning only while it holds the store's pruner lease), and how often
        self.prune = prune
        self.prune_interval = prune_interval
        self.pruner: Pruner | None = None
        self.allow_stranded = allow_stranded
        self.shared_store = shared_store
        #: what the check of the definitions against the live sagas found at start (None: not checked)
        self.compatibility: CompatibilityReport | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, connect to the broker (within the grace period) and start consuming."""
        if self._started:
            return
        specs = self.app.handlers
        if not specs and not self.app.sagas:
            raise ConfigurationError("the app has no handlers and no sagas: declare some with @service.on(...)")
        self.store = open_store(self._store_arg)
        database_time = getattr(self.store, "database_time", None) if self._host_clock else None
        self.now = SteadyClock(database_time if callable(database_time) else self.clock, self.monotonic)
        self.bus = self._bus_arg or EventBus(self.broker, exchange=self.exchange, ssl=self.ssl)
        routes: dict[str, HandlerSpec] = {}
        self._subscriptions = []
        for spec in specs:
            sub = spec.subscription(self.exchange, self.instance)
            routes[sub.queue] = spec
            self._subscriptions.append(sub)
        engine = (
            SagaEngine(self.app.sagas, self.store, clock=self.now, rng=self.rng, observer=self.observer)
            if self.app.sagas
            else None
        )
        self.outbox = OutboxPublisher(self.bus, self.store, engine, observer=self.observer)
        if engine is not None:
            try:
                self._check_definitions(engine)
            except BaseException:
                self.close()
                raise
        saga_routes: dict[str, str] = {}
        for d in engine.definitions.values() if engine else ():
            sub = Subscription(
                queue=f"{self.exchange}.saga.{d.type}",
                patterns=d.patterns,
                prefetch=_SAGA_PREFETCH,
                retry_delays=SAGA_RETRY.delays,
            )
            saga_routes[sub.queue] = d.type
            self._subscriptions.append(sub)
        self._pool = self._executor or ThreadPoolExecutor(self.concurrency, thread_name_prefix="sagas-handler")
        watch: LoopWatch | None = None
        if any(spec.is_async for spec in specs):
            if self._async_executor is None:
                loop = LoopExecutor(slow_callback_duration=self.slow_callback_duration)
                self._async_pool, watch = loop, loop.watch
            else:
                self._async_pool = self._async_executor
        self.handlers = HandlerPipeline(
            routes,
            self.bus,
            self.store,
            self._pool,
            self.concurrency,
            self._ready,
            owner=self.instance,
            clock=self.now,
            monotonic=self.monotonic,
            lease=self.claim_lease,
            observer=self.observer,
            async_pool=self._async_pool,
            watch=watch,
        )
        self.sagas = (
            SagaPipeline(
                saga_routes,
                engine,
                self.store,
                self.outbox,
                clock=self.now,
                monotonic=self.monotonic,
                timer_interval=self.timer_interval,
                relay_interval=self.relay_interval,
                observer=self.observer,
            )
            if engine is not None
            else None
        )
        try:
            self._connect(time.monotonic() + self.grace_period)
            # the queue registry, and a warning for each orphaned queue (see sagas._queues)
            _queues.check_at_start(self.store, self.bus, self.app, self.exchange, self.now())
        except BaseException:
            self.close()  # e.g. a permission or topology error: leave no connection, thread or store open
            raise
        self._started = True
        self._start_pruner()
        self.observer.consuming(self._subscriptions)
        log.info(
            "worker.started",
            broker=redact_url(self.broker),
            exchange=self.exchange,
            services=[s.name for s in self.app.services],
            handlers=len(routes),
            concurrency=self.concurrency,
        )

    def _start_pruner(self) -> None:
        """Start the retention pruner's thread (see :mod:`sagas._retention`), unless ``prune`` is off."""
        if not self.prune:
            return
        source = pruner_store(self._store_arg, self.store)
        if source is None:
            log.warning("retention.not_pruning", reason=f"a {type(self.store).__name__} is not opened again")
            return
        self.pruner = Pruner(
            source,
            self.app.retention,
            instance=self.instance,
            finished_by_type=self.app.keep_finished,
            interval=self.prune_interval,
            # (not self.now: on PostgreSQL it reads the worker's connection, which only its own thread uses)
            clock=None if self._host_clock else self.clock,
        )
        self.pruner.start()

    def _check_definitions(self, engine: SagaEngine) -> None:
        """Refuse to start when the definitions would strand live sagas (or park those, with
        ``allow_stranded``); then keep the definitions' graphs in the store."""
        routes = _queues.request_routes(self.store, self.app, self.exchange)
        report = self.compatibility = check(
            engine.definitions,
            self.store,
            shared_store=self.shared_store,
            unhandled=None if routes is None else routes.unhandled,
        )
        if not report.compatible:
            if not self.allow_stranded:
                raise StrandedSagas(report)
            parked = park(report, self.store, self.now(), message_id=f"deploy:{self.instance}")
            log.warning("worker.stranded_parked", parked=parked, stranded=[s.line() for s in report.stranded])
        record_definitions(engine.definitions.values(), self.store, self.now())

    @property
    def started(self) -> bool:
        return self._started

    def _connect(self, deadline: float) -> None:
        delay = 0.2
        while True:
            try:
                self.bus.connect(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                self.bus.consume(self._subscriptions, self._on_message)
                self.observer.connection(UP)
                return
            except (BrokerUnavailable, ConnectionLost, PublishError, OSError) as exc:
                self.bus.close()
                self.observer.connection(DOWN)
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
        """Run until stopped. Returns the process exit code: 0, 3 if the broker stayed away, 4 at once if
        its definitions would strand live sagas, or 5 at once if the broker refused the login."""
        if install_signals:
            self._install_signals()
        try:
            self.start()
            while not self._stop.is_set():
                self.step()
        except BrokerUnavailable as exc:
            log.error("worker.broker_unavailable", error=str(exc))
            self.close()
            return EXIT_BROKER_UNAVAILABLE
        except LoginRefused as exc:
            log.error("worker.login_refused", error=str(exc))
            self.close()
            return EXIT_LOGIN_REFUSED
        except StrandedSagas as exc:
            log.error("worker.stranded_sagas", stranded=[s.line() for s in exc.report.stranded])
            self.close()
            return EXIT_STRANDED
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
        while (self.handlers.inflight or self._ready) and time.monotonic() < deadline:
            try:
                self.handlers.settle_finished(self._generation)
                self.handlers.tick()
                self._dispatch()
                if self.handlers.inflight:
                    self.handlers.settle_finished(self._generation, wait=0.05)
            except ConnectionLost:
                break
        self.close()
        log.info("worker.stopped", handled=self.handled)

    def close(self) -> None:
        """Close at once, without finishing anything: the connection (unacked messages go back to their
        queues), the pool (a handler still running is abandoned) and the store."""
        if self.pruner is not None:
            self.pruner.stop()
            self.pruner = None
        if hasattr(self, "bus"):
            self.bus.close()
        inflight = self.handlers.inflight if hasattr(self, "handlers") else 0
        for pool in (self._pool, self._async_pool):
            if pool is not None:
                pool.shutdown(wait=inflight == 0, cancel_futures=True)
        self._async_pool = None
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
        """One turn of the loop: settle finished handlers, dispatch what is ready, fire due deadlines,
        read from the broker (waiting up to ``timeout`` when there is nothing else to do)."""
        if not self._started:
            raise SagasError("the worker is not running: call start() first")
        try:
            self.handlers.settle_finished(self._generation)
            self.handlers.tick()
            self._dispatch()
            if self.handlers.full:
                self.handlers.settle_finished(self._generation, wait=timeout)
            if self.sagas is not None:
                self.sagas.tick()
            self._read(0.001 if (self.handlers.inflight or self._ready) else timeout)
            self.observer.turn(self.handlers.inflight, len(self._ready))
        except ConnectionLost as exc:
            self._on_connection_lost(exc)

    @property
    def idle(self) -> bool:
        """Whether nothing received is waiting, running or unsettled (deadlines aside: see
        :meth:`next_wakeup`)."""
        return not self._ready and (not hasattr(self, "handlers") or self.handlers.idle)

    def next_wakeup(self) -> float | None:
        """The clock time at which the next deadline fires or the relay has unsent rows to send (see
        :meth:`SagaPipeline.next_wakeup`); None for an app without sagas, or when nothing waits."""
        return None if self.sagas is None else self.sagas.next_wakeup()

    @property
    def handled(self) -> int:
        """Messages handled successfully: by handlers, and applied to sagas."""
        if not hasattr(self, "handlers"):
            return 0
        return self.handlers.handled + (self.sagas.handled if self.sagas is not None else 0)

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
        """Start what is ready: saga messages as one group per type, handlers in chunks on the pool."""
        sagas: dict[str, list[Inbound]] = {}
        saga_routes = self.sagas.routes if self.sagas is not None else {}
        work: list[Work] = []
        room = self.handlers.room
        try:
            while self._ready and len(work) < room:
                # up to the room left, admitted together (their claims in one round trip)
                batch: list[tuple[int, Inbound]] = []
                while self._ready and len(work) + len(batch) < room:
                    generation, inbound = self._ready.popleft()
                    if generation != self._generation:
                        continue  # came on a connection that broke: the broker redelivers it
                    saga_type = saga_routes.get(inbound.subscription.queue)
                    if saga_type is not None:
                        sagas.setdefault(saga_type, []).append(inbound)
                        continue
                    batch.append((generation, inbound))
                if batch:
                    self.handlers.admit(batch, work)
        except ConnectionLost:
            # Admitted work starts even when the connection broke meanwhile: it settles as from a lost
            # connection and frees its place, so a redelivery of it is not parked for ever.
            if work:
                self.handlers.start(work)
            raise
        if work or self.handlers.deferred:
            self.handlers.start(work)
        if self.sagas is not None:
            for saga_type, inbounds in sagas.items():
                self.sagas.apply(saga_type, inbounds)

    def _drop_pending(self) -> None:
        """Forget messages that did not start: nothing acked them (an at-most-once message is acked just
        before its handler starts), so they go back to their queue when the connection closes."""
        self._ready.clear()
        self.handlers.drop_pending()

    def _on_connection_lost(self, exc: ConnectionLost) -> None:
        log.warning("worker.connection_lost", error=str(exc))
        self._generation += 1
        self.observer.connection(DOWN)
        # Unacked at-least-once messages will be redelivered; at-most-once ones were acked: keep them.
        self._drop_pending()
        self.bus.close()
        self._connect(time.monotonic() + self.grace_period)
        self.reconnects += 1
        self.observer.connection(RECONNECTED)
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
