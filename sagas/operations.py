"""The operator API: find, understand and fix sagas and dead letters.

The ``sagas`` command line and the web console are thin layers over :class:`Operations`; a team's own
tooling can use it the same way::

    from sagas.operations import Operations

    with Operations("postgresql://sagas@db/sagas", sagas=app.sagas, bus=EventBus(url)) as ops:
        for record in ops.sagas(type="postprocessing", stuck=True).items:
            ops.retry(record.id, actor="marie")

Reading needs only the store. Retrying and compensating also need the app's saga types (to know where
a saga goes) and, to send what the action commits at once, a bus; without one the messages wait in
the store's outbox and a running worker's relay sends them. Every action is recorded in the saga's
history with who (``actor``), what and when. Dead letters need the bus.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from transport import DeadLetter, EventBus, TransportError

from ._errors import ActionRefused, ConfigurationError, NotFound, SagasError
from ._outbox import OutboxPublisher
from ._saga import FAILED, Saga
from ._saga_engine import SagaEngine
from ._store import (
    HistoryEntry,
    OutboxBacklog,
    OutboxRow,
    OutboxState,
    SagaRecord,
    StateCount,
    Store,
    VersionConflict,
    open_store,
)

log = structlog.get_logger("sagas.operations")

T = TypeVar("T")

#: The most sagas one page holds.
MAX_PAGE = 100_000
#: The most sagas or dead letters one bulk action touches (:meth:`Operations.select`).
BULK_CAP = 1000
#: The most dead letters :meth:`Operations.select_dead` reads to count a filter's matches.
DEAD_BROWSE = 100_000
SAGA_ACTIONS = ("retry", "compensate")
DEAD_ACTIONS = ("replay", "drop")


class InvalidCursor(ConfigurationError):
    """A paging cursor that this API did not make (mistyped, cut short, or edited)."""


def encode_cursor(created_at: float, saga_id: str) -> str:
    """The opaque cursor of a listing position: the (created_at, id) of the last saga of a page, as URL-safe
    base64 of JSON (the creation time exactly, as ``repr`` of the float)."""
    raw = json.dumps([repr(float(created_at)), saga_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) of a cursor from :func:`encode_cursor`. Raises :class:`InvalidCursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode())
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError("not a [time, id] pair")
        created_at = float(value[0])
        if not math.isfinite(created_at) or not value[1]:
            raise ValueError("not a time and an id")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        shown = cursor if len(cursor) <= 40 else cursor[:40] + "..."
        raise InvalidCursor(f"invalid cursor {shown!r}: pass the next_cursor of a previous page unchanged") from None
    return created_at, value[1]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing: ``items``, where it starts (``offset``), whether more follow, and the
    cursor of the next page (``next_cursor``, None on the last one; pass it as ``cursor=``)."""

    items: list[T]
    offset: int
    limit: int
    has_more: bool
    next_cursor: str | None = None

    @property
    def next_offset(self) -> int | None:
        """The offset of the next page, or None on the last one."""
        return self.offset + len(self.items) if self.has_more else None


