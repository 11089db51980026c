"""Orphaned queues: durable queues on the app's exchange that nothing of the current code consumes.

A handler or saga type that is renamed or removed leaves its queue behind, still bound to the exchange:
it goes on collecting copies of the events it subscribed to, and a later deploy that consumes it again
(a switch back) replays them all. AMQP cannot list the queues bound to an exchange, and RabbitMQ's
management plugin is not always there, so the apps keep their own topology in the store's queue
registry (:class:`sagas._store.QueueRegistry`): each worker records, at start, the durable queues its
app declares, under the app's name (:func:`app_name`).

A queue is *orphaned* for an app when

* a worker of that app registered it once, and the app's current code does not declare it;
* no other app's latest registration lists it (several apps may share an exchange and a store: a queue
  another app consumes is never the business of this one); and
* it exists and has no consumer right now (an older worker of the same app, in a rolling deploy, still
  reads it while it has one).

The same registry tells whether a request type is still handled (:class:`RequestRoutes`, for the
``request-unhandled`` check of :mod:`sagas._versions`): by a handler of the app, or by a queue another
app declared in its latest registration.

A worker only reports them (``worker.orphaned_queue``); ``sagas queues --orphaned --delete`` removes
them on an operator's word. Nothing is unbound or deleted automatically: a worker of another app that
declares the queue between the look and the delete, or an app on an older version that never
registered its queues, would lose events, and no check in the store can rule either out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from transport import EventBus, TransportError, delay_queue, topic_matches

from ._saga_pipeline import SAGA_RETRY
from ._service import App, Delivery
from ._store import QueueRecord, QueueRegistry, Store

log = structlog.get_logger("sagas.worker")


def saga_queue(exchange: str, saga_type: str) -> str:
    """The queue of a saga type: ``{exchange}.saga.{type}``."""
    return f"{exchange}.saga.{saga_type}"


def app_name(app: App) -> str:
    """The name the queue registry knows ``app`` by: its services' names, sorted and joined by ``+``,
    which stays the same when a handler or saga type is renamed; for an app without services,
    ``sagas:`` and its saga types (then a renamed type makes it another app, whose old queue nobody
    reports: see docs/operations.md)."""
    if app.services:
        return "+".join(sorted(s.name for s in app.services))
    return "sagas:" + "+".join(sorted(saga.definition().type for saga in app.sagas))


def app_queues(app: App, exchange: str, now: float = 0.0) -> list[QueueRecord]:
    """The durable queues a worker of ``app`` declares on ``exchange`` (at-least-once handlers and saga
    types; at-most-once queues delete themselves), as registry records declared at ``now``."""
    name = app_name(app)
    out: list[QueueRecord] = []
    for spec in app.handlers:
        if spec.delivery is not Delivery.AT_LEAST_ONCE or spec.broadcast:
            continue
        sub = spec.subscription(exchange, "")
        delays = tuple(delay_queue(sub.queue, d) for d in sorted(set(sub.retry_delays)))
        out.append(QueueRecord(exchange, sub.queue, name, f"handler {spec.key}", sub.patterns, delays, now))
    for saga in app.sagas:
        d = saga.definition()
        queue = saga_queue(exchange, d.type)
        delays = tuple(delay_queue(queue, s) for s in sorted(set(SAGA_RETRY.delays)))
        out.append(QueueRecord(exchange, queue, name, f"saga {d.type}", d.patterns, delays, now))
    return out


@dataclass(frozen=True, slots=True)
class Orphan:
    """An orphaned queue (see the module docstring): its registry record, the messages ready in it,
    its consumers (none, or it would not be orphaned) and the messages waiting in its delay queues."""

    record: QueueRecord
    depth: int
    consumers: int
    delayed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.record.queue,
            "depth": self.depth,
            "delayed": self.delayed,
            "consumers": self.consumers,
            "consumer": self.record.consumer,
            "app": self.record.app,
            "declared_at": self.record.declared_at,
        }


def _latest(rows: Sequence[QueueRecord]) -> dict[str, float]:
    """When each app of ``rows`` last registered its queues."""
    latest: dict[str, float] = {}
    for r in rows:
        latest[r.app] = max(latest.get(r.app, r.declared_at), r.declared_at)
    return latest


@dataclass(frozen=True, slots=True)
class RequestRoutes:
    """Who receives a request type on ``exchange``, as far as a worker of an app can know: the patterns
    of the app's own handlers (``own``), and the queue registry's records of the exchange (``rows``) of
    this app (``app``, by its registry name) and of the others.

    A request type is **unhandled** only on evidence: no handler of the app matches it, no queue of
    another app's latest registration binds it, and a registered queue did bind it (this app's before
    the handler went, or another app's in an older registration). A request type no registered queue
    ever bound may be handled by an app the registry does not know (one with a store of its own, or
    from before schema 9): it is not judged."""

    exchange: str
    app: str
    own: tuple[str, ...]
    rows: tuple[QueueRecord, ...]

    def unhandled(self, request: str) -> str | None:
        """Why nothing handles ``request`` any more (naming the queue that did), or None when something
        may."""
        if any(topic_matches(p, request) for p in self.own):
            return None
        latest = _latest(self.rows)
        binding = [r for r in self.rows if any(topic_matches(p, request) for p in r.patterns)]
        if any(r.app != self.app and r.declared_at >= latest[r.app] for r in binding):
            return None  # another app declares a queue that receives it
        if not binding:
            return None  # no evidence: nothing in this store's registry ever received it
        last = max(binding, key=lambda r: r.declared_at)
        when = datetime.fromtimestamp(last.declared_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"nothing handles {request} any more: queue {last.queue} ({last.consumer} of app {last.app!r}, last "
            f"declared {when}) received it, and no handler of this app nor a queue another app declares on "
            f"exchange {self.exchange!r} does now, so its reply would never come (keep a handler of {request} "
            "until these sagas have left the state, or migrate them to a state whose request is handled; if an "
            "app with a store of its own handles it now, delete the old queue: `sagas queues APP --orphaned "
            "--delete`)"
        )


def request_routes(store: Store, app: App, exchange: str) -> RequestRoutes | None:
    """The :class:`RequestRoutes` of ``app`` on ``exchange``; None when the store keeps no queue registry."""
    if not isinstance(store, QueueRegistry):
        return None
    own = tuple(p for spec in app.handlers for p in spec.patterns)
    return RequestRoutes(exchange, app_name(app), own, tuple(store.registered_queues(exchange)))


def register(store: Store, app: App, exchange: str, now: float) -> list[QueueRecord]:
    """Record the queues ``app`` declares in the store's registry; return them."""
    records = app_queues(app, exchange, now)
    if isinstance(store, QueueRegistry):
        store.register_queues(records)
    return records


