"""A deterministic harness: the real worker, engine, stores and routing, on a virtual clock.

The harness runs :class:`sagas.Worker` itself, not a look-alike. What it replaces is only what makes
a run non-deterministic:

- the broker is an isolated in-memory one (the same memory transport as ``memory://``, with RabbitMQ's
  routing, TTL delay queues and dead-lettering), whose TTLs run on the harness's clock;
- the clock is a :class:`VirtualClock` that moves only when the harness moves it, so a deadline an
  hour away costs nothing to reach;
- handlers run inline on the harness's thread (no thread pool), ``async def`` ones on an asyncio loop on
  the virtual clock (:class:`VirtualTimeLoop`), and deadline jitter uses a seeded RNG.

Between the workers and the broker sits a :class:`Network` that can drop, duplicate, delay or
reorder any message a worker or the test publishes. Crash points sit on the worker's side effects
(``commit``, ``publish``, ``mark_sent``, ``inbox``, ``ack``): a crash there kills the worker as
``kill -9`` would (its unacked messages go back to their queues, its memory is gone, the store keeps
what was committed) and, by default, starts a fresh one.
"""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from transport import DeadLetter, Event, EventBus, Inbound, encode, isolated_transport, topic_matches

from .._errors import SagasError
from .._handlers import HandlerOutcome
from .._observe import Observer
from .._retention import Pruner, Retention
from .._saga import Saga
from .._service import App, Service
from .._store import HistoryEntry, MemoryStore, OutboxRow, SagaRecord, Store, open_store
from .._worker import Worker
from ..operations import MAX_PAGE, Operations
from ._loop import NotVirtual, VirtualTimeLoop

T = TypeVar("T")

#: Where a worker can crash: on the saga state commit, on publishing (follow-ups, replies, requests),
#: on marking outbox rows sent, on the inbox / reply-cache write of a handler, and on the ack.
Stage = Literal["commit", "publish", "mark_sent", "inbox", "ack"]
STAGES: tuple[Stage, ...] = ("commit", "publish", "mark_sent", "inbox", "ack")
#: settle gives up when this many moves of the clock in a row publish and handle nothing
_IDLE_TURNS = 200


class Crashed(BaseException):
    """Raised inside a worker at a crash point. The harness catches it and kills that worker.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` in the framework
    can swallow it: a crash must stop the worker exactly where it happened.
    """


class NotSettled(SagasError):
    """:meth:`Harness.settle` gave up: something is still pending, or a saga is not final."""


# -- faults ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """Let the message through unchanged (a placeholder in a schedule)."""


@dataclass(frozen=True, slots=True)
class Drop:
    """The message is lost after the publisher was told the bus took it."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The message arrives ``copies`` times."""

    copies: int = 2


@dataclass(frozen=True, slots=True)
class Delay:
    """The message arrives ``seconds`` (virtual) later."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Reorder:
    """The message is overtaken by the next ``after`` messages (or arrives when all else is quiet)."""

    after: int = 1


MessageFault = Deliver | Drop | Duplicate | Delay | Reorder


@dataclass(frozen=True, slots=True)
class Crash:
    """Kill the worker ``before`` or ``after`` the ``nth`` time (counted from when it is armed) any
    worker reaches ``stage``."""

    stage: Stage
    when: Literal["before", "after"] = "before"
    nth: int = 1

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise SagasError(f"unknown crash stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if self.when not in ("before", "after"):
            raise SagasError(f"a crash happens 'before' or 'after' its stage, not {self.when!r}")
        if self.nth < 1:
            raise SagasError("nth counts from 1")


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Faults for a whole run: ``messages[i]`` applies to the i-th message the workers publish
    (requests, replies, follow-ups; after that, messages go through), and each crash fires once, at
    its stage's nth occurrence."""

    messages: tuple[MessageFault, ...] = ()
    crashes: tuple[Crash, ...] = ()

    def __str__(self) -> str:
        shown = [f"#{i}:{type(f).__name__}" for i, f in enumerate(self.messages) if not isinstance(f, Deliver)]
        shown += [f"crash {c.when} {c.stage} #{c.nth}" for c in self.crashes]
        return ", ".join(shown) or "no faults"