@dataclass(frozen=True, slots=True)
class SagaView:
    """One saga as an operator sees it: the record and its history, oldest first."""

    record: SagaRecord
    history: list[HistoryEntry]

    @property
    def waiting_for(self) -> dict[str, str] | None:
        """The request the saga waits on a reply to (``{"type", "id"}``), if any."""
        pending = self.record.meta.get("request")
        if isinstance(pending, dict) and pending.get("type"):
            return {"type": str(pending["type"]), "id": str(pending.get("id", ""))}
        return None

    @property
    def failure(self) -> dict[str, str] | None:
        """Where and why the saga failed (``{"state", "reason"}``), if it was parked in ``failed``, or
        left it again by an operator's retry."""
        meta = self.record.meta
        if not (meta.get("reason") or meta.get("failed_from")):
            return None
        return {"state": str(meta.get("failed_from") or ""), "reason": str(meta.get("reason") or "")}

    def to_dict(self) -> dict[str, Any]:
        out = self.record.to_dict()
        out["history"] = [h.to_dict() for h in self.history]
        return out


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an operator action did: the saga's move, and the messages it committed. ``published`` are
    the (event type, message id) pairs the broker confirmed; ``pending`` messages wait in the outbox
    for a worker's relay (``problem`` says why, when publishing was tried and failed)."""

    saga_id: str
    action: str
    actor: str
    from_state: str
    to_state: str
    published: list[tuple[str, str]] = field(default_factory=list)
    pending: int = 0
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay of dead letters did: the ids put back, the ids kept (with why), and the ids asked
    for that are not in the dead-letter queue."""

    replayed: list[str]
    kept: dict[str, str]
    missing: list[str]


@dataclass(frozen=True, slots=True)
class DropResult:
    """What dropping dead letters did: the ids deleted, and the ids asked for that were not there."""

    dropped: list[str]
    missing: list[str]


@dataclass(frozen=True, slots=True)
class Selection(Generic[T]):
    """What a filter matches, for a bulk action: the first ``cap`` ``items`` (oldest first), and
    ``over_cap`` when more match (then ``count`` is not the number of matches: narrow the filter)."""

    items: list[T]
    cap: int
    over_cap: bool

    @property
    def count(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk action did: the ids it acted on (``done``, with each result) and the ids refused,
    with why (``refused``: id -> reason)."""

    action: str
    actor: str
    done: list[ActionResult]
    refused: dict[str, str]

    def refused_by_reason(self) -> dict[str, list[str]]:
        """The refused ids grouped by why, the commonest reason first."""
        groups: dict[str, list[str]] = {}
        for saga_id, why in self.refused.items():
            groups.setdefault(why.replace(f"saga {saga_id}", "the saga"), []).append(saga_id)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "actor": self.actor,
            "done": [r.saga_id for r in self.done],
            "pending": sum(r.pending for r in self.done),
            "refused": dict(self.refused),
            "refused_by_reason": self.refused_by_reason(),
        }


def dead_letter_kind(letter: DeadLetter) -> str:
    """What a dead letter is grouped and filtered by: its error type, else the first line of its reason."""
    return letter.error_type or first_line(letter.reason)


def first_line(reason: str) -> str:
    """A failure reason without its traceback: its first line that is not blank, or, for a reason that
    starts with a traceback, the exception line it ends with."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback (most recent call last)"):
        return lines[-1]
    return lines[0]


@dataclass(frozen=True, slots=True)
class StuckSaga:
    """A saga that has not ended and whose deadline is missing or overdue: ``overdue`` seconds past its
    deadline at the overview's time (None without a deadline)."""

    id: str
    type: str
    key: str
    state: str
    created_at: float
    updated_at: float
    deadline: float | None
    overdue: float | None
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Sagas of ``type`` parked in ``failed`` for one reason (its first line): how many, the state they
    failed in when all agree (else empty), the latest failure's time and one saga's id as an example."""

    type: str
    reason: str
    count: int
    failed_from: str
    latest_at: float
    example_id: str

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class DeadLetterGroup:
    """Dead letters of one queue and error type (the dead-letter reason when the error has no type):
    how many, the oldest one's ``dead_at``, and the first line of one's error message."""

    queue: str
    error_type: str
    count: int
    oldest_dead_at: str
    example_message: str

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class Overview:
    """What an operator looks at first, as of ``as_of`` (the time of the data, seconds since the epoch):

    - ``counts``: sagas by type and state;
    - ``stuck``: the oldest sagas that have not ended and whose deadline is missing or overdue by
      ``stuck_after`` seconds, oldest first (``stuck_more`` when there are more than listed);
    - ``failures``: the sagas parked in ``failed`` grouped by type and reason, most first, read from the
      ``failed_read`` most recent of ``failed_total``;
    - ``outbox``: messages not yet confirmed by the broker, and ``outbox_oldest_age`` in seconds;
    - ``deadlines_next_minute``: deadlines that fire in the next 60 seconds;
    - ``deadlines_passed``: deadlines already passed that no worker has fired yet (a running worker
      fires each within seconds: a number that stays above 0 says no worker of the app runs, before
      the sagas count as stuck);
    - ``dead_letters``: by queue and error type (None without a bus; ``dead_letters_problem`` says why
      they could not be read when the bus failed)."""

    as_of: float
    stuck_after: float
    counts: list[StateCount]
    stuck: list[StuckSaga]
    stuck_more: bool
    failures: list[FailureGroup]
    failed_total: int
    failed_read: int
    outbox: OutboxBacklog
    outbox_oldest_age: float | None
    deadlines_next_minute: int
    dead_letters: list[DeadLetterGroup] | None
    deadlines_passed: int = 0
    dead_letters_problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The overview as JSON-ready values."""
        return {
            "as_of": self.as_of,
            "stuck_after": self.stuck_after,
            "counts": [{"type": c.type, "state": c.state, "final": c.final, "count": c.count} for c in self.counts],
            "stuck": [x.to_dict() for x in self.stuck],
            "stuck_more": self.stuck_more,
            "failures": [x.to_dict() for x in self.failures],
            "failed_total": self.failed_total,
            "failed_read": self.failed_read,
            "outbox": {
                "unsent": self.outbox.unsent,
                "oldest_created_at": self.outbox.oldest_created_at,
                "oldest_age": self.outbox_oldest_age,
            },
            "deadlines_next_minute": self.deadlines_next_minute,
            "deadlines_passed": self.deadlines_passed,
            "dead_letters": None if self.dead_letters is None else [x.to_dict() for x in self.dead_letters],
            "dead_letters_problem": self.dead_letters_problem,
        }


