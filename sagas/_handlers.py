"""The handler pipeline: a service's messages in, handlers run on a pool, then acked, retried or
dead-lettered.

For one message (DESIGN: at-least-once acks only after the handler has committed)::

    admit -> (de-duplicated: claim it in the store; held by another worker? send it back, stop)
          -> (inbox: seen? ack and stop) -> (cached reply? send it, ack, stop) -> handler on the pool
          -> publish follow-ups and the reply (confirmed) -> inbox record, cached reply, release -> ack

A de-duplicated message (an idempotent handler's, or a request whose replies are cached) is claimed
in the shared store before its handler starts: ``(handler, message id)`` with this worker as owner and
a lease the I/O loop renews while the handler runs. A copy that meets a live claim of another worker
(a request re-sent by a saga's deadline, an event published twice) is not run: it goes back through
the subscription's shortest delay queue without counting an attempt, and when it returns meets the
inbox or the reply cache. A claim whose owner died expires, and the next copy takes it over.

and on failure: retry through a delay queue, or after the last attempt dead-letter it with the error
(see :mod:`sagas._redelivery`). Finished messages settle as a group: one pipelined publish, one
store transaction, then the acks. Everything here but the handlers themselves runs on the worker's
I/O thread, which owns the broker connection and the store.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from transport import CONTENT_TYPE, ConnectionLost, Event, EventBus, Inbound, TransportError, encode
from transport import decode as decode_event

from . import _tracing
from ._aio_runner import LoopWatch, timed
from ._errors import ConfigurationError, Failure, NoReply, Reject
from ._observe import NULL_OBSERVER, Observer
from ._protocol import reply_event
from ._redelivery import encode_events, retry_or_dead_letter, send_back
from ._service import Context, Delivery, HandlerSpec
from ._store import Store

log = structlog.get_logger("sagas.worker")

#: a message waiting to be dispatched: (connection generation, message)
Ready = tuple[int, Inbound]
#: messages a pool thread takes at once at most (fewer when fewer wait: each free thread gets some)
_CHUNK = 32
#: seconds a claim lasts unless renewed (renewed every third of it while the handler runs)
DEFAULT_CLAIM_LEASE = 30.0
#: seconds a copy held back by another worker's claim waits in this worker, unacked, when its
#: subscription has no delay queue to send it through (a handler with ``Retry(attempts=1)``)
_HOLD = 1.0


@dataclass(slots=True)
class HandlerOutcome:
    """What running one handler on one message gave: its return value, or the error it raised, and the
    follow-up events it published. ``generation`` is the connection the message came on."""

    inbound: Inbound
    event: Event
    spec: HandlerSpec
    generation: int
    error: BaseException | None = None
    outbox: list[Event] = field(default_factory=list)
    duration: float = 0.0
    result: Any = None
    #: the handler's span, when tracing is on (:mod:`sagas._tracing`)
    trace: Any = None

    @property
    def deduplicated(self) -> bool:
        """Whether a repeat of this message is recognised once it is recorded (inbox or reply cache)."""
        return self.spec.idempotent or (self.spec.replies and self.spec.cache_replies)


#: a message admitted to run: (handler, message, event, connection generation)
Work = tuple[HandlerSpec, Inbound, Event, int]


@dataclass(slots=True)
class _Settling:
    """A finished message on its way to be acked, retried or dead-lettered."""

    o: HandlerOutcome
    error: BaseException | None
    reply: Event | None
    #: the reply as published (and then cached)
    reply_body: bytes = b""
    #: the outbox encoded once, in its order (the reply last)
    bodies: list[bytes] = field(default_factory=list)
    #: a request not answered as it asked, logged at info or warning: (outcome, reason, warning?)
    unusual: tuple[str, str, bool] | None = None
    #: it came on a connection that broke: settled but not acked (the broker redelivers it)
    stale: bool = False

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
            **_tracing.ids(o.trace),
        }


def _debug_enabled() -> bool:
    """Whether per-message debug lines would be written (they are skipped, unbuilt, otherwise)."""
    return log.is_enabled_for(logging.DEBUG) if hasattr(log, "is_enabled_for") else True


class HandlerPipeline:
    """Runs the handlers of one worker. ``ready`` is the worker's queue of received messages: the
    pipeline puts back messages that waited on another copy of themselves, or on a free slot."""

    def __init__(
        self,
        specs: Mapping[str, HandlerSpec],
        bus: EventBus,
        store: Store,
        pool: Executor,
        concurrency: int,
        ready: deque[Ready],
        *,
        owner: str = "worker",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        lease: float = DEFAULT_CLAIM_LEASE,
        observer: Observer = NULL_OBSERVER,
        async_pool: Executor | None = None,
        watch: LoopWatch | None = None,
    ) -> None:
        #: queue name -> the handler consuming it
        self.routes = dict(specs)
        self.bus = bus
        self.store = store
        #: runs chunks of sync handlers (``run_handlers``), and of async ones (``run_handlers_async``,
        #: on an event loop: see :mod:`sagas._aio_runner`); ``watch`` times the async handlers' steps
        self.pool = pool
        self.async_pool = async_pool
        self.watch = watch
        if async_pool is None and any(spec.is_async for spec in self.routes.values()):
            raise ConfigurationError("the app has async handlers: give the pipeline an async_pool to run them on")
        #: admitted work of one kind that waits for a free slot (both kinds were ready, one slot was free)
        self._deferred: list[Work] = []
        self.concurrency = concurrency
        self._ready = ready
        self._outcomes: queue.SimpleQueue[list[HandlerOutcome]] = queue.SimpleQueue()
        self._inflight = 0  # messages handed to the pool and not settled yet
        self._tasks = 0  # chunks of them running or queued on the pool (at most ``concurrency``)
        #: (handler key, event id) of de-duplicated messages being handled, and copies waiting on them
        self._busy: dict[tuple[str, str], list[Ready]] = {}
        #: handlers running now, and messages waiting for a handler that is at its concurrency limit
        self._running: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, deque[Ready]] = collections.defaultdict(deque)
        #: messages handled successfully
        self.handled = 0
        #: who this worker is in the store's claims, the clock of their leases (stored: every worker
        #: compares them), the clock of this worker's own waits (renewals, copies held here), the lease
        self.owner = owner
        self.clock = clock
        self.monotonic = monotonic or clock
        self.lease = lease
        #: messages admitted up to their claim, claimed together by :meth:`claim_pending`
        self._pending: list[Work] = []
        #: (handler key, event id) claimed in the store and not released yet, and releases that failed
        self._claimed: set[tuple[str, str]] = set()
        self._unreleased: set[tuple[str, str]] = set()
        self._next_renewal = 0.0
        #: copies held back by another worker's claim, waiting here (no delay queue): (due, message)
        self._held: list[tuple[float, Ready]] = []
        #: copies held back by another worker's claim (sent back or held here)
        self.held_back = 0
        #: told of every message's outcome and publish (see :mod:`sagas._observe`)
        self.observer = observer

    # -- what the loop asks ----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Messages handed to the pool and not settled yet."""
        return self._inflight

    @property
    def full(self) -> bool:
        """Whether every thread of the pool has work."""
        return self._tasks >= self.concurrency

    @property
    def room(self) -> int:
        """How many more messages the pool takes now."""
        return max(0, (self.concurrency - self._tasks) * _CHUNK - len(self._deferred))

    @property
    def deferred(self) -> bool:
        """Whether admitted work waits for a free slot (:meth:`start` starts it first)."""
        return bool(self._deferred)

    @property
    def idle(self) -> bool:
        """Nothing running, finished and unsettled, or waiting for a free slot."""
        return (
            not self._inflight
            and not self._deferred
            and self._outcomes.empty()
            and not any(self._waiting.values())
            and not self._held
        )

    def waiting(self, handler: str) -> int:
        """Messages waiting because ``handler`` (``service.name``) is at its concurrency limit."""
        return len(self._waiting.get(handler, ()))

    # -- admitting and starting ------------------------------------------------------------------------

    def admit(self, generation: int, inbound: Inbound) -> Work | None:
        """Decide whether a message runs now; answer duplicates and re-sent requests at once. A message
        the worker cannot process (say the store is down) is sent back."""
        if self._claimed and self.monotonic() >= self._next_renewal:
            self.renew()  # (a long batch must not outlast the leases of the messages being handled)
        try:
            return self._admit(generation, inbound)
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the store is restarting: try it later
            self.give_back(inbound, exc)
            return None

    def _admit(self, generation: int, inbound: Inbound) -> Work | None:
        spec = self.routes[inbound.subscription.queue]
        event = inbound.event
        if event is None:
            sent = send_back(self.bus, inbound, None, None, f"undecodable message: {inbound.error}")
            self.observer.message(spec.service, spec.name, "", sent, None)
            log.warning(
                "message.dead_lettered",
                service=spec.service,
                handler=spec.name,
                message_id=inbound.message_id,
                reason=f"undecodable message: {inbound.error}",
                outcome=sent,
            )
            return None
        dedupe = spec.idempotent or (spec.replies and spec.cache_replies)
        claims = dedupe and inbound.subscription.durable  # (at-most-once messages are not de-duplicated)
        if dedupe:
            busy = self._busy.get((spec.key, event.id))
            if busy is not None:
                # The same event is being handled right now: decide once that one has settled.
                busy.append((generation, inbound))
                return None
        if not claims and self._answered(spec, event, inbound):
            return None
        if spec.concurrency is not None and self._running[spec.key] >= spec.concurrency:
            self._waiting[spec.key].append((generation, inbound))
            return None
        if claims:
            # Claimed with the other messages of this turn, in one store write (claim_pending): until
            # then, its copies wait on it and it holds its handler's place.
            self._busy[(spec.key, event.id)] = []
            self._running[spec.key] += 1
            self._pending.append((spec, inbound, event, generation))
            return None
        if dedupe:
            self._busy[(spec.key, event.id)] = []
        if not inbound.subscription.durable:
            self.bus.ack(inbound)  # at-most-once: acked before it is handled
        self._running[spec.key] += 1
        return spec, inbound, event, generation

    @property
    def pending(self) -> int:
        """Messages admitted up to their claim, which :meth:`claim_pending` takes."""
        return len(self._pending)

    def claim_pending(self) -> tuple[list[Work], ConnectionLost | None]:
        """Claim the messages :meth:`admit` left pending, all in one store write, then read the inbox
        and reply cache of those claimed (one read of each for all): the work that runs now, and the
        lost connection that cut this short, if one did (what was not decided then goes back to the
        broker with it).

        Claimed first, then the inbox and reply cache read: a holder that settles in between released
        its claim in the transaction that recorded the message, so it is seen here."""
        pending, self._pending = self._pending, []
        if not pending:
            return [], None
        now = self.clock()
        try:
            won = self.store.claim_many(
                [(spec.key, event.id) for spec, _, event, _ in pending], self.owner, now + self.lease, now
            )
        except (ConnectionLost, KeyboardInterrupt):
            self._drop_claims_pending(pending)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the store is restarting: try them later
            self._give_back_pending(pending, set(), exc)
            return [], None
        mine = [p for p in pending if (p[0].key, p[2].id) in won]
        try:
            seen, cached = self.store.answers(
                [(spec.key, event.id) for spec, _, event, _ in mine if spec.idempotent],
                [(spec.key, event.id) for spec, _, event, _ in mine if spec.replies and spec.cache_replies],
            )
        except (ConnectionLost, KeyboardInterrupt):
            self._drop_claims_pending(pending, won)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the store failed on the read: try them later
            self._give_back_pending(pending, won, exc)
            return [], None
        work: list[Work] = []
        for i, (spec, inbound, event, generation) in enumerate(pending):
            key = (spec.key, event.id)
            if key not in won:
                self._unclaimed(spec, key)
                try:
                    self._hold_back(spec, event, generation, inbound)
                except ConnectionLost as lost:
                    self._drop_claims_pending(pending[i + 1 :], won)
                    return work, lost
                continue
            self._claimed.add(key)
            try:
                answered = self._answer(spec, event, inbound, key in seen, cached.get(key))
            except ConnectionLost as lost:
                self._drop_claims_pending(pending[i:], won)
                return work, lost
            if answered:
                self._release(*key)
                self._unclaimed(spec, key)
                continue
            work.append((spec, inbound, event, generation))
        return work, None

    def _give_back_pending(self, pending: Sequence[Work], claimed: Collection[tuple[str, str]], exc: Exception) -> None:
        """The store failed while the messages of a turn were claimed or read: give them all back (see
        :meth:`give_back`), their claims taken so far released."""
        self._drop_claims_pending(pending, claimed)
        for _, inbound, _, _ in pending:
            self.give_back(inbound, exc)

    def _drop_claims_pending(self, pending: Sequence[Work], claimed: Collection[tuple[str, str]] = ()) -> None:
        """Give up messages admitted up to their claim: they did not start, nothing acked them, and the
        broker redelivers them. Those of them ``claimed`` already are released."""
        for spec, _, event, _ in pending:
            key = (spec.key, event.id)
            if key in claimed:
                self._claimed.add(key)
                self._release(*key)
            self._unclaimed(spec, key)

    def _unclaimed(self, spec: HandlerSpec, key: tuple[str, str]) -> None:
        """A pending message does not run: free its handler's place and let its copies go on."""
        self._place_freed(spec.key)
        self._ready.extendleft(reversed(self._busy.pop(key, [])))

    def _place_freed(self, handler: str) -> None:
        """A message of ``handler`` no longer holds one of its places: the messages that waited for a
        place go first again, all of them, in order (one that turns out to be a duplicate does not take
        the free place, and must not keep the next one waiting for a settle that never comes)."""
        self._running[handler] -= 1
        waiting = self._waiting.get(handler)
        if waiting:
            self._ready.extendleft(reversed(waiting))
            waiting.clear()

    def _answered(self, spec: HandlerSpec, event: Event, inbound: Inbound) -> bool:
        """Ack a message handled before (inbox), or answer a request again with its cached reply."""
        seen = spec.idempotent and self.store.seen(spec.key, event.id)
        cached = None
        if not seen and spec.replies and spec.cache_replies:
            cached = self.store.cached_reply(spec.key, event.id)
        return self._answer(spec, event, inbound, seen, cached)

    def _answer(self, spec: HandlerSpec, event: Event, inbound: Inbound, seen: bool, cached: str | None) -> bool:
        """Ack a message whose id is in the inbox (``seen``), or answer a request again with its
        ``cached`` reply: whether it was answered."""
        if seen:
            self.bus.ack(inbound)
            self._ignored(spec, event, inbound, "duplicate", "handled before: its id is in the inbox")
            return True
        if cached is not None:
            self._answer_from_cache(spec, inbound, event, cached)
            return True
        return False

    @_tracing.reply_cache
    def _answer_from_cache(self, spec: HandlerSpec, inbound: Inbound, event: Event, cached: str) -> None:
        """A re-sent request: answer as before, without running the work again (traced as a handler
        span with ``sagas.outcome = reply-cache``; the reply published again is its child)."""
        self.bus.publish(_tracing.republished(decode_event(cached.encode(), CONTENT_TYPE)))
        self.bus.ack(inbound)
        self._ignored(
            spec,
            event,
            inbound,
            "cached-reply",
            "a request handled before: answered again from the reply cache",
        )

    def _hold_back(self, spec: HandlerSpec, event: Event, generation: int, inbound: Inbound) -> None:
        """Another worker holds the message's claim: send this copy back through the shortest delay
        queue, its attempt not counted (or, without one, keep it here unacked for a moment). When it
        returns, the holder has recorded it (inbox or reply cache), or its claim has expired."""
        self.held_back += 1
        delays = inbound.subscription.retry_delays
        delay = min(delays) if delays else None
        outcome = "held"
        if delay is None:
            self._held.append((self.monotonic() + _HOLD, (generation, inbound)))
        else:
            outcome = send_back(self.bus, inbound, None, delay, count_attempt=False)
        log.info(
            "message.held_back",
            event_id=event.id,
            event_type=event.type,
            service=spec.service,
            handler=spec.name,
            attempt=inbound.attempt,
            reason="held by another worker",
            outcome=outcome,
            retry_in=delay if delay is not None else _HOLD,
        )

    # -- claims ----------------------------------------------------------------------------------------

    def tick(self) -> None:
        """On the I/O loop: renew the claims of messages being handled (every third of the lease), retry
        releases that failed, and put back copies held here whose wait is over."""
        now = self.monotonic()
        if self._held and self._held[0][0] <= now:
            due = [ready for at, ready in self._held if at <= now]
            self._held = [(at, ready) for at, ready in self._held if at > now]
            self._ready.extend(due)
        if now >= self._next_renewal and (self._claimed or self._unreleased):
            self.renew()

    def renew(self) -> None:
        """Renew this worker's claims for another lease, after releasing those whose release failed."""
        now = self.clock()
        self._next_renewal = self.monotonic() + self.lease / 3
        try:
            for key, event_id in list(self._unreleased):
                self.store.release(key, event_id, self.owner)
                self._unreleased.discard((key, event_id))
            if self._claimed:
                self.store.renew_claims(self.owner, now + self.lease)
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the store is down: the next tick tries again
            self._next_renewal = self.monotonic() + min(1.0, self.lease / 10)
            log.error("claims.not_renewed", owner=self.owner, claims=len(self._claimed), error=repr(exc)[:500])

    def _release(self, key: str, event_id: str) -> None:
        """Release a claim now (outside a group); one that fails is released again at the next tick,
        before the renewal (while the store stays away, neither happens and its lease runs out)."""
        if (key, event_id) not in self._claimed:
            return
        self._claimed.discard((key, event_id))
        try:
            self.store.release(key, event_id, self.owner)
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - released at the next tick
            self._unreleased.add((key, event_id))

    def _ignored(self, spec: HandlerSpec, event: Event, inbound: Inbound, kind: str, reason: str) -> None:
        """Log a message acked without running its handler (a repeat), at info: never in silence."""
        log.info(
            "message.ignored",
            event_id=event.id,
            event_type=event.type,
            service=spec.service,
            handler=spec.name,
            attempt=inbound.attempt,
            kind=kind,
            reason=reason,
        )

    def start(self, work: list[Work]) -> None:
        """Hand the work out in up to one chunk per free slot (``concurrency`` in all): sync handlers'
        chunks to the pool, async handlers' to the event loop; each chunk runs in order. Work that
        waited for a slot (:attr:`deferred`) goes first."""
        if self._deferred:
            work, self._deferred = [*self._deferred, *work], []
        sync = [w for w in work if not w[0].is_async]
        kinds = [k for k in (sync, [w for w in work if w[0].is_async] if len(sync) < len(work) else []) if k]
        free = self.concurrency - self._tasks
        if free <= 0:
            self._deferred = work
            return
        if free < len(kinds):  # (one slot free, both kinds ready: the other kind waits for the next slot)
            self._deferred = kinds.pop()
        for i, kind in enumerate(kinds):
            slots = free // len(kinds) + (1 if i < free % len(kinds) else 0)
            self._start_chunks(kind, slots)

    def _start_chunks(self, work: list[Work], slots: int) -> None:
        chunks = min(slots, len(work))
        size = -(-len(work) // chunks)
        for i in range(0, len(work), size):
            chunk = work[i : i + size]
            self._inflight += len(chunk)
            self._tasks += 1
            future: Future[list[HandlerOutcome]]
            if chunk[0][0].is_async:
                assert self.async_pool is not None  # (checked when the pipeline was made)
                # (the executor awaits the coroutine: its future is of the outcomes)
                future = self.async_pool.submit(run_handlers_async, chunk, self.watch)  # type: ignore[arg-type]
            else:
                future = self.pool.submit(run_handlers, chunk)
            future.add_done_callback(self._outcomes_ready)

    def _outcomes_ready(self, future: Future[list[HandlerOutcome]]) -> None:
        self._outcomes.put(future.result())

    def give_back(self, inbound: Inbound, exc: Exception) -> str | None:
        """The worker (not the handler) failed on a message, typically because the store is down. Returns
        what became of it (``retry``, ``dead-letter``...), or None for a message acked already."""
        log.error(
            "message.not_processed", message_id=inbound.message_id, error=repr(exc)[:500], attempt=inbound.attempt
        )
        if inbound.acked:  # (an at-most-once message whose handler had started was acked)
            return None
        spec = self.routes[inbound.subscription.queue]
        return retry_or_dead_letter(self.bus, inbound, exc, "the worker could not process it", spec.retry)

    def drop_pending(self) -> None:
        """Forget messages that did not start (the loop forgets its ready ones): nothing acked them, so
        they go back to their queue when the connection closes."""
        for spec, _, event, _ in self._pending:  # (not claimed yet)
            self._running[spec.key] -= 1
            self._busy.pop((spec.key, event.id), None)
        self._pending.clear()
        self._waiting.clear()
        self._held.clear()
        for waiting in self._busy.values():
            waiting.clear()

    # -- settling --------------------------------------------------------------------------------------

    def settle_finished(self, generation: int, wait: float = 0.0) -> None:
        """Settle every handler run that finished, waiting up to ``wait`` seconds for the first."""
        finished: list[list[HandlerOutcome]] = []
        if wait > 0:
            try:
                finished.append(self._outcomes.get(timeout=wait))
            except queue.Empty:
                return
        while True:
            try:
                finished.append(self._outcomes.get_nowait())
            except queue.Empty:
                break
        if finished:
            self._settle(finished, generation)

    def _settle(self, chunks: list[list[HandlerOutcome]], generation: int) -> None:
        """Ack, retry or dead-letter finished messages, as a group (on the I/O thread): publish every
        follow-up and reply with pipelined confirms, commit every inbox record and cached reply in one
        transaction, then ack. A message is acked only after its own publishes and records."""
        self._tasks -= len(chunks)
        outcomes = [o for chunk in chunks for o in chunk]
        self._inflight -= len(outcomes)
        for o in outcomes:
            self._place_freed(o.spec.key)
        try:
            settling = [s for o in outcomes if (s := self._decide(o, generation)) is not None]
            self._publish(settling)
            done = [s for s in settling if s.error is None]
            if done:
                try:
                    with self.store.group():
                        # (in key order, the order claims are taken in: no lock cycle with a batch of claims)
                        for s in sorted(done, key=lambda s: (s.o.spec.key, s.o.event.id)):
                            key, event_id = s.o.spec.key, s.o.event.id
                            if s.o.spec.idempotent:
                                self.store.remember(key, event_id)
                            if s.reply is not None and s.o.spec.cache_replies:
                                self.store.cache_reply(key, event_id, s.reply_body.decode())
                            if (key, event_id) in self._claimed:
                                # With the record: a copy that claims it next finds the record.
                                self.store.release(key, event_id, self.owner)
                    for s in done:
                        self._claimed.discard((s.o.spec.key, s.o.event.id))
                except (ConnectionLost, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. the store failed after the handlers ran
                    for s in done:
                        _tracing.given_back(s.o.trace, exc)
                        outcome = self.give_back(s.o.inbound, exc)
                        if outcome is not None:
                            _tracing.settled(s.o.trace, s.o.event, outcome, exc)
                    done = []
            self.bus.ack_many([s.o.inbound for s in done if not s.stale])
            self.handled += len(done)
            for s in done:
                outcome = s.unusual[0] if s.unusual is not None else "ok"  # (no-reply, failure-reply)
                self.observer.message(s.o.spec.service, s.o.spec.name, s.o.event.type, outcome, s.o.duration)
            debug = _debug_enabled()
            settled = {id(s) for s in done}
            for s in settling:
                if s.error is not None:
                    self._fail(s)
                elif id(s) not in settled:
                    continue  # given back (message.not_processed)
                elif s.unusual is not None:
                    outcome, reason, warn = s.unusual
                    name = "message." + outcome.replace("-", "_")  # message.no_reply, message.failure_reply
                    (log.warning if warn else log.info)(name, reason=reason, **s.fields(outcome))
                elif debug:
                    log.debug("message.handled", **s.fields("ok"))
        finally:
            for o in outcomes:
                _tracing.end(o.trace)  # (the handler's span: ended once its message is settled)
                # Failed, or given back: release, so that the retry (here or elsewhere) claims it again.
                self._release(o.spec.key, o.event.id)
                # Copies that waited on this one go first, and now meet the inbox.
                self._ready.extendleft(reversed(self._busy.pop((o.spec.key, o.event.id), [])))

    @_tracing.within
    def _decide(self, o: HandlerOutcome, generation: int) -> _Settling | None:
        """What a finished message turns into: its reply (for a request), its error, what it publishes."""
        spec, inbound, event = o.spec, o.inbound, o.event
        durable = spec.delivery is Delivery.AT_LEAST_ONCE
        # The connection this message came on is gone, so it will be redelivered (it cannot be acked,
        # retried or dead-lettered on it). A de-duplicated message whose handler gave its answer is
        # settled all the same, but for the ack: its follow-ups and reply published, its inbox record
        # or cached reply committed, so that the redelivery is recognised instead of running the work
        # again. Any other is left to the redelivery.
        stale = durable and o.generation != generation
        if stale and not (o.deduplicated and (o.error is None or isinstance(o.error, Failure | NoReply))):
            return None
        limit = self.bus.max_event_size
        bodies: list[bytes] = []
        error = o.error
        if error is None:
            bodies, error = encode_events(o.outbox, limit)
        reply: Event | None = None
        reply_body = b""
        unusual: tuple[str, str, bool] | None = None
        if spec.replies:
            if error is None:
                if o.result is None or isinstance(o.result, Mapping):
                    reply = reply_event(event, spec.key, spec.service, ok=True, result=o.result)
                    encoded, error = encode_events([reply], limit)
                    if error is None:
                        reply_body = encoded[0]
                    else:
                        reply = None
                else:
                    error = Failure(f"handler returned {type(o.result).__name__}, not a JSON object")
            permanent = error is not None and spec.retry.gives_up(error)
            exhausted = error is not None and (not durable or permanent or inbound.attempt >= spec.retry.attempts)
            if isinstance(error, NoReply):
                unusual = ("no-reply", (str(error) or "NoReply")[:500], False)
                error = None
            elif error is not None and (isinstance(error, Failure | Reject) or exhausted):
                reason = (
                    (str(error) or type(error).__name__)
                    if isinstance(error, Failure | Reject)
                    else f"{type(error).__name__}: {error}".removesuffix(": ")  # a KeyError's name says what it is
                )
                if permanent:
                    o.outbox.clear()  # one of them may be what cannot be encoded: none is sent
                    bodies = []
                reply = reply_event(event, spec.key, spec.service, ok=False, reason=reason[:2000])
                reply_body = encode(reply, limit)
                # (a Failure the handler raised is its answer; a Reject, or an error it gave up on, is not)
                unusual = ("failure-reply", reason[:500], not isinstance(o.error, Failure))
                error = None
            if reply is not None:
                o.outbox.append(reply)
                bodies.append(reply_body)
        if stale and error is not None:
            return None  # (not encodable, say: the redelivery fails it again, and retries it)
        return _Settling(o, error, reply, reply_body, bodies, unusual, stale=stale)

    def _publish(self, settling: Sequence[_Settling]) -> None:
        """Publish the follow-ups and replies of every message that succeeded, with pipelined confirms.
        A message with a publish the broker did not take fails (it is retried, and publishes again)."""
        sending = [s for s in settling if s.error is None and s.o.outbox]
        if not sending:
            return
        try:
            items = [(e.type, body, e.id, False) for s in sending for e, body in zip(s.o.outbox, s.bodies, strict=True)]
            t0 = time.perf_counter()
            self.bus.publish_encoded(items)
            self.observer.published(len(items), time.perf_counter() - t0)
        except ConnectionLost:
            raise
        except TransportError as exc:
            if not self.bus.connected:
                raise ConnectionLost(str(exc)) from None
            failed = getattr(exc, "failed", None) or {}
            for s in sending:
                if not failed or any(e.id in failed for e in s.o.outbox):
                    s.error = exc

    def _fail(self, s: _Settling) -> None:
        spec, inbound, error = s.o.spec, s.o.inbound, s.error
        if error is None:
            return
        if isinstance(error, Reject):
            outcome = send_back(self.bus, inbound, error, None, f"rejected by handler {spec.key}: {error}")
        else:
            failed = (
                f"handler {spec.key} failed {inbound.attempt} time(s)"
                if inbound.subscription.durable
                else f"at-most-once handler {spec.key} failed"
            )
            if spec.retry.gives_up(error):
                failed += f" with {type(error).__name__}, which is not retried (Retry.give_up_on)"
            outcome = retry_or_dead_letter(self.bus, inbound, error, failed, spec.retry)
        self.observer.message(spec.service, spec.name, s.o.event.type, outcome, s.o.duration)
        log.warning("message.failed", error=repr(error)[:500], **s.fields(outcome))
        _tracing.settled(s.o.trace, s.o.event, outcome, error)


def run_handlers(work: list[Work]) -> list[HandlerOutcome]:
    """Run a chunk of sync handlers in order, on a pool thread."""
    return [_run_handler(*item) for item in work]


async def run_handlers_async(work: list[Work], watch: LoopWatch | None = None) -> list[HandlerOutcome]:
    """Run a chunk of ``async def`` handlers in order, on the worker's event loop (each chunk is one
    task, so at most ``concurrency`` handler calls run at once, as on the pool). ``watch`` times each
    step of each handler (see :mod:`sagas._aio_runner`)."""
    outcomes: list[HandlerOutcome] = []
    for item in work:
        if outcomes and isinstance(outcomes[-1].error, asyncio.CancelledError):
            # cancelled (the worker closes): the rest of the chunk does not start either
            outcomes.append(HandlerOutcome(item[1], item[2], item[0], item[3], error=outcomes[-1].error))
            continue
        outcomes.append(await _run_handler_async(*item, watch))
    return outcomes


class _Call:
    """One handler call being run: its outcome, context and the log and trace context bound around it."""

    __slots__ = ("args", "ctx", "outcome", "started", "t0", "tokens")

    def __init__(self, spec: HandlerSpec, inbound: Inbound, event: Event, generation: int) -> None:
        self.outcome = HandlerOutcome(inbound, event, spec, generation)
        self.ctx = Context(event, spec.service, spec.name, inbound.attempt)
        self.args: tuple[Any, ...] = (event, self.ctx) if spec.wants_context else (event,)
        self.started = _tracing.handler_started(spec, inbound, event)
        # The handler's own log lines carry the event; tokens put back whatever was bound before.
        self.tokens = structlog.contextvars.bind_contextvars(
            event_id=event.id,
            event_type=event.type,
            correlation_id=event.correlation_id,
            service=spec.service,
            handler=spec.name,
            attempt=inbound.attempt,
        )
        self.t0 = time.perf_counter()

    def returned(self, result: Any) -> HandlerOutcome:
        self.outcome.result = result
        self.outcome.outbox = self.ctx.outbox
        return self._end()

    def raised(self, error: BaseException) -> HandlerOutcome:
        # SystemExit or KeyboardInterrupt raised inside a handler would otherwise vanish with the
        # thread's (or task's) future and leave the message unsettled; they count as failures too.
        self.outcome.error = error
        return self._end()

    def _end(self) -> HandlerOutcome:
        self.outcome.duration = time.perf_counter() - self.t0
        structlog.contextvars.reset_contextvars(**self.tokens)
        _tracing.handler_finished(self.started, self.outcome)
        return self.outcome


def _run_handler(spec: HandlerSpec, inbound: Inbound, event: Event, generation: int) -> HandlerOutcome:
    """Run one sync handler on a pool thread. Never raises: the outcome carries the error."""
    call = _Call(spec, inbound, event, generation)
    try:
        result = spec.fn(*call.args)
        if inspect.isawaitable(result):
            _close(result)
            raise TypeError(
                f"handler {spec.key} returned an awaitable: declare it 'async def' so that the worker awaits it"
            )
    except BaseException as exc:  # noqa: BLE001 - every handler error is retried or dead-lettered
        return call.raised(exc)
    return call.returned(result)


async def _run_handler_async(
    spec: HandlerSpec, inbound: Inbound, event: Event, generation: int, watch: LoopWatch | None
) -> HandlerOutcome:
    """Run one ``async def`` handler on the worker's event loop. Never raises (not even when its task
    is cancelled at a shutdown: the outcome carries the error, and the message is not acked)."""
    call = _Call(spec, inbound, event, generation)
    try:
        fields = {"service": spec.service, "handler": spec.name, "event_id": event.id}
        result = await timed(spec.fn(*call.args), fields, watch)
    except BaseException as exc:  # noqa: BLE001 - every handler error is retried or dead-lettered
        return call.raised(exc)
    return call.returned(result)


def _close(awaitable: Any) -> None:
    """Close a coroutine nobody will await (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


__all__ = ["HandlerOutcome", "HandlerPipeline", "Ready", "Work", "run_handlers", "run_handlers_async"]