@dataclass(slots=True)
class _Held:
    routing_key: str
    body: bytes
    message_id: str
    due: float = math.inf  # a delay: arrives at this virtual time
    overtakers: int = 0  # a reorder: arrives once this many later messages went through


@dataclass(slots=True)
class Stats:
    """What a run did. ``crashes`` and ``faults`` count by kind."""

    published: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    crashes: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    broker_restarts: int = 0
    steps: int = 0
    #: handler runs a crash caught between the handler and its inbox or reply-cache commit: each may
    #: run again after the restart (the window no framework can close; see docs/delivery.md)
    at_risk: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "delayed": self.delayed,
            "reordered": self.reordered,
            "crashes": dict(self.crashes),
            "restarts": self.restarts,
            "broker_restarts": self.broker_restarts,
            "steps": self.steps,
            "at_risk": self.at_risk,
        }


class VirtualClock:
    """Wall-clock seconds that move only when told to. Call it to read the time."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise SagasError("the clock does not go back")
        self.now += seconds


class InlineExecutor(Executor):
    """Runs each handler at once, on the caller's thread: no threads, so every run is reproducible.
    ``ran`` is told what each call returned.

    With a ``clock`` and ``seconds`` (how long a call takes, from what it returned), a call that takes
    time is held: its effects happened when it started, and the worker learns it finished only once
    the clock has moved that far (:meth:`release`). Meanwhile other workers go on, as they would while
    a slow handler runs in another process.

    With a ``loop``, it is an async executor too: a coroutine function (``async def`` handlers) runs
    to completion on that :class:`VirtualTimeLoop`, at once, and the virtual time its awaits took
    (its sleeps, timeouts) is added to ``seconds``: the worker learns it finished only once the
    clock has moved that far too.
    """

    def __init__(
        self,
        ran: Callable[[Any], None] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        seconds: Callable[[Any], float] | None = None,
        loop: VirtualTimeLoop | None = None,
    ) -> None:
        self._ran = ran
        self._clock = clock
        self._seconds = seconds
        self.loop = loop
        self._origin = clock() if clock is not None else 0.0  # the clock's time at the loop's 0
        self._held: list[tuple[float, int, Future[Any], Any]] = []
        self._seq = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        awaited = 0.0
        try:
            result = fn(*args, **kwargs)
            if inspect.iscoroutine(result):
                result, awaited = self._await(result)
        except NotVirtual:
            raise  # (the test's mistake, not the handler's: the test fails, saying what to do)
        except BaseException as exc:  # noqa: BLE001 - handed to the future, as a pool would
            future.set_exception(exc)
            return future
        if self._ran is not None:
            self._ran(result)
        takes = awaited + (self._seconds(result) if self._seconds is not None else 0.0)
        if takes > 0 and self._clock is not None:
            self._seq += 1
            self._held.append((self._clock() + takes, self._seq, future, result))
        else:
            future.set_result(result)
        return future

    def _await(self, coroutine: Coroutine[Any, Any, T]) -> tuple[T, float]:
        """Run a coroutine on the loop, from the clock's time now. Returns what it returned and the
        virtual seconds its awaits took."""
        if self.loop is None:
            coroutine.close()
            raise SagasError("this InlineExecutor runs no coroutines: give it loop=VirtualTimeLoop()")
        if self._clock is not None:
            # time passed outside the loop (timers that came due meanwhile run first)
            self.loop.advance_to(self._clock() - self._origin)
        return self.loop.run(coroutine)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the loop, if any (nothing runs on a thread, so there is nothing to wait for)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.close()

    @property
    def held(self) -> int:
        """Calls that ran and are still taking their time."""
        return len(self._held)

    def next_done(self) -> float | None:
        """When the first held call finishes, if any."""
        return min((done for done, *_ in self._held), default=None)

    def release(self) -> int:
        """Finish the held calls whose time has come, in the order they finish."""
        if not self._held or self._clock is None:
            return 0
        now = self._clock()
        done = sorted(h for h in self._held if h[0] <= now)
        self._held = [h for h in self._held if h[0] > now]
        for _, _, future, result in done:
            future.set_result(result)
        return len(done)

    def abandon(self) -> None:
        """Forget the held calls and close the loop (their worker crashed: nobody learns they
        finished, and tasks left on the loop are gone with it)."""
        self._held.clear()
        self.shutdown()


# -- the network between the workers and the broker --------------------------------------------------


class Network:
    """Applies message faults to every publish, and holds delayed and reordered messages."""

    def __init__(self, harness: Harness) -> None:
        self._h = harness
        self._plan: list[MessageFault] = []
        self._rules: list[list[Any]] = []  # [pattern, fault, remaining]
        self.held: list[_Held] = []
        #: how many copies of each message id went through to the broker
        self.copies: Counter[str] = Counter()

    def schedule(self, faults: Sequence[MessageFault]) -> None:
        """The next messages the workers publish get these faults, one each, in order (the test's
        own publishes are left alone: aim a fault at them with :meth:`inject`)."""
        self._plan.extend(faults)

    def inject(self, fault: MessageFault, *, match: str = "#", times: int = 1) -> None:
        """The next ``times`` messages whose type matches ``match`` (a topic pattern) get ``fault``."""
        self._rules.append([match, fault, times])

    def _fault_for(self, routing_key: str, from_worker: bool) -> MessageFault:
        for rule in self._rules:
            if rule[2] > 0 and topic_matches(rule[0], routing_key):
                rule[2] -= 1
                return rule[1]  # type: ignore[no-any-return]
        if self._plan and from_worker:
            return self._plan.pop(0)
        return Deliver()

    def stop_faults(self) -> None:
        """Forget every fault not applied yet: from now on, every message goes through."""
        self._plan.clear()
        self._rules.clear()

    def send(self, bus: _Bus, items: Sequence[tuple[str, bytes, str, bool]]) -> None:
        stats = self._h.stats
        through: list[tuple[str, bytes, str, bool]] = []
        holding: list[_Held] = []
        for item in items:
            routing_key, body, message_id, _mandatory = item
            stats.published += 1
            fault = self._fault_for(routing_key, bus.slot is not None)
            if isinstance(fault, Drop):
                stats.dropped += 1
            elif isinstance(fault, Delay):
                stats.delayed += 1
                holding.append(_Held(routing_key, body, message_id, due=self._h.clock() + fault.seconds))
            elif isinstance(fault, Reorder):
                stats.reordered += 1
                holding.append(_Held(routing_key, body, message_id, overtakers=fault.after))
            elif isinstance(fault, Duplicate):
                stats.duplicated += fault.copies - 1
                through += [item] * fault.copies
            else:
                through.append(item)
        if through:
            bus.send_through(through)
            self.copies.update(item[2] for item in through)
            for held in self.held:
                held.overtakers -= len(through)
        self.held += holding
        self.release(quiet=False)

    def release(self, *, quiet: bool) -> int:
        """Let through the held messages whose time has come (all reordered ones when ``quiet``)."""
        now = self._h.clock()
        ready = [m for m in self.held if m.due <= now or (m.due == math.inf and (quiet or m.overtakers <= 0))]
        if not ready:
            return 0
        self.held = [m for m in self.held if m not in ready]
        self.copies.update(m.message_id for m in ready)
        self._h.client_bus().send_through([(m.routing_key, m.body, m.message_id, False) for m in ready])
        return len(ready)

    def next_due(self) -> float | None:
        due = [m.due for m in self.held if m.due != math.inf]
        return min(due) if due else None


class _Bus(EventBus):
    """The bus of one worker (or of the test): publishes go through the network and crash points."""

    def __init__(self, harness: Harness, slot: int | None) -> None:
        super().__init__("memory://", exchange=harness.exchange, memory_transport=harness.transport)
        self._h = harness
        self.slot = slot
        self.severed = False
        self.drained = False

    def publish_encoded(self, items: Sequence[tuple[str, bytes, str, bool]], *, timeout: float | None = None) -> None:
        if not items:
            return
        self._h.crash_point(self.slot, "publish", "before")
        self._h.network.send(self, items)
        self._h.crash_point(self.slot, "publish", "after")

    def send_through(self, items: Sequence[tuple[str, bytes, str, bool]]) -> None:
        super().publish_encoded(items)

    def ack(self, inbound: Inbound) -> None:
        if inbound.acked:
            return
        self._h.crash_point(self.slot, "ack", "before")
        super().ack(inbound)
        self._h.crash_point(self.slot, "ack", "after")

    def drain(self, timeout: float) -> bool:
        if self.severed:
            self.severed = False
            raise self.lost(ConnectionResetError("the broker restarted"))
        self.drained = super().drain(0)
        return self.drained


class _CrashingStore:
    """The harness's store, seen through crash points. Everything else passes straight through."""

    def __init__(self, harness: Harness, store: Store) -> None:
        self._h = harness
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _around(self, stage: Stage, call: Callable[[], T]) -> T:
        slot = self._h.current
        self._h.crash_point(slot, stage, "before")
        result = call()
        self._h.crash_point(slot, stage, "after")
        return result

    def save_saga(self, record: SagaRecord, **kwargs: Any) -> list[OutboxRow]:
        return self._around("commit", lambda: self._store.save_saga(record, **kwargs))

    def remember(self, consumer: str, message_id: str) -> None:
        self._around("inbox", lambda: self._store.remember(consumer, message_id))
        self._h.recorded(consumer, message_id)

    def cache_reply(self, consumer: str, request_id: str, body: str) -> None:
        self._around("inbox", lambda: self._store.cache_reply(consumer, request_id, body))
        self._h.recorded(consumer, request_id)

    def mark_sent(self, ids: Sequence[int]) -> None:
        self._around("mark_sent", lambda: self._store.mark_sent(ids))

    def close(self) -> None:
        """A worker closing (or crashing) does not close the harness's store."""