class Operations:
    """Operator actions on one store (the URL of an existing store, or an open :class:`~sagas.Store`),
    for an app's ``sagas``, publishing on ``bus`` when one is given. A store opened from a URL is
    closed by :meth:`close` (or the ``with`` block); a store or bus passed in belongs to the caller."""

    def __init__(
        self,
        store: str | Store,
        *,
        sagas: Sequence[type[Saga]] = (),
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._owns_store = isinstance(store, str)
        # (a URL that names no store is an error here, not a new, empty store)
        self.store = open_store(store, create=False)
        self.bus = bus
        self.clock = clock
        self._engine = SagaEngine(sagas, self.store, clock=clock) if sagas else None

    def __enter__(self) -> Operations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store if this object opened it."""
        if self._owns_store:
            self.store.close()

    # -- reading -------------------------------------------------------------------------------------

    def sagas(
        self,
        *,
        type: str | None = None,
        state: str | None = None,
        key: str | None = None,
        stuck: bool = False,
        stuck_after: float = 60.0,
        newest_first: bool = False,
        limit: int = 50,
        offset: int = 0,
        cursor: str | None = None,
        key_prefix: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        failed: bool = False,
    ) -> Page[SagaRecord]:
        """A page of sagas, oldest first (or newest), filtered by type, state, business key (exact, or
        ``key_prefix``), ``failed`` (parked in ``failed``) and creation time (``created_after`` <=
        created_at < ``created_before``, seconds since the epoch).

        ``stuck`` keeps only sagas that have not ended and whose deadline is missing or passed at least
        ``stuck_after`` seconds ago: a worker should have moved them (is one running?).

        Page with ``cursor`` (the ``next_cursor`` of the previous page, with the same filters and order):
        it stays fast however deep, where ``offset`` reads and skips every row before the page. An invalid
        cursor raises :class:`InvalidCursor`."""
        if not 1 <= limit <= MAX_PAGE:
            raise ConfigurationError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if offset < 0:
            raise ConfigurationError(f"offset must be 0 or more, not {offset}")
        after = None
        if cursor is not None:
            if offset:
                raise ConfigurationError("page with a cursor or an offset, not both")
            after = decode_cursor(cursor)
        stuck_before = self.clock() - stuck_after if stuck else None
        records = self.store.list_sagas(
            type,
            state,
            stuck_before,
            limit + 1,
            key=key,
            newest_first=newest_first,
            offset=offset,
            after=after,
            key_prefix=key_prefix,
            created_after=created_after,
            created_before=created_before,
            failed=failed,
        )
        items = records[:limit]
        has_more = len(records) > limit
        next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if has_more else None
        return Page(items, offset, limit, has_more=has_more, next_cursor=next_cursor)

    def saga(self, saga_id: str | None = None, *, type: str | None = None, key: str | None = None) -> SagaView:
        """One saga with its history: by id, or by type and business key. Raises :class:`NotFound`."""
        if saga_id is not None:
            if type is not None or key is not None:
                raise ConfigurationError("find a saga by its id, or by type and key, not both")
            record = self.store.get_saga(saga_id)
            if record is None:
                raise NotFound(f"no saga {saga_id!r}")
        else:
            if not (type and key):
                raise ConfigurationError("find a saga by its id, or by type and key (both)")
            record = self.store.find_saga(type, key)
            if record is None:
                raise NotFound(f"no {type} saga with key {key!r}")
        return SagaView(record, self.store.saga_history(record.id))

    def counts(self) -> list[StateCount]:
        """How many sagas each type has in each state."""
        return self.store.count_by_state()

    def outbox_backlog(self) -> OutboxBacklog:
        """Messages committed and not yet confirmed by the broker (a growing backlog means no worker
        relays them: is one running, and does it reach the broker?)."""
        return self.store.outbox_backlog()

    def outbox(self, saga_id: str, limit: int = 50) -> list[OutboxState]:
        """The newest ``limit`` messages a saga committed to its outbox, with whether each was sent."""
        return self.store.outbox_rows(saga_id, limit)

    def last_reasons(self, saga_ids: Sequence[str]) -> dict[str, HistoryEntry]:
        """The latest history entry of each of ``saga_ids`` (one query for a page of sagas)."""
        return self.store.last_reasons(saga_ids)

    def select(
        self,
        *,
        cap: int = BULK_CAP,
        type: str | None = None,
        state: str | None = None,
        key: str | None = None,
        key_prefix: str | None = None,
        stuck: bool = False,
        stuck_after: float = 60.0,
        failed: bool = False,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> Selection[SagaRecord]:
        """The sagas a filter (as :meth:`sagas`) matches, oldest first, up to ``cap``: what a bulk action
        would touch. Reads ``cap + 1`` rows at most."""
        if not 1 <= cap <= MAX_PAGE:
            raise ConfigurationError(f"cap must be between 1 and {MAX_PAGE}, not {cap}")
        records = self.store.list_sagas(
            type,
            state,
            self.clock() - stuck_after if stuck else None,
            cap + 1,
            key=key,
            key_prefix=key_prefix,
            created_after=created_after,
            created_before=created_before,
            failed=failed,
        )
        return Selection(records[:cap], cap, len(records) > cap)

    def bulk(self, action: str, saga_ids: Iterable[str], *, actor: str) -> BulkResult:
        """Retry or compensate (``action``) each saga of ``saga_ids`` in turn, as :meth:`retry` and
        :meth:`compensate` do (each recorded in the saga's history); a saga that is not there or refuses
        is listed with why, and the others go on."""
        if action not in SAGA_ACTIONS:
            raise ConfigurationError(f"no bulk action {action!r}: use one of {', '.join(SAGA_ACTIONS)}")
        done: list[ActionResult] = []
        refused: dict[str, str] = {}
        for saga_id in dict.fromkeys(saga_ids):
            try:
                done.append(self._act(action, saga_id, actor))
            except (ActionRefused, NotFound) as exc:
                refused[saga_id] = str(exc)
        log.info("operator.bulk", action=action, actor=actor, done=len(done), refused=len(refused))
        return BulkResult(action, actor, done, refused)

    def overview(
        self,
        now: float | None = None,
        stuck_after: float = 60.0,
        *,
        stuck_limit: int = 20,
        failed_limit: int = 1000,
        dead_letter_limit: int = 1000,
    ) -> Overview:
        """What is stuck, failing or piling up, as of ``now`` (default: this object's clock).

        Each part is one query on an index: the counts by type and state, the ``stuck_limit`` oldest
        stuck sagas (see :meth:`sagas`), the reasons of the ``failed_limit`` latest sagas parked in
        ``failed`` (grouped by their first line), the outbox backlog and the deadlines due in the next
        minute; with a bus, the first ``dead_letter_limit`` dead letters grouped by queue and error type."""
        as_of = self.clock() if now is None else now
        counts = self.store.count_by_state()
        stuck_records = self.store.list_sagas(stuck_before=as_of - stuck_after, limit=stuck_limit + 1)
        stuck = [
            StuckSaga(
                r.id,
                r.type,
                r.key,
                r.state,
                r.created_at,
                r.updated_at,
                r.deadline,
                None if r.deadline is None else as_of - r.deadline,
                r.attempts,
            )
            for r in stuck_records[:stuck_limit]
        ]
        failed = self.store.list_sagas(failed=True, newest_first=True, limit=failed_limit)
        groups: dict[tuple[str, str], list[SagaRecord]] = {}
        for r in failed:
            groups.setdefault((r.type, first_line(str(r.meta.get("reason") or ""))), []).append(r)
        failures = [
            FailureGroup(
                saga_type,
                reason,
                len(records),
                _same(str(r.meta.get("failed_from") or "") for r in records),
                max(r.updated_at for r in records),
                records[0].id,
            )
            for (saga_type, reason), records in groups.items()
        ]
        failures.sort(key=lambda g: (-g.count, g.type, g.reason))
        backlog = self.store.outbox_backlog()
        letters, problem = None, None
        if self.bus is not None:
            try:
                letters = _group_dead_letters(self.bus.dead_letters(dead_letter_limit))
            except (TransportError, SagasError) as exc:
                problem = str(exc)
        return Overview(
            as_of=as_of,
            stuck_after=stuck_after,
            counts=counts,
            stuck=stuck,
            stuck_more=len(stuck_records) > stuck_limit,
            failures=failures,
            failed_total=sum(c.count for c in counts if c.state == FAILED),
            failed_read=len(failed),
            outbox=backlog,
            outbox_oldest_age=None if backlog.oldest_created_at is None else as_of - backlog.oldest_created_at,
            deadlines_next_minute=self.store.count_deadlines(as_of, as_of + 60.0),
            deadlines_passed=self.store.count_deadlines(0.0, as_of),
            dead_letters=letters,
            dead_letters_problem=problem,
        )

    # -- acting on sagas -----------------------------------------------------------------------------

    def retry(self, saga_id: str, *, actor: str) -> ActionResult:
        """Send a waiting saga's request again now with fresh attempts, or take a saga parked in
        ``failed`` back to the state it failed in and start that state again."""
        return self._act("retry", saga_id, actor)

    def compensate(self, saga_id: str, *, actor: str) -> ActionResult:
        """Start compensating a saga now, where its type declares how from its current state."""
        return self._act("compensate", saga_id, actor)

    def _act(self, action: str, saga_id: str, actor: str) -> ActionResult:
        if not actor or not actor.strip():
            raise ConfigurationError("say who acts: actor='name' (it is kept in the saga's history)")
        if self._engine is None:
            raise ConfigurationError(
                f"to {action} a saga, give Operations the app's saga types: Operations(store, sagas=app.sagas)"
            )
        before = self.store.get_saga(saga_id)
        if before is None:
            raise NotFound(f"no saga {saga_id!r}")
        try:
            if action == "retry":
                rows = self._engine.retry(saga_id, actor=actor)
            else:
                rows = self._engine.compensate(saga_id, actor=actor)
        except VersionConflict:
            raise ActionRefused(
                f"saga {saga_id} changed while the {action} was being applied (a worker moved it): "
                "look at it again, then repeat the action if it still applies"
            ) from None
        after = self.store.get_saga(saga_id)
        to_state = after.state if after is not None else "?"
        log.info(
            "operator.action", action=action, actor=actor, saga_id=saga_id, from_state=before.state, to_state=to_state
        )
        published, problem = self._publish(rows)
        return ActionResult(
            saga_id,
            action,
            actor,
            before.state,
            to_state,
            published=published,
            pending=len(rows) - len(published),
            problem=problem,
        )

    def _publish(self, rows: list[OutboxRow]) -> tuple[list[tuple[str, str]], str | None]:
        """Publish what an action committed, if there is a bus; the relay sends whatever is left."""
        if not rows or self.bus is None:
            return [], None
        try:
            OutboxPublisher(self.bus, self.store, self._engine).publish(rows)
        except (TransportError, SagasError) as exc:
            return [], str(exc)
        return [(r.routing_key, r.message_id) for r in rows], None

    # -- dead letters --------------------------------------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first, with their queue, reason and error."""
        return self._need_bus("list dead letters").dead_letters(limit)

    def dead_letter(self, letter_id: str) -> DeadLetter:
        """One dead letter by its id. Raises :class:`NotFound`."""
        for letter in self._need_bus("show a dead letter").dead_letters(1_000_000):
            if letter.id == letter_id:
                return letter
        raise NotFound(f"no dead letter {letter_id!r}")

    def select_dead(
        self, *, queue: str | None = None, kind: str | None = None, cap: int = BULK_CAP, browse: int = DEAD_BROWSE
    ) -> Selection[DeadLetter]:
        """The dead letters of ``queue`` and of error type ``kind`` (see :func:`dead_letter_kind`), oldest
        first, up to ``cap``: what a bulk replay or drop would touch. Browses up to ``browse`` letters: a
        longer queue counts as over the cap."""
        letters = self._need_bus("select dead letters").dead_letters(browse + 1)
        matching = [
            d for d in letters[:browse] if (not queue or d.queue == queue) and (not kind or dead_letter_kind(d) == kind)
        ]
        return Selection(matching[:cap], cap, len(matching) > cap or len(letters) > browse)

    def replay_dead(self, ids: Iterable[str] | None, *, actor: str) -> ReplayResult:
        """Put dead letters (``ids``, or every one with None) back on the queue they came from, with a
        fresh attempt count."""
        bus = self._need_bus("replay dead letters")
        wanted = None if ids is None else list(dict.fromkeys(ids))
        kept: dict[str, str] = {}
        replayed = bus.replay_dead(wanted, skipped=kept)
        missing = [] if wanted is None else [i for i in wanted if i not in replayed and i not in kept]
        log.info("operator.dead_letters_replayed", actor=actor, replayed=replayed, kept=sorted(kept), missing=missing)
        return ReplayResult(replayed, kept, missing)

    def drop_dead(self, ids: Iterable[str] | None, *, actor: str) -> DropResult:
        """Delete dead letters for good (``ids``, or every one with None): for messages that must never
        be handled, once their cause is understood."""
        bus = self._need_bus("drop dead letters")
        wanted = None if ids is None else list(dict.fromkeys(ids))
        dropped = bus.drop_dead(wanted)
        missing = [] if wanted is None else [i for i in wanted if i not in dropped]
        log.info("operator.dead_letters_dropped", actor=actor, dropped=dropped, missing=missing)
        return DropResult(dropped, missing)

    def _need_bus(self, what: str) -> EventBus:
        if self.bus is None:
            raise ConfigurationError(f"to {what}, give Operations a bus: Operations(store, bus=EventBus(url))")
        return self.bus


def _same(values: Iterable[str]) -> str:
    """The one value every item has, or empty when they differ."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else ""


def _group_dead_letters(letters: Sequence[DeadLetter]) -> list[DeadLetterGroup]:
    groups: dict[tuple[str, str], list[DeadLetter]] = {}
    for d in letters:
        groups.setdefault((d.queue, dead_letter_kind(d)), []).append(d)
    out = [
        DeadLetterGroup(
            queue,
            error_type,
            len(ds),
            min(d.dead_at for d in ds),
            first_line(ds[0].error_message or ds[0].reason),
        )
        for (queue, error_type), ds in groups.items()
    ]
    out.sort(key=lambda g: (-g.count, g.queue, g.error_type))
    return out


__all__ = [
    "ActionRefused",
    "ActionResult",
    "BulkResult",
    "DeadLetterGroup",
    "DropResult",
    "FailureGroup",
    "InvalidCursor",
    "NotFound",
    "Operations",
    "Overview",
    "Page",
    "ReplayResult",
    "SagaView",
    "Selection",
    "StuckSaga",
    "dead_letter_kind",
    "decode_cursor",
    "encode_cursor",
    "first_line",
]
