"""The saga pipeline: saga messages applied as a group, deadlines fired, and the outbox relayed.

Saga messages are applied inline on the worker's I/O thread (no user I/O runs in a saga's guards and
actions), as one group: what each first reads (its inbox record and saga) read ahead for them all, every
state change in one store transaction with a savepoint per message (group commit), then their outbox
rows published with pipelined confirms and marked sent, then the acks. A message whose step raises rolls
back alone and is retried through a delay queue, then dead-lettered; the rest of the group commits. A
message the engine refuses (a start or correlated event without an acceptable key) is dead-lettered with
the reason; one that moves no saga (a duplicate, a late reply, an event the saga's state does not take)
is acked and logged at info or warning with the reason. ``SagaPipeline.outcomes`` counts every outcome.

Every ``timer_interval`` the pipeline fires the deadlines that have passed, and every
``relay_interval`` it republishes outbox rows a crash or an outage left unsent.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import structlog

from transport import ConnectionLost, Inbound

from . import _tracing
from ._observe import NULL_OBSERVER, Observer
from ._outbox import OutboxPublisher
from ._redelivery import retry_or_dead_letter, send_back
from ._saga_engine import NOT_APPLICABLE, UNKNOWN_SAGA, UNRELATED, Applied, SagaEngine
from ._service import Retry
from ._store import Store

log = structlog.get_logger("sagas.worker")

#: Messages that moved no saga and point at a mistake or a forged message: logged at warning. The
#: others (duplicates, late replies, events for sagas that ended) are at-least-once delivery doing its
#: job: logged at info. Refused ones are dead-lettered (and logged at warning).
_WARN = frozenset({UNKNOWN_SAGA, NOT_APPLICABLE, UNRELATED})

#: How a saga message whose step raised is retried: the store failed (a saga whose own code raises is parked).
SAGA_RETRY = Retry(attempts=5, initial=1.0, factor=2.0, maximum=30.0)


class SagaPipeline:
    """Runs the sagas of one worker: ``routes`` maps each saga type's queue to the type."""

    def __init__(
        self,
        routes: Mapping[str, str],
        engine: SagaEngine,
        store: Store,
        outbox: OutboxPublisher,
        *,
        clock: Callable[[], float],
        monotonic: Callable[[], float] | None = None,
        timer_interval: float,
        relay_interval: float,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.routes = dict(routes)
        self.engine = engine
        self.store = store
        self.outbox = outbox
        #: the steady clock of deadlines and outbox ages, and the clock of this worker's turns
        self.clock = clock
        self.monotonic = monotonic or clock
        self.timer_interval = timer_interval
        self.relay_interval = relay_interval
        self._next_timers = float("-inf")  # (on the monotonic clock)
        self._next_relay = float("-inf")
        #: messages applied (moved a saga, were ignored with a reason, or were refused and dead-lettered)
        self.handled = 0
        #: how many messages had each outcome (``Applied.outcome``: moved, duplicate, late-reply, refused, ...)
        self.outcomes: Counter[str] = Counter()
        #: told of every message's outcome (see :mod:`sagas._observe`)
        self.observer = observer

    # -- messages ------------------------------------------------------------------------------------

    def apply(self, saga_type: str, inbounds: Sequence[Inbound]) -> None:
        """Apply messages to their sagas as one group, publish what they committed, then ack them."""
        bus = self.outbox.bus
        applied: list[tuple[Inbound, Applied]] = []
        failed: list[tuple[Inbound, Exception]] = []
        queue = inbounds[0].subscription.queue if inbounds else None
        with _tracing.Held(queue) as held:  # (the messages' spans end once the group has committed, or not)
            try:
                events = [inbound.event for inbound in inbounds if inbound.event is not None]
                with self.engine.group(), self.engine.reading_ahead(saga_type, events):
                    for inbound in inbounds:
                        event = inbound.event
                        if event is None:
                            continue
                        try:
                            with self.engine.group():  # a message that fails rolls back alone
                                applied.append((inbound, self.engine.handle(saga_type, event)))
                        except Exception as exc:  # noqa: BLE001 - a failing saga step is retried, then dead-lettered
                            failed.append((inbound, exc))
            except (ConnectionLost, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001 - the commit failed (the store is down): try them later
                applied, failed = [], [(i, error) for i in inbounds if i.event is not None]
                held.given_back(error)
        try:
            self.outbox.publish([row for _, a in applied for row in a.rows])
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - committed: the relay sends what is still unsent
            log.error("saga.outbox_not_published", error=repr(exc)[:500], relay_in=self.relay_interval)
        bus.ack_many([inbound for inbound, a in applied if not a.refused])
        self.handled += len(applied)
        debug = log.is_enabled_for(logging.DEBUG) if hasattr(log, "is_enabled_for") else True
        for inbound, a in applied:
            self.outcomes[a.outcome] += 1
            self.observer.message(saga_type, "saga", inbound.event.type if inbound.event else "", a.outcome, None)
            if a.moved and not debug:
                continue
            event = inbound.event
            fields = {
                "event_id": event.id if event else None,
                "event_type": event.type if event else None,
                "saga_type": saga_type,
                "saga_id": a.saga.id if a.saga else None,
                "attempt": inbound.attempt,
                "kind": a.outcome,
                "reason": a.note or None,
                **_tracing.ids(held.by_message.get(event.id) if event else None),
            }
            if fields["saga_id"] is None:
                del fields["saga_id"]  # (no saga was found)
            if a.moved:
                log.debug("message.handled", outcome="moved", **fields)
            elif a.refused:
                sent = send_back(bus, inbound, a.error, None, f"saga {saga_type} refused it: {a.note}")
                log.warning("message.dead_lettered", outcome=sent, **fields)
            elif a.outcome in _WARN:
                log.warning("message.ignored", **fields)
            else:
                log.info("message.ignored", **fields)
        for inbound, problem in failed:
            outcome = retry_or_dead_letter(bus, inbound, problem, f"saga {saga_type} could not apply it", SAGA_RETRY)
            self.observer.message(saga_type, "saga", inbound.event.type if inbound.event else "", outcome, None)
            log.warning(
                "saga.message_failed",
                saga_type=saga_type,
                message_id=inbound.message_id,
                event_type=inbound.event.type if inbound.event else None,
                error=repr(problem)[:500],
                attempt=inbound.attempt,
                outcome=outcome,
                **_tracing.ids(held.by_message.get(inbound.event.id) if inbound.event else None),
            )
        for inbound in inbounds:
            if inbound.event is None:
                reason = f"undecodable message: {inbound.error}"
                sent = send_back(bus, inbound, None, None, reason)
                self.observer.message(saga_type, "saga", "", sent, None)
                log.warning(
                    "message.dead_lettered",
                    saga_type=saga_type,
                    message_id=inbound.message_id,
                    reason=reason,
                    outcome=sent,
                )

    # -- timers --------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Fire due deadlines, and republish outbox rows a crash left unsent, when their time has come."""
        now = self.monotonic()
        if now < self._next_timers:
            return
        self._next_timers = now + self.timer_interval
        # The deadlines and the relay are two failure domains: one failing never stops the other.
        # (A saga whose own code raises is parked by the engine; what fails here is the store or the bus.)
        try:
            self.outbox.publish(self.engine.fire_due())
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the store may be restarting; the next tick tries again
            log.error("worker.timers_failed", error=repr(exc)[:500])
        now = self.monotonic()
        if now < self._next_relay:
            return
        self._next_relay = now + self.relay_interval
        try:
            self.outbox.relay(created_before=self.clock() - self.relay_interval)
        except (ConnectionLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the store may be restarting; the next turn tries again
            log.error("worker.relay_failed", error=repr(exc)[:500])

    def next_wakeup(self) -> float | None:
        """The clock time at which :meth:`tick` next has work: the first deadline, or the relay of the
        oldest unsent row, but not before the timers' next turn. None when nothing waits. (Reads the
        store: for harnesses and tools, not for the loop.)"""
        times: list[float] = []
        shift = self.clock() - self.monotonic()  # (the turns are on the monotonic clock)
        next_timers, next_relay = self._next_timers + shift, self._next_relay + shift
        due = self.store.due_sagas(float("inf"), 1, types=tuple(self.engine.definitions))
        if due and due[0].deadline is not None:
            times.append(max(due[0].deadline, next_timers))
        oldest = self.store.outbox_backlog().oldest_created_at
        if oldest is not None:
            times.append(max(oldest + self.relay_interval, next_relay, next_timers))
        return min(times, default=None)