# -- the harness ---------------------------------------------------------------------------------------


class Harness:
    """Runs an app's workers in memory, deterministically, with faults.

    ``app`` is an :class:`App` (or one :class:`Service`); ``workers`` instances of it run side by
    side and share the store (memory by default; any store URL or object works, e.g. SQLite).
    ``faults`` is a :class:`FaultSchedule` for the whole run; faults can also be injected as the
    test goes (:meth:`inject`, :meth:`arm`, :meth:`crash`, :meth:`restart_broker`). A worker that
    crashes is restarted at once unless ``auto_restart`` is false.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        app: App | Service,
        *,
        workers: int = 1,
        store: str | Store | None = None,
        faults: FaultSchedule | None = None,
        seed: int = 0,
        clock: VirtualClock | None = None,
        auto_restart: bool = True,
        timer_interval: float = 0.2,
        relay_interval: float = 5.0,
        handler_seconds: float | Mapping[str, float] | Callable[[HandlerOutcome], float] = 0.0,
        observer: Observer | None = None,
    ) -> None:
        self.app = app if isinstance(app, App) else App(app)
        if workers < 1:
            raise SagasError("a harness runs at least one worker")
        self.clock = clock or VirtualClock()
        self.exchange = self.app.exchange
        self.transport = isolated_transport(self.clock)
        self.store: Store = open_store(store if store is not None else MemoryStore())
        if hasattr(self.store, "clock"):
            self.store.clock = self.clock  # (the inbox's, reply cache's and outbox's timestamps: for pruning)
        self._crashing_store = _CrashingStore(self, self.store)
        self.network = Network(self)
        self.stats = Stats()
        self.auto_restart = auto_restart
        self.timer_interval = timer_interval
        self.relay_interval = relay_interval
        #: how long each handler call takes, in virtual seconds: a number for all, a mapping by handler
        #: (``"service.name"``), or a function of the call's outcome; 0 runs every call inline
        self.handler_seconds = handler_seconds
        #: told what every worker does (see :mod:`sagas._observe`)
        self.observer = observer
        self._executors: list[InlineExecutor | None] = [None] * workers
        #: whether the app has async def handlers (their awaits may take virtual time)
        self._awaits = any(spec.is_async for spec in self.app.handlers)
        self._first = 0  # the worker that steps first in the next round of run()
        self._rng = random.Random(seed)
        self._counts: Counter[tuple[Stage, str]] = Counter()
        self._armed: list[tuple[Crash, int]] = []  # crash, and the count at which it fires
        self._client: _Bus | None = None
        self.current: int | None = None  # the worker slot being stepped
        self.workers: list[Worker | None] = [None] * workers
        self._generations = [0] * workers
        #: per worker: (handler, event id) of handler runs whose inbox or cached reply is not committed
        self._unrecorded: list[set[tuple[str, str]]] = [set() for _ in range(workers)]
        if faults is not None:
            self.network.schedule(faults.messages)
            for crash in faults.crashes:
                self.arm(crash)
        for slot in range(workers):
            self.start_worker(slot)

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker and close the store."""
        for slot, worker in enumerate(self.workers):
            if worker is not None:
                worker.bus.close()
                self.workers[slot] = None
        for executor in self._executors:
            if executor is not None:
                executor.shutdown()
        if self._client is not None:
            self._client.close()
        self.store.close()

    def start_worker(self, slot: int) -> Worker:
        """Start a fresh worker in ``slot`` (after a crash, or to add one)."""
        if slot >= len(self.workers):
            self.workers.extend([None] * (slot + 1 - len(self.workers)))
            self._generations.extend([0] * (slot + 1 - len(self._generations)))
            self._unrecorded.extend(set() for _ in range(slot + 1 - len(self._unrecorded)))
            self._executors.extend([None] * (slot + 1 - len(self._executors)))
        if self.workers[slot] is not None:
            raise SagasError(f"worker {slot} is running; crash or stop it first")
        self._generations[slot] += 1
        executor = InlineExecutor(
            lambda outcomes: self._ran(slot, outcomes),
            clock=self.clock,
            seconds=self._seconds_of,
            loop=VirtualTimeLoop(),
        )
        self._executors[slot] = executor
        worker = Worker(
            self.app,
            store=self._crashing_store,
            bus=_Bus(self, slot),
            concurrency=1,
            instance=f"harness-{slot}-{self._generations[slot]}",
            clock=self.clock,
            monotonic=self.clock,
            rng=random.Random(self._rng.random()),
            executor=executor,
            async_executor=executor,  # (async def handlers: on the executor's loop, on virtual time)
            timer_interval=self.timer_interval,
            relay_interval=self.relay_interval,
            grace_period=1.0,
            observer=self.observer,
            prune=False,  # (no threads here: a test prunes with prune())
            # with handlers that take time (or may: async ones that await), a worker reads one message
            # a turn, so that copies of a message spread over the workers as a broker's round-robin does
            batch_size=1 if self.handler_seconds or self._awaits else 256,
        )
        self.current = slot
        try:
            worker.start()
        finally:
            self.current = None
        self.workers[slot] = worker
        return worker

    def prune(self, retention: Retention | None = None) -> Counter[str]:
        """Prune the store now, on the harness's clock, as the elected worker's pruner would: with the
        app's retention (or ``retention``) and its saga types' ``keep_finished``. Returns the rows
        deleted per table."""
        pruner = Pruner(
            self.store,
            retention or self.app.retention,
            instance="harness-pruner",
            finished_by_type=self.app.keep_finished,
            pause=0.0,
            clock=self.clock,
        )
        return pruner.prune_once()

    def crash(self, slot: int = 0) -> None:
        """Kill worker ``slot`` as ``kill -9`` would: unacked messages go back, its memory is gone."""
        worker = self.workers[slot]
        if worker is None:
            return
        self.workers[slot] = None
        self.stats.at_risk += len(self._unrecorded[slot])
        self._unrecorded[slot].clear()
        executor = self._executors[slot]
        if executor is not None:
            executor.abandon()
        worker.bus.close()

    def _seconds_of(self, outcomes: Any) -> float:
        """How long a chunk of handler calls takes, in virtual seconds (see ``handler_seconds``)."""
        per = self.handler_seconds
        if not per:
            return 0.0
        total = 0.0
        for o in outcomes if isinstance(outcomes, list) else ():
            if not isinstance(o, HandlerOutcome):
                continue
            if callable(per):
                total += per(o)
            elif isinstance(per, Mapping):
                total += per.get(o.spec.key, 0.0)
            else:
                total += float(per)
        return total

    def _ran(self, slot: int, outcomes: Any) -> None:
        """Handlers ran on worker ``slot``: those that de-duplicate are at risk until recorded."""
        for o in outcomes if isinstance(outcomes, list) else ():
            if isinstance(o, HandlerOutcome) and o.error is None and o.deduplicated:
                self._unrecorded[slot].add((o.spec.key, o.event.id))

    def recorded(self, consumer: str, message_id: str) -> None:
        """An inbox record or cached reply was committed."""
        for pending in self._unrecorded:
            pending.discard((consumer, message_id))

    def restart(self, slot: int = 0) -> Worker:
        """Crash worker ``slot`` if it runs, and start a fresh one."""
        self.crash(slot)
        self.stats.restarts += 1
        return self.start_worker(slot)

    def restart_broker(self) -> None:
        """Every connection breaks, as when the broker restarts: unacked messages are requeued, the
        workers reconnect. Durable queues keep their messages; at-most-once queues lose theirs."""
        self.stats.broker_restarts += 1
        for worker in self.workers:
            if worker is not None:
                worker.bus.severed = True  # type: ignore[attr-defined]
        if self._client is not None:
            self._client.close()

    # -- faults --------------------------------------------------------------------------------------

    def inject(self, fault: MessageFault, *, match: str = "#", times: int = 1) -> None:
        """The next ``times`` messages whose type matches the pattern ``match`` get ``fault``."""
        self.network.inject(fault, match=match, times=times)

    def stop_faults(self) -> None:
        """No more faults: forget message faults and crashes not applied yet."""
        self.network.stop_faults()
        self._armed.clear()

    def arm(self, crash: Crash) -> None:
        """Crash a worker at the ``crash.nth`` time from now that any worker reaches the stage."""
        key = (crash.stage, crash.when)
        self._armed.append((crash, self._counts[key] + crash.nth))

    def crash_point(self, slot: int | None, stage: Stage, when: str) -> None:
        if slot is None:
            return  # the test's own publishes do not crash
        key = (stage, when)
        self._counts[key] += 1
        for i, (crash, at) in enumerate(self._armed):
            if (crash.stage, crash.when) == key and at == self._counts[key]:
                del self._armed[i]
                self.stats.crashes[f"{when} {stage}"] += 1
                raise Crashed(f"worker {slot} crashed {when} {stage}")

    # -- publishing ------------------------------------------------------------------------------------

    def client_bus(self) -> _Bus:
        """The test's own connection to the broker."""
        if self._client is None or not self._client.connected:
            self._client = _Bus(self, None)
            self._client.connect()
        return self._client

    def publish(self, type: str, payload: Mapping[str, Any] | None = None, **fields: Any) -> Event:
        """Publish an event as a service would (message faults apply). Returns the event."""
        event = Event(type=type, payload=dict(payload or {}), source=fields.pop("source", "test"), **fields)
        self.send(event)
        return event

    def send(self, event: Event) -> None:
        """Publish an event you built (for example the same event twice, to test duplicates)."""
        bus = self.client_bus()
        bus.publish_encoded([(event.type, encode(event), event.id, False)])

    # -- running ---------------------------------------------------------------------------------------

    def step(self, slot: int) -> bool:
        """One turn of worker ``slot``'s loop. Returns whether it received a message."""
        worker = self.workers[slot]
        if worker is None:
            return False
        self.stats.steps += 1
        bus: _Bus = worker.bus  # type: ignore[assignment]
        bus.drained = False
        self.current = slot
        reconnects = worker.reconnects
        executor = self._executors[slot]
        released = executor.release() if executor is not None else 0
        try:
            worker.step(0)
        except Crashed:
            self.crash(slot)
            if self.auto_restart:
                self.restart(slot)
            return True
        finally:
            self.current = None
        return bool(released) or bus.drained or worker.reconnects != reconnects or self._busy(slot, worker)

    def run(self, max_steps: int = 100_000) -> None:
        """Step every worker until nothing more happens without the clock moving. Each round starts
        with the next worker, so that each gets its turn to receive first (as a broker hands messages
        round-robin to its consumers)."""
        for _ in range(max_steps):
            moved = False
            count = len(self.workers)
            self._first = (self._first + 1) % count
            for slot in [*range(self._first, count), *range(self._first)]:
                moved = self.step(slot) or moved
            if (
                not moved
                and not self._deliverable()
                and not self.network.release(quiet=False)
                and not self.network.release(quiet=True)
            ):
                return
        raise NotSettled(f"still busy after {max_steps} steps: a message loop?")

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead, stopping at every deadline, delay and timer on the way."""
        target = self.clock() + seconds
        self.run()
        while (nxt := self.next_due()) is not None and nxt <= target and any(self.live_workers()):
            self.clock.now = max(self.clock.now, nxt)
            self.run()
        self.clock.now = max(self.clock.now, target)
        self.run()

    def settle(self, within: float = 24 * 3600.0) -> Harness:
        """Run, moving the clock, until nothing is pending; then every saga must be final.

        Raises :class:`NotSettled` if something is still pending after ``within`` virtual seconds,
        or if a saga is left waiting with no deadline (it would be stuck for ever).
        """
        limit = self.clock() + within
        self.run()
        idle, last = 0, self._activity()
        while (nxt := self._next_due_or_stuck()) is not None:
            if nxt > limit:
                raise NotSettled(f"still pending after {within:.0f} virtual seconds: {self.pending()}")
            self.clock.now = max(self.clock.now, nxt)
            self.run()
            idle, last = (idle + 1, last) if self._activity() == last else (0, self._activity())
            if idle >= _IDLE_TURNS:
                raise NotSettled(
                    f"nothing was published or handled in the last {_IDLE_TURNS} turns of the "
                    f"clock, yet something is pending: {self.pending()}"
                )
        for worker in self.workers:
            if worker is None and not self.auto_restart:
                raise NotSettled("a worker is down: restart it before settling")
        open_sagas = [r for r in self.sagas() if not r.final]
        if open_sagas:
            raise NotSettled(
                f"{len(open_sagas)} saga(s) not final and nothing pending: "
                + ", ".join(f"{r.type}/{r.key} in {r.state}" for r in open_sagas[:5])
            )
        return self

    def next_due(self) -> float | None:
        """The next virtual time at which something is due: a delayed or held message, a message
        waiting out a delay queue, a saga deadline, or an unsent outbox row for the relay."""
        now = self.clock()
        live = [w for w in self.workers if w is not None]
        times: list[float] = []
        held = self.network.next_due()
        if held is not None:
            times.append(held)
        channel = self.transport.Channel
        if channel.delayed:
            times.append(channel.delayed[0][0])
        times += [t for w in live if (t := w.next_wakeup()) is not None]
        times += [
            t
            for slot, w in enumerate(self.workers)
            if w is not None and (e := self._executors[slot]) is not None and (t := e.next_done()) is not None
        ]
        future = [t for t in times if t > now]
        if len(future) < len(times):
            return now  # something is due already (a worker that is down, or a timer not run yet)
        return min(future) if future else None

    def _activity(self) -> tuple[int, int]:
        return self.stats.published, sum(w.handled for w in self.live_workers())

    def _next_due_or_stuck(self) -> float | None:
        nxt = self.next_due()
        if nxt is not None and nxt <= self.clock() and not any(self.live_workers()):
            raise NotSettled(f"something is due but no worker runs to handle it: {self.pending()}")
        return nxt

    def pending(self) -> dict[str, Any]:
        """What is still waiting: held messages, delayed ones, open sagas (for error messages)."""
        return {
            "held": len(self.network.held),
            "delayed": len(self.transport.Channel.delayed),
            "open_sagas": sum(1 for r in self.sagas() if not r.final),
            "handling": sum(e.held for e in self._executors if e is not None),
            "next_due_in": (None if (n := self.next_due()) is None else round(n - self.clock(), 3)),
        }

    def _deliverable(self) -> bool:
        """Whether a queue that somebody consumes has messages waiting."""
        channel = self.transport.Channel
        return any(q.qsize() and channel.consumer_counts.get(name) for name, q in channel.queues.items())

    def _busy(self, slot: int, worker: Worker) -> bool:
        """Whether the worker has more to do without the clock moving (a handler taking virtual time
        holds its worker, which runs one call at a time, until the clock gets there)."""
        executor = self._executors[slot]
        return not worker.idle and not (executor is not None and executor.held)

    # -- looking ---------------------------------------------------------------------------------------

    @property
    def operations(self) -> Operations:
        """The operator API on the harness's store and broker, on its clock: what an operator would
        see and do (``h.operations.retry(saga_id, actor="marie")``; then :meth:`run` to let it act)."""
        return Operations(self.store, sagas=self.app.sagas, bus=self.client_bus(), clock=self.clock)

    def sagas(self, saga: type[Saga] | str | None = None, state: str | None = None) -> list[SagaRecord]:
        """Every saga in the store (of a type, in a state)."""
        saga_type = saga.definition().type if isinstance(saga, type) else saga
        return self.operations.sagas(type=saga_type, state=state, limit=MAX_PAGE).items

    def saga(self, saga: type[Saga] | str, key: str) -> SagaRecord:
        """The saga of this type with this key (raises :class:`~sagas.NotFound` if there is none)."""
        saga_type = saga.definition().type if isinstance(saga, type) else saga
        return self.operations.saga(type=saga_type, key=key).record

    def history(self, saga_id: str) -> list[HistoryEntry]:
        """A saga's history, oldest first."""
        return self.operations.saga(saga_id).history

    def dead_letters(self) -> list[DeadLetter]:
        """The messages in the dead-letter queue, with their reasons."""
        return self.operations.dead_letters()

    def queued(self) -> dict[str, int]:
        """Messages waiting in each queue (not counting delay queues' waiting messages)."""
        return {name: q.qsize() for name, q in self.transport.Channel.queues.items() if q.qsize()}

    def live_workers(self) -> Iterator[Worker]:
        return (w for w in self.workers if w is not None)


__all__ = [
    "STAGES",
    "Crash",
    "Crashed",
    "Delay",
    "Deliver",
    "Drop",
    "Duplicate",
    "FaultSchedule",
    "Harness",
    "InlineExecutor",
    "MessageFault",
    "Network",
    "NotSettled",
    "Reorder",
    "Stage",
    "Stats",
    "VirtualClock",
]