def find_orphans(store: Store, bus: EventBus, app: App, exchange: str, *, forget: bool = True) -> list[Orphan]:
    """The queues orphaned for ``app`` on ``exchange`` (see the module docstring), each looked at on the
    broker. Registry rows of this app whose queue no longer exists are dropped, with ``forget`` (a
    worker, connected to the broker its app uses; not an operator command, whose --broker may be
    another)."""
    if not isinstance(store, QueueRegistry):
        return []
    mine = app_name(app)
    current = {r.queue for r in app_queues(app, exchange)}
    rows = store.registered_queues(exchange)
    latest = _latest(rows)
    # what the other apps declared in their latest registration: they may consume it still
    theirs = {r.queue for r in rows if r.app != mine and r.declared_at >= latest[r.app]}
    orphans: list[Orphan] = []
    for r in rows:
        if r.app != mine or r.queue in current or r.queue in theirs:
            continue
        info = bus.inspect_queue(r.queue)
        if info is None:
            if not forget:
                continue
            store.forget_queue(exchange, r.queue, mine)
            log.info("worker.orphaned_queue_gone", queue=r.queue, consumer=r.consumer, app=mine)
            continue
        if info.consumers:
            continue  # something reads it now (an older worker of this app, say)
        delayed = 0
        for dq in r.delay_queues:
            found = bus.inspect_queue(dq)
            delayed += found.messages if found is not None else 0
        orphans.append(Orphan(r, info.messages, info.consumers, delayed))
    return orphans


def check_at_start(store: Store, bus: EventBus, app: App, exchange: str, now: float) -> list[Orphan]:
    """What a worker does once connected: register its app's queues, then log each orphaned queue as
    ``worker.orphaned_queue`` (a warning when it holds messages, info when it is empty: bound, it still
    collects copies). A broker error here is logged (``worker.queue_check_failed``), not raised: it
    must not keep the worker from starting."""
    register(store, app, exchange, now)
    try:
        orphans = find_orphans(store, bus, app, exchange)
    except TransportError as exc:
        log.warning("worker.queue_check_failed", error=str(exc))
        return []
    for o in orphans:
        level = log.warning if o.depth or o.delayed else log.info
        level(
            "worker.orphaned_queue",
            queue=o.record.queue,
            depth=o.depth,
            delayed=o.delayed,
            consumers=o.consumers,
            consumer=o.record.consumer,
            app=o.record.app,
            hint="no current handler or saga type consumes it: see `sagas queues --orphaned`",
        )
    return orphans


def remove(store: Store, bus: EventBus, orphan: Orphan) -> int:
    """Delete an orphaned queue and its delay queues, and forget it; return the messages they held.
    Raises :class:`transport.QueueInUse` (and deletes nothing) when a consumer attached meanwhile."""
    held = bus.delete_queue(orphan.record.queue)
    for dq in orphan.record.delay_queues:
        held += bus.delete_queue(dq)
    if isinstance(store, QueueRegistry):
        store.forget_queue(orphan.record.exchange, orphan.record.queue, orphan.record.app)
    return held


__all__: Sequence[str] = [
    "Orphan",
    "RequestRoutes",
    "app_name",
    "app_queues",
    "check_at_start",
    "find_orphans",
    "register",
    "remove",
    "request_routes",
]
