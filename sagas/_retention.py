"""Retention: how long the store keeps what it no longer needs, and the pruner that deletes it.

:class:`Retention` sets four windows per app (``App(..., retention=Retention(...))``); a saga type
overrides the window of its ended sagas with a class attribute ``keep_finished`` (seconds or a
``timedelta``). Each window protects something, so each has a floor that :func:`check_retention`
enforces, with a :class:`ConfigurationError` that says what to change:

- ``inbox`` (inbox records, the de-duplication of handlers): the **redelivery horizon**. A copy of a
  message that comes back within it after its first handling is a duplicate and skipped; one that comes
  back later (a dead letter replayed after it, a queue drained after a longer outage) runs again.
- ``replies`` (the participants' reply cache): a saga re-sends its request, with the same id, on its
  deadlines; a re-sent copy answered from the cache does not run the work again. So it is at least
  ``inbox`` and at least the longest re-send span of the app's requests (the waits of every send, with
  their jitter, plus the handling time a state allows).
- ``finished`` (ended sagas, with their history and outbox rows): an ended saga de-duplicates its start
  event by its key, and keeps the bookkeeping that undoes a success that comes late (``sagas._late``).
  A late reply can come up to one horizon after its request was last sent and a second one for its way
  back, so it is at least twice ``inbox``. A saga parked in ``failed`` is never pruned (it waits for an
  operator), nor one with a late compensation in flight or an unsent outbox row.
- ``outbox_sent`` (outbox rows the broker confirmed): nothing reads them but an operator's ``sagas
  show``; unsent rows are never pruned.

Claims (the leases of messages being handled, and of the elected pruner and metrics sampler) have no
window of their own. A live claim keeps a second copy of a message from running while the first is
handled; an expired one keeps nothing from anyone (the next copy takes it over), but its row is what
its owner's renewal extends, should that worker come back from a store outage still handling the
message, and workers compare its expiry on clocks that may differ by a few minutes. A claim goes when
it expired more than ``inbox`` ago: past the redelivery horizon, longer than any handler runs and any
clock differs, when no copy of its message is de-duplicated any more anyway.

:class:`Pruner` deletes in small batches (one short transaction each, oldest first, with a pause
between them), on a thread and a store connection of its own, in the one worker per store that holds
the pruner's lease: a session advisory lock on PostgreSQL, a row of the claims table elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from ._errors import ConfigurationError
from ._store import (
    PRUNED_TABLES,
    MemoryStore,
    PostgresStore,
    PrunableStore,
    PruneCutoffs,
    SQLiteStore,
    Store,
    open_store,
)

log = structlog.get_logger("sagas.retention")

DAY = 86400.0
#: the claim (consumer, message id) that elects the pruning worker on stores without advisory locks
LEASE = ("sagas:retention", "pruner")
#: the PostgreSQL session advisory lock that elects the pruning worker (per schema)
LOCK = "sagas-pruner"
#: the tables a prune deletes from, one step each (history and outbox rows of ended sagas go with them)
STEPS = ("sagas", "outbox", "inbox", "reply_cache", "claims")
#: a request's deadlines are jittered by up to +10 % (``sagas._saga.backoff_wait``)
_JITTER = 1.1


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"retention {name}= is a number of seconds or a timedelta, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"retention {name}= must be more than 0 seconds, not {value!r}: give how long to keep them, "
            "e.g. timedelta(days=7)"
        )
    return float(value)


def _days(seconds: float) -> str:
    if seconds >= 100 * 365 * DAY:
        return "more than a century"  # (a re-send span with a large backoff: past any sensible window)
    if seconds >= DAY:
        days = seconds / DAY
        return f"{days:g} day" if days == 1 else f"{days:g} days"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True, init=False)
class Retention:
    """How long the store keeps what it no longer needs (see :mod:`sagas._retention`), in seconds
    (a ``timedelta`` is taken too). Defaults: ended sagas and their history 30 days, inbox records 7 days
    (the redelivery horizon), sent outbox rows 1 day, cached replies 7 days."""

    finished: float
    inbox: float
    outbox_sent: float
    replies: float

    def __init__(
        self,
        *,
        finished: float | timedelta = 30 * DAY,
        inbox: float | timedelta = 7 * DAY,
        outbox_sent: float | timedelta = 1 * DAY,
        replies: float | timedelta = 7 * DAY,
    ) -> None:
        object.__setattr__(self, "finished", _seconds("finished", finished))
        object.__setattr__(self, "inbox", _seconds("inbox", inbox))
        object.__setattr__(self, "outbox_sent", _seconds("outbox_sent", outbox_sent))
        object.__setattr__(self, "replies", _seconds("replies", replies))
        if self.replies < self.inbox:
            raise ConfigurationError(
                f"retention replies= ({_days(self.replies)}) is shorter than inbox= ({_days(self.inbox)}): a "
                "request redelivered within the inbox window would run again; keep replies at least as long"
            )
        _check_finished("finished=", self.finished, self.inbox)

    def cutoffs(self, now: float, finished_by_type: Mapping[str, float] | None = None) -> PruneCutoffs:
        """The cutoffs of a prune at ``now``: each window back from it."""
        return PruneCutoffs(
            finished=now - self.finished,
            inbox=now - self.inbox,
            outbox_sent=now - self.outbox_sent,
            replies=now - self.replies,
            finished_by_type={t: now - s for t, s in (finished_by_type or {}).items()},
            claims=now - self.inbox,
        )


def _check_finished(what: str, finished: float, inbox: float) -> None:
    if finished < 2 * inbox:
        raise ConfigurationError(
            f"retention {what} ({_days(finished)}) is shorter than twice inbox= ({_days(2 * inbox)}): an ended "
            "saga de-duplicates its start event and undoes a success whose reply comes late, for up to two "
            "redelivery horizons; keep ended sagas at least that long (or shorten inbox=)"
        )


def resend_span(definition: Any) -> float:
    """Seconds from a request's first send to its last re-send, at most, over the saga type's requests
    (the states' and the compensations of late successes): the waits of every send with their jitter,
    plus the handling time a state allows (a deadline that finds the request handled waits that long)."""
    longest = 0.0
    for state in definition.states.values():
        if state.request_spec is not None:
            waits = sum((state.timeout or 0.0) * state.backoff**n for n in range(state.retries + 1))
            longest = max(longest, _JITTER * waits + state.handling_limit)
    for undoes in definition.late.values():
        for undo in undoes.values():
            waits = sum(undo.timeout * undo.backoff**n for n in range(undo.retries + 1))
            longest = max(longest, _JITTER * waits)
    return longest


def finished_overrides(sagas: Iterable[type[Any]]) -> dict[str, float]:
    """The saga types' own windows for their ended sagas (``keep_finished``), by type."""
    out: dict[str, float] = {}
    for cls in sagas:
        keep = getattr(cls, "keep_finished", None)
        if keep is not None:
            out[cls.definition().type] = _seconds(f"{cls.__name__}.keep_finished", keep)
    return out


def check_retention(retention: Retention, sagas: Iterable[type[Any]]) -> dict[str, float]:
    """Check ``retention`` and the saga types' ``keep_finished`` against what the saga types need;
    return those overrides by type. Raises a :class:`ConfigurationError` that says what to change."""
    sagas = list(sagas)
    overrides = finished_overrides(sagas)
    for cls in sagas:
        d = cls.definition()
        if d.type in overrides:
            _check_finished(f"{cls.__name__}.keep_finished", overrides[d.type], retention.inbox)
        span = resend_span(d)
        if retention.replies < span:
            raise ConfigurationError(
                f"retention replies= ({_days(retention.replies)}) is shorter than saga {d.type!r} re-sends a request "
                f"({_days(span)}, with jitter and handling time): a re-sent request whose cached reply is gone "
                "runs the participant's work again; keep replies at least that long"
            )
    return overrides


class Pruner:
    """Deletes what the store no longer needs, in batches, in one worker per store (see the module).

    ``store`` is the store's URL (the pruner opens its own connection, on its own thread) or a
    :class:`MemoryStore` shared with the worker. ``instance`` names this worker in the lease. A prune
    runs every ``interval`` seconds (the first after ``first_after``), in batches of ``batch`` rows with
    ``pause`` seconds between them. ``clock`` tells the time (default: the database's clock on
    PostgreSQL, read on the pruner's own connection, else the host's).
    """

    def __init__(
        self,
        store: str | Store | None,
        retention: Retention,
        *,
        instance: str,
        finished_by_type: Mapping[str, float] | None = None,
        interval: float = 300.0,
        first_after: float | None = None,
        batch: int = 500,
        pause: float = 0.05,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not interval > 0:
            raise ConfigurationError("the prune interval must be more than 0 seconds")
        if batch < 1:
            raise ConfigurationError("the prune batch must be at least 1 row")
        self.retention = retention
        self.instance = instance
        self.finished_by_type = dict(finished_by_type or {})
        self.interval = interval
        self.first_after = min(interval, 60.0) if first_after is None else first_after
        self.batch = batch
        self.pause = pause
        self.clock = clock
        self._store_arg = store
        self._store: Store | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: whether this worker held the pruner's lease at its last attempt, and when (monotonic) it took or renewed it
        self.pruning = False
        self._elected_at = 0.0

    # -- one prune -------------------------------------------------------------------------------------

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_store(self._store_arg, create=False)
        return self._store

    def now(self) -> float:
        if self.clock is not None:
            return self.clock()
        store = self._open()
        return store.database_time() if isinstance(store, PostgresStore) else time.time()

    def elect(self) -> bool:
        """Take or renew the pruner's lease; whether this worker holds it."""
        store = self._open()
        if isinstance(store, PostgresStore):
            held = store.hold_lock(LOCK)
        else:
            now = self.now()
            held = store.claim(*LEASE, self.instance, now + self.lease_seconds, now)
        self.pruning = held
        if held:
            self._elected_at = time.monotonic()
        return held

    @property
    def lease_seconds(self) -> float:
        """How long the lease lasts on a store without advisory locks, unless renewed: two intervals and a
        minute (a prune renews it every third of an interval while it runs)."""
        return 2 * self.interval + 60

    def resign(self) -> None:
        """Give the lease up now, so that another pruner takes it at its next election rather than when it
        lapses (on PostgreSQL the lock goes with the connection, when the store closes)."""
        if not self.pruning:
            return
        self.pruning = False
        store = self._store
        if store is not None and not isinstance(store, PostgresStore):
            store.release(*LEASE, self.instance)

    def _renew_while_pruning(self) -> bool:
        """Between batches of an elected pruner: renew the lease every third of an interval (a long prune
        must not outlast it); whether this pruner may go on."""
        if not self.pruning or time.monotonic() - self._elected_at < self.interval / 3:
            return True
        if self.elect():
            return True
        log.warning("retention.lease_lost", instance=self.instance, hint="another pruner took the lease: stopping")
        return False

    def cutoffs(self) -> PruneCutoffs:
        return self.retention.cutoffs(self.now(), self.finished_by_type)

    def prune_once(self) -> Counter[str]:
        """Prune every table, batch by batch, until each has nothing left past its window (or the pruner
        stops). Returns the rows deleted per table."""
        store = self._open()
        if not isinstance(store, PrunableStore):
            raise ConfigurationError(f"{type(store).__name__} cannot prune: it has no prune() method")
        cutoffs = self.cutoffs()
        total: Counter[str] = Counter()
        started = time.monotonic()
        batches = 0
        lost = False
        for table in STEPS:
            while not (lost or self._stop.is_set()):
                if not self._renew_while_pruning():
                    lost = True
                    break
                done = store.prune(table, cutoffs, self.batch)
                total.update(done)
                batches += 1
                if done.get(table, 0) < self.batch:
                    break
                self._stop.wait(self.pause)
        log.info(
            "retention.pruned",
            **{t: total.get(t, 0) for t in PRUNED_TABLES},
            batches=batches,
            seconds=round(time.monotonic() - started, 3),
        )
        return total

    def run_once(self) -> Counter[str] | None:
        """Prune if this worker holds (or takes) the lease; None when another worker prunes."""
        if not self.elect():
            return None
        return self.prune_once()

    # -- the thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sagas-pruner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        wait = self.first_after
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the store failed: log it, and try again next interval
                log.warning("retention.prune_failed", error=repr(exc)[:300], retry_in=self.interval)
                self._close()
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.resign()  # (a store that failed: the lease lapses)
        store, self._store = self._store, None
        if store is not None and store is not self._store_arg:
            with contextlib.suppress(Exception):
                store.close()

    def stop(self) -> None:
        """Stop at the end of the batch in progress, and give the lease up (:meth:`resign`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._close()


def pruner_store(store_arg: str | Store | None, store: Store) -> str | Store | None:
    """What a pruner beside a worker opens: a memory store is shared, an SQL store is opened again (a
    connection is never shared between threads), by its URL or its file; None when it cannot be."""
    if isinstance(store, MemoryStore):
        return store
    if isinstance(store_arg, str) or store_arg is None:
        return store_arg
    if isinstance(store, SQLiteStore) and store.path != ":memory:":
        return f"sqlite:///{store.path}"
    if isinstance(store, PostgresStore):
        return store.url
    return None


__all__ = ["DAY", "LEASE", "LOCK", "Pruner", "Retention", "check_retention", "pruner_store", "resend_span"]
