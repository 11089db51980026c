"""Stores: memory (tests), SQLite (the default, one machine) and PostgreSQL (several machines).

A store keeps the inbox (handled message ids), the participants' reply cache, the sagas with their
history, and the outbox. A saga's new state, its history entry, the inbox record of the message that
caused it and the messages it sends are written in one transaction. Concurrency is optimistic: an
update names the version it read, and fails with :class:`VersionConflict` if another worker got there
first. Every store is used from one thread, the worker's I/O thread. All SQL takes values as
parameters. The schema is created, and upgraded, when a store opens (``schema_version`` table).

On PostgreSQL a group runs in psycopg's pipeline mode: its writes are sent without waiting, and what
waits is a read, a row count (``save_saga``'s conflict check) and the commit, each one round trip.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from ._errors import ConfigurationError, StoreError
from ._types import InboxStore

DEFAULT_STORE_URL = "sqlite:///sagas.db"
#: the state a saga is parked in when it failed (``sagas.FAILED``)
FAILED_STATE = "failed"
SCHEMA_VERSION = 9
#: the condition (on ``sagas``) of an ended saga a prune may delete: not parked, no late compensation
#: pending (a deadline), no unsent outbox row, ended before the cutoff (parameters: ``_ended_params``)
_ENDED = (
    "final = 1 AND state <> ? AND deadline IS NULL AND updated_at < ?"
    " AND NOT EXISTS (SELECT 1 FROM outbox u WHERE u.saga_id = sagas.id AND u.sent_at IS NULL)"
)
#: the request type a saga waits on, from its metadata's JSON text, in SQLite and in PostgreSQL
_AWAITS_SQLITE = "json_extract(meta, '$.request.type')"
_AWAITS_POSTGRES = "(meta::jsonb #>> '{request,type}')"
#: the tables whose rows retention bounds (``row_counts``)
RETAINED_TABLES = ("sagas", "saga_history", "outbox", "inbox", "reply_cache")


#: an id of a statement's ``IN (...)`` list: a message, saga or outbox row id
_Id = TypeVar("_Id", str, int)


def _grouped(pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Pairs ``(consumer, message_id)`` (or ``(saga type, key)``) as the seconds of each first, in
    chunks of at most ``_ID_CHUNK``: one ``first = ? AND second IN (...)`` statement each."""
    ids: dict[str, list[str]] = {}
    for consumer, message_id in dict.fromkeys(pairs):
        ids.setdefault(consumer, []).append(message_id)
    for consumer, wanted in ids.items():
        for chunk in _chunked(wanted):
            yield consumer, chunk


def _chunked(ids: Sequence[_Id]) -> Iterator[list[_Id]]:
    """``ids`` without repeats, in chunks of at most ``_ID_CHUNK``: one ``IN (...)`` statement each."""
    wanted = list(dict.fromkeys(ids))
    for start in range(0, len(wanted), _ID_CHUNK):
        yield wanted[start : start + _ID_CHUNK]


#: claims written by one statement of :meth:`_SqlStore.claim_many` (4 parameters each)
_CLAIM_CHUNK = 200
#: the most ids (or keys of one type) one ``IN (...)`` statement reads or updates: ``get_sagas``,
#: ``find_sagas``, ``answers``, ``last_reasons``, ``mark_sent`` (SQLite allows 32,766 parameters)
_ID_CHUNK = 500


class VersionConflict(StoreError):
    """The saga changed since it was read (another worker handled a message for it). Retry."""


class DuplicateSaga(StoreError):
    """A saga of this type with this key exists already (a duplicate start event)."""


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (in code point order,
    which is also the byte order of UTF-8), or None when there is none (an empty prefix, or one of only
    U+10FFFF). ``prefix <= s < bound`` holds exactly for the strings ``s`` that start with ``prefix``:
    an index range scan, with no LIKE pattern to escape."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code <= 0x10FFFF:
            if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored: the next code point is U+E000
                code = 0xE000
            return "".join(chars) + chr(code)
    return None


@dataclass(slots=True)
class SagaRecord:
    """One saga instance as stored. ``state`` is the state's name, never an ordinal."""

    id: str
    type: str
    key: str
    state: str
    data: dict[str, Any]
    version: int = 0
    deadline: float | None = None
    attempts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    final: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    #: the fingerprint of the saga type's definition it was created or last moved or migrated under
    #: (None: unknown, a saga from before schema 8); see :mod:`sagas._versions`
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "key": self.key,
            "state": self.state,
            "final": self.final,
            "data": self.data,
            "version": self.version,
            "deadline": self.deadline,
            "attempts": self.attempts,
            "meta": self.meta,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One transition of a saga: when, what caused it (a message id, a deadline or an operator
    action), the move, why, and who (``actor``: empty for the framework, a name for an operator)."""

    at: float
    message_id: str
    from_state: str
    to_state: str
    reason: str
    actor: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "message_id": self.message_id,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
            "actor": self.actor,
        }


@dataclass(frozen=True, slots=True)
class StateCount:
    """How many sagas of ``type`` are in ``state``."""

    type: str
    state: str
    final: bool
    count: int


@dataclass(frozen=True, slots=True)
class LiveGroup:
    """How many live (not final) sagas of ``type`` are in ``state``, under the definition ``fingerprint``
    (None: unknown), waiting for a reply to ``awaits`` (a request type; None: none)."""

    type: str
    state: str
    fingerprint: str | None
    awaits: str | None
    count: int


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """Messages committed to the outbox and not yet confirmed by the broker, and the oldest one's age."""

    unsent: int
    oldest_created_at: float | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message a saga committed to send. ``sent`` once the broker confirmed it."""

    id: int
    saga_id: str
    message_id: str
    routing_key: str
    body: str
    mandatory: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class OutboxState:
    """An outbox row as an operator sees it: the message and when the broker confirmed it (None: pending)."""

    row: OutboxRow
    sent_at: float | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to put in the outbox with a saga's state change."""

    message_id: str
    routing_key: str
    body: str
    mandatory: bool


#: The tables a prune deletes from, in the order :class:`sagas.Pruner` prunes them.
PRUNED_TABLES = ("sagas", "saga_history", "outbox", "inbox", "reply_cache", "claims")


@dataclass(frozen=True, slots=True)
class PruneCutoffs:
    """What a prune may delete: rows older than these times (seconds since the epoch), see
    :class:`sagas.Retention`. ``finished`` is the cutoff of ended sagas (and their history and outbox
    rows), ``finished_by_type`` overrides it per saga type; the others are the cutoffs of inbox records
    (``handled_at``), sent outbox rows (``sent_at``), cached replies (``cached_at``) and claims
    (``expires_at``: a claim that expired before it; by default none goes).

    An ended saga goes only when it is final, not parked in ``failed`` (it waits for an operator), has
    no deadline (no compensation of a late success in flight) and no unsent outbox row."""

    finished: float
    inbox: float
    outbox_sent: float
    replies: float
    finished_by_type: Mapping[str, float] = field(default_factory=dict)
    claims: float = float("-inf")

    def finished_for(self, saga_type: str) -> float:
        return self.finished_by_type.get(saga_type, self.finished)


@dataclass(frozen=True, slots=True)
class QueueRecord:
    """A durable queue an app declares on its exchange, as the queue registry keeps it (schema 9).

    ``consumer`` says what consumes it (``handler <service>.<name>`` or ``saga <type>``), ``app`` names
    the app whose workers declared it (see :func:`sagas._queues.app_name`), ``patterns`` are its bindings
    and ``delay_queues`` its retry delay queues; ``declared_at`` is when a worker of that app last
    declared it."""

    exchange: str
    queue: str
    app: str
    consumer: str
    patterns: tuple[str, ...] = ()
    delay_queues: tuple[str, ...] = ()
    declared_at: float = 0.0


@runtime_checkable
class QueueRegistry(Protocol):
    """The store's record of the durable queues each app declared on each exchange (schema 9). AMQP
    cannot list the queues bound to an exchange, so the apps keep their own topology here; see
    :mod:`sagas._queues` for what reads it."""

    def register_queues(self, records: Sequence[QueueRecord]) -> None:
        """Insert or refresh (``consumer``, ``patterns``, ``delay_queues``, ``declared_at``) each record,
        keyed by (exchange, queue, app), in one transaction."""
        ...

    def registered_queues(self, exchange: str) -> list[QueueRecord]:
        """Every record of ``exchange``, by queue, then app."""
        ...

    def forget_queue(self, exchange: str, queue: str, app: str) -> None:
        """Drop the record of ``queue`` declared by ``app`` (nothing if there is none)."""
        ...

    def registered_exchanges(self) -> list[str]:
        """The exchanges the registry holds records of, sorted."""
        ...


@runtime_checkable
class Store(InboxStore, Protocol):
    """Everything a worker needs from a store: the inbox, the reply cache, sagas and the outbox."""

    def cached_reply(self, consumer: str, request_id: str) -> str | None: ...
    def cache_reply(self, consumer: str, request_id: str, body: str) -> None: ...
    def claim(self, consumer: str, message_id: str, owner: str, until: float, now: float) -> bool:
        """Claim ``message_id`` for ``consumer`` on behalf of ``owner`` (a worker's instance) until the
        time ``until``: true if it was free, expired at ``now``, or held by ``owner`` already. Committed
        at once (outside a group), so other workers see it."""
        ...

    def claim_many(
        self, claims: Sequence[tuple[str, str]], owner: str, until: float, now: float
    ) -> set[tuple[str, str]]:
        """:meth:`claim` each ``(consumer, message_id)`` of ``claims`` (no pair twice) in one write,
        committed at once: the pairs claimed. Taken in a fixed order, so that workers claiming
        overlapping batches never wait on each other in a cycle."""
        ...

    def answers(
        self, inbox: Sequence[tuple[str, str]], replies: Sequence[tuple[str, str]]
    ) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
        """For many messages at once: which ``(consumer, message_id)`` of ``inbox`` are in the inbox
        (:meth:`seen`), and the cached reply of each ``(consumer, request_id)`` of ``replies`` that has
        one (:meth:`cached_reply`)."""
        ...

    def renew_claims(self, owner: str, until: float) -> None:
        """Extend every claim ``owner`` holds to ``until``."""
        ...

    def claimed(self, message_id: str, now: float) -> bool:
        """Whether a live claim (not expired at ``now``) on ``message_id`` exists, by any consumer: a
        saga asks whether its request is being handled."""
        ...

    def release(self, consumer: str, message_id: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``message_id`` (inside a group: with the inbox record or cached
        reply written there)."""
        ...

    def save_saga(
        self,
        record: SagaRecord,
        *,
        expected_version: int | None,
        history: HistoryEntry,
        inbox: tuple[str, str] | None,
        outbox: Sequence[Outgoing],
    ) -> list[OutboxRow]: ...
    def get_saga(self, saga_id: str) -> SagaRecord | None: ...
    def find_saga(self, saga_type: str, key: str) -> SagaRecord | None: ...
    def get_sagas(self, saga_ids: Sequence[str]) -> dict[str, SagaRecord]:
        """The sagas of ``saga_ids`` that exist, by id: one statement per 500 ids."""
        ...

    def find_sagas(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SagaRecord]:
        """The sagas of ``keys`` (pairs of saga type and business key) that exist, by (type, key): one
        statement per type and 500 keys, which the (type, key) unique index serves. For a reader that
        watches many sagas at once (:class:`sagas.aio.SagasClient`)."""
        ...

    def due_sagas(self, now: float, limit: int, types: Sequence[str] | None = None) -> list[SagaRecord]: ...
    def list_sagas(
        self,
        saga_type: str | None = None,
        state: str | None = None,
        stuck_before: float | None = None,
        limit: int = 1000,
        *,
        key: str | None = None,
        newest_first: bool = False,
        offset: int = 0,
        after: tuple[float, str] | None = None,
        key_prefix: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        failed: bool = False,
    ) -> list[SagaRecord]:
        """Sagas by creation time, then id (oldest first, or newest), filtered by type, state, key
        (exact, or ``key_prefix``), ``stuck_before`` (not final, and the deadline missing or at most that
        time), ``failed`` (parked in the state ``failed``) and creation time (``created_after`` <=
        created_at < ``created_before``); a page of ``limit`` after skipping ``offset``.

        ``after`` is a keyset cursor, the (created_at, id) of the last row of the previous page: the page
        starts past it in the listing's order (for newest first, the rows before it). Unlike ``offset``,
        it costs no more on the last page of a million than on the first."""
        ...

    def saga_history(self, saga_id: str) -> list[HistoryEntry]: ...
    def last_reasons(self, saga_ids: Sequence[str]) -> dict[str, HistoryEntry]:
        """The latest history entry of each saga of ``saga_ids`` that has one (for a listing's "last
        reason" column): one lookup on the history's primary key per saga, in one statement per 500 ids."""
        ...

    def outbox_rows(self, saga_id: str, limit: int = 50) -> list[OutboxState]:
        """The newest ``limit`` outbox rows of one saga, newest first, with when each was sent (None while
        pending). Reads the outbox's index on saga_id (schema 6)."""
        ...

    def count_sagas(self, final: bool | None = None) -> int: ...
    def count_deadlines(self, after: float, until: float) -> int:
        """How many sagas have a deadline in ``after < deadline <= until`` (due soon)."""
        ...

    def count_by_state(self) -> list[StateCount]: ...
    def live_groups(self) -> list[LiveGroup]:
        """The live (not final) sagas, counted by type, state, definition fingerprint and the request
        type each waits on (one grouped query): what ``sagas check`` compares with an app's definitions."""
        ...

    def save_definition(self, saga_type: str, fingerprint: str, graph: str, now: float) -> None:
        """Keep the graph (JSON) of a saga type's definition under its fingerprint, once (first seen ``now``)."""
        ...

    def definition_graph(self, saga_type: str, fingerprint: str) -> str | None:
        """The graph (JSON) kept for this saga type and fingerprint, or None."""
        ...

    def outbox_backlog(self) -> OutboxBacklog: ...
    def unsent(self, created_before: float, limit: int = 500) -> list[OutboxRow]: ...
    def mark_sent(self, ids: Sequence[int]) -> None: ...
    def group(self) -> AbstractContextManager[None]:
        """Group the writes made inside into one transaction, committed at the end (group commit).
        Groups nest: an inner group that raises undoes its own writes only."""
        ...


@runtime_checkable
class PrunableStore(Protocol):
    """A store whose old rows can be pruned (every store of this module; see :mod:`sagas._retention`)."""

    def prune_counts(self, cutoffs: PruneCutoffs) -> dict[str, int]:
        """How many rows of each table of :data:`PRUNED_TABLES` a prune with ``cutoffs`` would delete now."""
        ...

    def prune(self, table: str, cutoffs: PruneCutoffs, limit: int) -> dict[str, int]:
        """Delete one batch, in one short transaction: the oldest ``limit`` rows of ``table`` ("sagas",
        "outbox", "inbox", "reply_cache" or "claims") past their cutoff; for "sagas", with their history
        and outbox rows. Returns the rows deleted per table; fewer than ``limit`` (in ``table``) means it is done."""
        ...


class MemoryStore:
    """Keeps everything in this process; lost when it exits. For tests and demos."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        #: the clock of the inbox's, reply cache's and outbox's timestamps (a harness sets its own)
        self.clock = clock
        #: (consumer, message id) -> handled at
        self._inbox: dict[tuple[str, str], float] = {}
        #: (consumer, request id) -> (body, cached at)
        self._replies: dict[tuple[str, str], tuple[str, float]] = {}
        #: (consumer, message id) -> (owner, expires at)
        self._claims: dict[tuple[str, str], tuple[str, float]] = {}
        #: saga id -> its record's columns (data and meta left empty) and the JSON text of (data, meta):
        #: a read builds a new record from them, as from a database row
        self._sagas: dict[str, SagaRecord] = {}
        self._documents: dict[str, str] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._history: dict[str, list[HistoryEntry]] = {}
        self._outbox: dict[int, tuple[OutboxRow, float | None]] = {}
        self._next_row = 1
        #: (saga type, fingerprint) -> (graph JSON, first seen)
        self._definitions: dict[tuple[str, str], tuple[str, float]] = {}
        #: the queue registry: (exchange, queue, app) -> record
        self._queues: dict[tuple[str, str, str], QueueRecord] = {}
        # Reads take the lock too: a save writes several maps, and a reader on another thread (a test,
        # the console) must see all of a save or none of it.
        self._lock = threading.Lock()

    def seen(self, consumer: str, message_id: str) -> bool:
        return (consumer, message_id) in self._inbox

    def remember(self, consumer: str, message_id: str) -> None:
        self._inbox.setdefault((consumer, message_id), self.clock())

    def cached_reply(self, consumer: str, request_id: str) -> str | None:
        cached = self._replies.get((consumer, request_id))
        return None if cached is None else cached[0]

    def cache_reply(self, consumer: str, request_id: str, body: str) -> None:
        self._replies.setdefault((consumer, request_id), (body, self.clock()))

    def claim(self, consumer: str, message_id: str, owner: str, until: float, now: float) -> bool:
        return (consumer, message_id) in self.claim_many([(consumer, message_id)], owner, until, now)

    def claim_many(
        self, claims: Sequence[tuple[str, str]], owner: str, until: float, now: float
    ) -> set[tuple[str, str]]:
        won: set[tuple[str, str]] = set()
        with self._lock:
            for key in sorted(claims):
                held = self._claims.get(key)
                if held is None or held[0] == owner or held[1] < now:
                    self._claims[key] = (owner, until)
                    won.add(key)
        return won

    def answers(
        self, inbox: Sequence[tuple[str, str]], replies: Sequence[tuple[str, str]]
    ) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
        cached = {key: self._replies[key][0] for key in replies if key in self._replies}
        return {key for key in inbox if key in self._inbox}, cached

    def claimed(self, message_id: str, now: float) -> bool:
        return any(m == message_id and until >= now for (_, m), (_, until) in list(self._claims.items()))

    def renew_claims(self, owner: str, until: float) -> None:
        with self._lock:
            for key, (holder, _) in self._claims.items():
                if holder == owner:
                    self._claims[key] = (owner, until)

    def release(self, consumer: str, message_id: str, owner: str) -> None:
        with self._lock:
            held = self._claims.get((consumer, message_id))
            if held is not None and held[0] == owner:
                del self._claims[(consumer, message_id)]

    def save_saga(
        self,
        record: SagaRecord,
        *,
        expected_version: int | None,
        history: HistoryEntry,
        inbox: tuple[str, str] | None,
        outbox: Sequence[Outgoing],
    ) -> list[OutboxRow]:
        with self._lock:
            if expected_version is None:
                if (record.type, record.key) in self._keys or record.id in self._sagas:
                    raise DuplicateSaga(f"saga {record.type}/{record.key} exists")
                self._keys[(record.type, record.key)] = record.id
            else:
                current = self._sagas.get(record.id)
                if current is None or current.version != expected_version:
                    raise VersionConflict(f"saga {record.id} is not at version {expected_version}")
            r = record
            self._sagas[r.id] = SagaRecord(
                r.id,
                r.type,
                r.key,
                r.state,
                {},
                r.version,
                r.deadline,
                r.attempts,
                {},
                r.final,
                r.created_at,
                r.updated_at,
                r.fingerprint,
            )
            self._documents[r.id] = json.dumps((r.data, r.meta))
            self._history.setdefault(record.id, []).append(history)
            if inbox is not None:
                self._inbox.setdefault(inbox, self.clock())
            rows = []
            for out in outbox:
                row = OutboxRow(
                    self._next_row, record.id, out.message_id, out.routing_key, out.body, out.mandatory, history.at
                )
                self._outbox[row.id] = (row, None)
                self._next_row += 1
                rows.append(row)
            return rows

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        with self._lock:
            r = self._sagas.get(saga_id)
            return None if r is None else self._read(r)

    def find_saga(self, saga_type: str, key: str) -> SagaRecord | None:
        with self._lock:
            saga_id = self._keys.get((saga_type, key))
        return None if saga_id is None else self.get_saga(saga_id)

    def get_sagas(self, saga_ids: Sequence[str]) -> dict[str, SagaRecord]:
        with self._lock:
            return {i: self._read(self._sagas[i]) for i in dict.fromkeys(saga_ids) if i in self._sagas}

    def find_sagas(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SagaRecord]:
        with self._lock:
            found = ((k, self._keys.get(k)) for k in dict.fromkeys(keys))
            return {k: self._read(self._sagas[i]) for k, i in found if i is not None}

    def due_sagas(self, now: float, limit: int, types: Sequence[str] | None = None) -> list[SagaRecord]:
        with self._lock:
            due = sorted(
                (
                    r
                    for r in self._sagas.values()
                    if r.deadline is not None and r.deadline <= now and (types is None or r.type in types)
                ),
                key=lambda r: r.deadline or 0.0,
            )
            return [self._read(r) for r in due[:limit]]

    def list_sagas(
        self,
        saga_type: str | None = None,
        state: str | None = None,
        stuck_before: float | None = None,
        limit: int = 1000,
        *,
        key: str | None = None,
        newest_first: bool = False,
        offset: int = 0,
        after: tuple[float, str] | None = None,
        key_prefix: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        failed: bool = False,
    ) -> list[SagaRecord]:
        with self._lock:
            out = []
            ordered = sorted(self._sagas.values(), key=lambda r: (r.created_at, r.id), reverse=newest_first)
            for r in ordered:
                if (saga_type and r.type != saga_type) or (state and r.state != state) or (key and r.key != key):
                    continue
                if stuck_before is not None and (r.final or (r.deadline is not None and r.deadline > stuck_before)):
                    continue
                if (key_prefix and not r.key.startswith(key_prefix)) or (failed and r.state != FAILED_STATE):
                    continue
                if (created_after is not None and r.created_at < created_after) or (
                    created_before is not None and r.created_at >= created_before
                ):
                    continue
                if after is not None and (
                    (r.created_at, r.id) >= after if newest_first else (r.created_at, r.id) <= after
                ):
                    continue
                out.append(r)
            return [self._read(r) for r in out[offset : offset + limit]]

    def saga_history(self, saga_id: str) -> list[HistoryEntry]:
        with self._lock:
            return list(self._history.get(saga_id, []))

    def last_reasons(self, saga_ids: Sequence[str]) -> dict[str, HistoryEntry]:
        with self._lock:
            return {i: self._history[i][-1] for i in saga_ids if self._history.get(i)}

    def outbox_rows(self, saga_id: str, limit: int = 50) -> list[OutboxState]:
        with self._lock:
            rows = [OutboxState(r, sent) for r, sent in self._outbox.values() if r.saga_id == saga_id]
            rows.sort(key=lambda o: o.row.id, reverse=True)
            return rows[:limit]

    def count_sagas(self, final: bool | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._sagas.values() if final is None or r.final == final)

    def count_deadlines(self, after: float, until: float) -> int:
        with self._lock:
            return sum(1 for r in self._sagas.values() if r.deadline is not None and after < r.deadline <= until)

    def count_by_state(self) -> list[StateCount]:
        with self._lock:
            counts = Counter((r.type, r.state, r.final) for r in self._sagas.values())
            return [StateCount(t, st, final, n) for (t, st, final), n in sorted(counts.items())]

    def outbox_backlog(self) -> OutboxBacklog:
        with self._lock:
            unsent = [row.created_at for row, sent in self._outbox.values() if sent is None]
            return OutboxBacklog(len(unsent), min(unsent, default=None))

    def unsent(self, created_before: float, limit: int = 500) -> list[OutboxRow]:
        with self._lock:
            rows = [r for r, sent in self._outbox.values() if sent is None and r.created_at <= created_before]
            return rows[:limit]

    def mark_sent(self, ids: Sequence[int]) -> None:
        with self._lock:
            now = self.clock()
            for i in ids:
                if i in self._outbox:
                    self._outbox[i] = (self._outbox[i][0], now)

    def group(self) -> AbstractContextManager[None]:
        return nullcontext()  # every write applies at once, and whole

    def register_queues(self, records: Sequence[QueueRecord]) -> None:
        with self._lock:
            for r in records:
                self._queues[(r.exchange, r.queue, r.app)] = r

    def registered_queues(self, exchange: str) -> list[QueueRecord]:
        with self._lock:
            return [r for key, r in sorted(self._queues.items()) if key[0] == exchange]

    def forget_queue(self, exchange: str, queue: str, app: str) -> None:
        with self._lock:
            self._queues.pop((exchange, queue, app), None)

    def registered_exchanges(self) -> list[str]:
        with self._lock:
            return sorted({key[0] for key in self._queues})

    def _read(self, r: SagaRecord) -> SagaRecord:
        data, meta = json.loads(self._documents[r.id])
        return SagaRecord(
            r.id,
            r.type,
            r.key,
            r.state,
            data,
            r.version,
            r.deadline,
            r.attempts,
            meta,
            r.final,
            r.created_at,
            r.updated_at,
            r.fingerprint,
        )

    def live_groups(self) -> list[LiveGroup]:
        with self._lock:
            counts: Counter[tuple[str, str, str | None, str | None]] = Counter()
            for r in self._sagas.values():
                if not r.final:
                    request = json.loads(self._documents[r.id])[1].get("request") or {}
                    counts[(r.type, r.state, r.fingerprint, request.get("type"))] += 1
            return [LiveGroup(*group, n) for group, n in sorted(counts.items(), key=lambda g: str(g[0]))]

    def save_definition(self, saga_type: str, fingerprint: str, graph: str, now: float) -> None:
        with self._lock:
            self._definitions.setdefault((saga_type, fingerprint), (graph, now))

    def definition_graph(self, saga_type: str, fingerprint: str) -> str | None:
        with self._lock:
            found = self._definitions.get((saga_type, fingerprint))
            return None if found is None else found[0]

    def close(self) -> None:
        pass

    # retention

    def _prunable_sagas(self, cutoffs: PruneCutoffs) -> list[SagaRecord]:
        unsent = {row.saga_id for row, sent in self._outbox.values() if sent is None}
        found = [
            r
            for r in self._sagas.values()
            if r.final
            and r.state != FAILED_STATE
            and r.deadline is None
            and r.updated_at < cutoffs.finished_for(r.type)
            and r.id not in unsent
        ]
        return sorted(found, key=lambda r: (r.updated_at, r.id))

    def prune_counts(self, cutoffs: PruneCutoffs) -> dict[str, int]:
        with self._lock:
            sagas = {r.id for r in self._prunable_sagas(cutoffs)}
            return {
                "sagas": len(sagas),
                "saga_history": sum(len(self._history.get(i, ())) for i in sagas),
                "outbox": sum(
                    1
                    for row, sent in self._outbox.values()
                    if sent is not None and (sent < cutoffs.outbox_sent or row.saga_id in sagas)
                ),
                "inbox": sum(1 for at in list(self._inbox.values()) if at < cutoffs.inbox),
                "reply_cache": sum(1 for _, at in list(self._replies.values()) if at < cutoffs.replies),
                "claims": sum(1 for _, until in self._claims.values() if until < cutoffs.claims),
            }

    def prune(self, table: str, cutoffs: PruneCutoffs, limit: int) -> dict[str, int]:
        with self._lock:
            if table == "sagas":
                gone = self._prunable_sagas(cutoffs)[:limit]
                ids = {r.id for r in gone}
                history = 0
                for r in gone:
                    del self._sagas[r.id], self._documents[r.id], self._keys[(r.type, r.key)]
                    history += len(self._history.pop(r.id, ()))
                rows = [i for i, (row, sent) in self._outbox.items() if sent is not None and row.saga_id in ids]
                for i in rows:
                    del self._outbox[i]
                return {"sagas": len(gone), "saga_history": history, "outbox": len(rows)}
            if table == "outbox":
                old = sorted((sent, i) for i, (_, sent) in self._outbox.items() if sent is not None)
                rows = [i for sent, i in old if sent < cutoffs.outbox_sent][:limit]
                for i in rows:
                    del self._outbox[i]
                return {"outbox": len(rows)}
            if table in ("inbox", "reply_cache"):
                # (the hot path adds to these maps without the lock: copy them first)
                if table == "inbox":
                    aged = sorted((at, k) for k, at in list(self._inbox.items()) if at < cutoffs.inbox)
                    for _, k in aged[:limit]:
                        self._inbox.pop(k, None)
                else:
                    aged = sorted((at, k) for k, (_, at) in list(self._replies.items()) if at < cutoffs.replies)
                    for _, k in aged[:limit]:
                        self._replies.pop(k, None)
                return {table: len(aged[:limit])}
            if table == "claims":
                expired = sorted((until, k) for k, (_, until) in self._claims.items() if until < cutoffs.claims)
                for _, k in expired[:limit]:
                    del self._claims[k]
                return {"claims": len(expired[:limit])}
            raise ConfigurationError(f"cannot prune {table!r}: prune sagas, outbox, inbox, reply_cache or claims")


# -- SQL stores ------------------------------------------------------------------------------------

_SAGA_COLUMNS = (
    "id, type, key, state, data, version, deadline, attempts, meta, final, created_at, updated_at, fingerprint"
)


def _record(row: Sequence[Any]) -> SagaRecord:
    return SagaRecord(
        id=row[0],
        type=row[1],
        key=row[2],
        state=row[3],
        data=json.loads(row[4]),
        version=int(row[5]),
        deadline=row[6],
        attempts=int(row[7]),
        meta=json.loads(row[8]),
        final=bool(row[9]),
        created_at=float(row[10]),
        updated_at=float(row[11]),
        fingerprint=row[12],
    )


#: Marks where a key compares in code point order (key prefix ranges, and the index that serves them): a
#: comment to SQLite, whose default collation is that order already; PostgreSQL's _sql puts COLLATE "C" there.
_C_MARK = "/*C*/"
_KEY_C = f"key {_C_MARK}"


class _SqlStore:
    """The SQL shared by SQLite and PostgreSQL. Statements use ``?``; PostgreSQL swaps in ``%s``."""

    _db: Any
    #: how many transactions are open on the connection: the outer one, then savepoints (nested groups)
    _depth = 0
    #: the clock of the inbox's, reply cache's and outbox's timestamps (a harness sets its own)
    clock: Callable[[], float] = staticmethod(time.time)

    #: whether a statement's row count is checked after the statements that follow it were sent
    #: (PostgreSQL in pipeline mode); then :meth:`save_saga` undoes its writes on a conflict
    _checks_after_writes = False

    def _sql(self, statement: str) -> str:
        return statement

    def _flush(self) -> None:
        """Wait for the results of every statement sent so far (PostgreSQL in a pipeline; elsewhere
        each statement has its result when it returns)."""

    def _count(self, cur: Any) -> int:
        """The number of rows the statement of ``cur`` changed (waiting for it first)."""
        self._flush()
        return int(cur.rowcount)

    def group(self) -> AbstractContextManager[None]:
        """One transaction for every write inside (see :meth:`Store.group`)."""
        return self._transaction()

    def _execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(self._sql(statement), params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        raise NotImplementedError

    def _atomic(self) -> AbstractContextManager[None]:
        """The writes of one store call: a transaction of their own or, inside a group, part of the
        group's. There they take no savepoint: a call raises before it writes (a duplicate, a version
        conflict), or it raises out of the group, or out of the inner group its caller opened, which
        undoes what it wrote. (On PostgreSQL, :meth:`save_saga` sends its writes before it knows of a
        conflict, and takes a savepoint of its own, sent with them.)"""
        return nullcontext() if self._depth else self._transaction()

    def _create_schema(self, serial: str, real: str) -> None:
        statements = [
            "CREATE TABLE IF NOT EXISTS inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
            f" handled_at {real} NOT NULL, PRIMARY KEY (consumer, message_id))",
            "CREATE TABLE IF NOT EXISTS reply_cache (consumer TEXT NOT NULL, request_id TEXT NOT NULL,"
            f" body TEXT NOT NULL, cached_at {real} NOT NULL, PRIMARY KEY (consumer, request_id))",
            # A worker's claim on a de-duplicated message while its handler runs (released when it settles).
            "CREATE TABLE IF NOT EXISTS claims (consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
            f" owner TEXT NOT NULL, expires_at {real} NOT NULL, PRIMARY KEY (consumer, message_id))",
            "CREATE INDEX IF NOT EXISTS claims_by_owner ON claims (owner)",
            "CREATE INDEX IF NOT EXISTS claims_by_message ON claims (message_id)",
            "CREATE TABLE IF NOT EXISTS sagas (id TEXT PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL,"
            " state TEXT NOT NULL, data TEXT NOT NULL, version INTEGER NOT NULL,"
            f" deadline {real}, attempts INTEGER NOT NULL, meta TEXT NOT NULL, final INTEGER NOT NULL,"
            f" created_at {real} NOT NULL, updated_at {real} NOT NULL, fingerprint TEXT, UNIQUE (type, key))",
            # Finding the due sagas of an engine's types reads this partial index only: O(due), not O(all).
            # (An index on the deadline alone lost to the (type, state) index, which reads every saga of the type.)
            "CREATE INDEX IF NOT EXISTS sagas_due_by_type ON sagas (type, deadline) WHERE deadline IS NOT NULL",
            # Listings in creation order, each filter an index range scan (keyset paging on (created_at, id)).
            "CREATE INDEX IF NOT EXISTS sagas_by_created ON sagas (created_at, id)",
            "CREATE INDEX IF NOT EXISTS sagas_by_type_created ON sagas (type, created_at, id)",
            "CREATE INDEX IF NOT EXISTS sagas_by_type_state ON sagas (type, state, created_at, id)",
            "CREATE INDEX IF NOT EXISTS sagas_by_state_created ON sagas (state, created_at, id)",
            f"CREATE INDEX IF NOT EXISTS sagas_by_key ON sagas ({_KEY_C}, created_at, id)",
            # the sagas that have not ended, oldest first (stuck sagas; usually few among many ended ones)
            "CREATE INDEX IF NOT EXISTS sagas_open_by_created ON sagas (created_at, id) WHERE final = 0",
            "CREATE TABLE IF NOT EXISTS saga_history (saga_id TEXT NOT NULL, seq INTEGER NOT NULL,"
            f" at {real} NOT NULL, message_id TEXT NOT NULL, from_state TEXT NOT NULL,"
            " to_state TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL DEFAULT '',"
            " PRIMARY KEY (saga_id, seq))",
            f"CREATE TABLE IF NOT EXISTS outbox (id {serial}, saga_id TEXT NOT NULL,"
            " message_id TEXT NOT NULL, routing_key TEXT NOT NULL, body TEXT NOT NULL,"
            f" mandatory INTEGER NOT NULL, created_at {real} NOT NULL, sent_at {real})",
            "CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (created_at) WHERE sent_at IS NULL",
            # a saga's messages on its page (schema 6)
            "CREATE INDEX IF NOT EXISTS outbox_by_saga ON outbox (saga_id, id)",
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            # Retention (schema 7): each prune batch reads the oldest rows past a cutoff off an index.
            "CREATE INDEX IF NOT EXISTS inbox_by_handled ON inbox (handled_at)",
            "CREATE INDEX IF NOT EXISTS reply_cache_by_cached ON reply_cache (cached_at)",
            "CREATE INDEX IF NOT EXISTS outbox_by_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS sagas_ended_by_updated ON sagas (updated_at) WHERE final = 1",
            # the graph of each version of each saga type's definition, by fingerprint (schema 8)
            "CREATE TABLE IF NOT EXISTS definitions (type TEXT NOT NULL, fingerprint TEXT NOT NULL,"
            f" graph TEXT NOT NULL, first_seen {real} NOT NULL, PRIMARY KEY (type, fingerprint))",
            # the queue registry (schema 9): the durable queues each app declared on each exchange
            "CREATE TABLE IF NOT EXISTS queue_registry (exchange TEXT NOT NULL, queue TEXT NOT NULL,"
            " app TEXT NOT NULL, consumer TEXT NOT NULL, patterns TEXT NOT NULL, delay_queues TEXT NOT NULL,"
            f" declared_at {real} NOT NULL, PRIMARY KEY (exchange, queue, app))",
        ]
        if self._stored_version() == SCHEMA_VERSION:
            # Nothing to create, and nothing to lock: a worker that joins running ones, or an operator tool
            # that opens the store, must not take the DDL locks (CREATE INDEX takes a table lock even when
            # the index exists) against their transactions, which lock the tables in another order.
            return
        with self._transaction():
            for statement in statements:
                self._execute(statement)
            row = self._execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store's schema is version {current}, newer than this sagas ({SCHEMA_VERSION}): upgrade sagas"
                )
            if current < SCHEMA_VERSION:
                # Upgrades from older schema versions, one step at a time (the statements above have
                # created what is new).
                if 0 < current < 2:
                    self._execute("DROP INDEX IF EXISTS sagas_due")  # replaced by sagas_due_by_type
                if 0 < current < 3:
                    self._execute("ALTER TABLE saga_history ADD COLUMN actor TEXT NOT NULL DEFAULT ''")
                # (version 4 added the claims table, created above)
                if 0 < current < 5:
                    # (version 5 added the listing indexes above; this one is a prefix of sagas_by_type_state)
                    self._execute("DROP INDEX IF EXISTS sagas_by_state")
                # (version 6 added the index outbox_by_saga, created above)
                if 0 < current < 7:
                    pass  # (version 7 added the retention indexes above: inbox_by_handled and the others)
                if 0 < current < 8:
                    # the definition each saga was created or last moved under (NULL: unknown); version 8
                    # also added the definitions table, created above
                    self._add_column("sagas", "fingerprint", "TEXT")
                # (version 9 added the table queue_registry, created above)
                self._execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _stored_version(self) -> int:
        """The store's schema version: 0 when it has none yet."""
        if not self._has_table("schema_version"):
            return 0
        row = self._execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _has_table(self, table: str) -> bool:
        """Whether the store's schema holds ``table``."""
        row = self._execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return row is not None

    def _add_column(self, table: str, column: str, sql_type: str) -> None:
        """Add a column to ``table`` unless it has it (a store created by this version has it already)."""
        if column not in self._columns(table):
            self._execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")

    def _columns(self, table: str) -> set[str]:
        """The names of ``table``'s columns."""
        rows = self._execute("SELECT name FROM pragma_table_info(?)", (table,)).fetchall()
        return {str(r[0]) for r in rows}

    # inbox and reply cache

    def seen(self, consumer: str, message_id: str) -> bool:
        row = self._execute(
            "SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?", (consumer, message_id)
        ).fetchone()
        return row is not None

    def remember(self, consumer: str, message_id: str) -> None:
        with self._atomic():
            self._insert_inbox(consumer, message_id)

    def _insert_inbox(self, consumer: str, message_id: str) -> None:
        self._execute(
            "INSERT INTO inbox (consumer, message_id, handled_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (consumer, message_id, self.clock()),
        )

    def cached_reply(self, consumer: str, request_id: str) -> str | None:
        row = self._execute(
            "SELECT body FROM reply_cache WHERE consumer = ? AND request_id = ?", (consumer, request_id)
        ).fetchone()
        return None if row is None else str(row[0])

    def cache_reply(self, consumer: str, request_id: str, body: str) -> None:
        with self._atomic():
            self._execute(
                "INSERT INTO reply_cache (consumer, request_id, body, cached_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (consumer, request_id, body, self.clock()),
            )

    # claims

    def claim(self, consumer: str, message_id: str, owner: str, until: float, now: float) -> bool:
        # One statement, committed at once: a new claim, or one taken over (expired, or already ours).
        return (consumer, message_id) in self.claim_many([(consumer, message_id)], owner, until, now)

    def claim_many(
        self, claims: Sequence[tuple[str, str]], owner: str, until: float, now: float
    ) -> set[tuple[str, str]]:
        # One statement per chunk, in one transaction: the claim statement of claim() for many rows.
        won: set[tuple[str, str]] = set()
        ordered = sorted(claims)
        with self._atomic():
            for start in range(0, len(ordered), _CLAIM_CHUNK):
                chunk = ordered[start : start + _CLAIM_CHUNK]
                rows = self._execute(
                    "INSERT INTO claims (consumer, message_id, owner, expires_at) VALUES "
                    + ", ".join("(?, ?, ?, ?)" for _ in chunk)
                    + " ON CONFLICT (consumer, message_id) DO UPDATE SET owner = excluded.owner,"
                    " expires_at = excluded.expires_at WHERE claims.expires_at < ? OR claims.owner = excluded.owner"
                    " RETURNING consumer, message_id",
                    (*(v for c, m in chunk for v in (c, m, owner, until)), now),
                ).fetchall()
                won.update((str(r[0]), str(r[1])) for r in rows)
        return won

    def answers(
        self, inbox: Sequence[tuple[str, str]], replies: Sequence[tuple[str, str]]
    ) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
        seen: set[tuple[str, str]] = set()
        for consumer, ids in _grouped(inbox):
            rows = self._execute(
                f"SELECT message_id FROM inbox WHERE consumer = ? AND message_id IN ({', '.join('?' for _ in ids)})",
                (consumer, *ids),
            ).fetchall()
            seen.update((consumer, str(r[0])) for r in rows)
        cached: dict[tuple[str, str], str] = {}
        for consumer, ids in _grouped(replies):
            rows = self._execute(
                "SELECT request_id, body FROM reply_cache WHERE consumer = ? AND request_id IN"
                f" ({', '.join('?' for _ in ids)})",
                (consumer, *ids),
            ).fetchall()
            cached.update(((consumer, str(r[0])), str(r[1])) for r in rows)
        return seen, cached

    def claimed(self, message_id: str, now: float) -> bool:
        row = self._execute(
            "SELECT 1 FROM claims WHERE message_id = ? AND expires_at >= ? LIMIT 1", (message_id, now)
        ).fetchone()
        return row is not None

    def renew_claims(self, owner: str, until: float) -> None:
        with self._atomic():
            self._execute("UPDATE claims SET expires_at = ? WHERE owner = ?", (until, owner))

    def release(self, consumer: str, message_id: str, owner: str) -> None:
        with self._atomic():
            self._execute(
                "DELETE FROM claims WHERE consumer = ? AND message_id = ? AND owner = ?", (consumer, message_id, owner)
            )

    # sagas

    def save_saga(
        self,
        record: SagaRecord,
        *,
        expected_version: int | None,
        history: HistoryEntry,
        inbox: tuple[str, str] | None,
        outbox: Sequence[Outgoing],
    ) -> list[OutboxRow]:
        values = (
            record.state,
            json.dumps(record.data),
            record.version,
            record.deadline,
            record.attempts,
            json.dumps(record.meta),
            int(record.final),
            record.updated_at,
            record.fingerprint,
        )
        conflict: StoreError
        # On SQLite, DuplicateSaga and VersionConflict are raised before anything is written, and without
        # a database error: inside a group, no savepoint of its own is needed (see _atomic). PostgreSQL
        # sends every statement at once (one round trip) and checks afterwards: inside a group, a
        # savepoint (sent with them) undoes the call's writes when it meets a conflict.
        undo = self._checks_after_writes and self._depth > 0
        with self._atomic():
            if undo:
                self._execute("SAVEPOINT save")
            if expected_version is None:
                cur = self._execute(
                    f"INSERT INTO sagas ({_SAGA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (record.id, record.type, record.key, *values[:7], record.created_at, *values[7:]),
                )
                conflict = DuplicateSaga(f"saga {record.type}/{record.key} exists")
            else:
                cur = self._execute(
                    "UPDATE sagas SET state = ?, data = ?, version = ?, deadline = ?, attempts = ?,"
                    " meta = ?, final = ?, updated_at = ?, fingerprint = ? WHERE id = ? AND version = ?",
                    (*values, record.id, expected_version),
                )
                conflict = VersionConflict(f"saga {record.id} is not at version {expected_version}")
            if not self._checks_after_writes:
                if cur.rowcount != 1:
                    raise conflict
                return self._save_rest(record, history, inbox, outbox)
            try:
                rows = self._save_rest(record, history, inbox, outbox)
            except Exception:
                with suppress(Exception):
                    self._flush()  # (the statements after the failed one are skipped: wait for them all)
                if cur.rowcount != 0:
                    # A failure of its own (not explained by a conflict): the transaction is in error,
                    # and the group fails unless the caller's part rolls back (see _transaction).
                    raise
                rows = []  # (a conflict: a write after it may fail, say the history entry's sequence is taken)
            if cur.rowcount != 1:
                if undo:
                    self._execute("ROLLBACK TO save")
                    self._execute("RELEASE save")
                raise conflict
            if undo:
                self._execute("RELEASE save")
            return rows

    def _save_rest(
        self, record: SagaRecord, history: HistoryEntry, inbox: tuple[str, str] | None, outbox: Sequence[Outgoing]
    ) -> list[OutboxRow]:
        """The writes of :meth:`save_saga` after the saga's row: its history entry, inbox record and
        outbox rows (their ids read once every statement was sent)."""
        self._execute(
            "INSERT INTO saga_history (saga_id, seq, at, message_id, from_state, to_state, reason, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.version,
                history.at,
                history.message_id,
                history.from_state,
                history.to_state,
                history.reason,
                history.actor,
            ),
        )
        if inbox is not None:
            self._insert_inbox(*inbox)
        now = history.at  # the engine's clock, which the relay compares with
        sent = [
            self._execute(
                "INSERT INTO outbox (saga_id, message_id, routing_key, body, mandatory, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (record.id, out.message_id, out.routing_key, out.body, int(out.mandatory), now),
            )
            for out in outbox
        ]
        self._flush()
        return [
            OutboxRow(int(c.fetchone()[0]), record.id, out.message_id, out.routing_key, out.body, out.mandatory, now)
            for c, out in zip(sent, outbox, strict=True)
        ]

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        row = self._execute(f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE id = ?", (saga_id,)).fetchone()
        return None if row is None else _record(row)

    def find_saga(self, saga_type: str, key: str) -> SagaRecord | None:
        row = self._execute(
            f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE type = ? AND key = ?", (saga_type, key)
        ).fetchone()
        return None if row is None else _record(row)

    def get_sagas(self, saga_ids: Sequence[str]) -> dict[str, SagaRecord]:
        out: dict[str, SagaRecord] = {}
        for chunk in _chunked(saga_ids):
            rows = self._execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE id IN ({', '.join('?' for _ in chunk)})", chunk
            ).fetchall()
            for row in rows:
                record = _record(row)
                out[record.id] = record
        return out

    def find_sagas(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SagaRecord]:
        out: dict[tuple[str, str], SagaRecord] = {}
        for saga_type, chunk in _grouped(keys):
            # (type = ? AND key IN (...): the (type, key) unique index serves it)
            rows = self._execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE type = ? AND key IN ({', '.join('?' for _ in chunk)})",
                (saga_type, *chunk),
            ).fetchall()
            for row in rows:
                record = _record(row)
                out[(record.type, record.key)] = record
        return out

    def due_sagas(self, now: float, limit: int, types: Sequence[str] | None = None) -> list[SagaRecord]:
        only = "" if types is None else f" AND type IN ({', '.join('?' for _ in types)})"
        rows = self._execute(
            f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE deadline IS NOT NULL AND deadline <= ?{only}"
            # (ties in id order: workers firing at once lock rows in the same order, and never deadlock)
            " ORDER BY deadline, id LIMIT ?",
            (now, *(types or ()), limit),
        ).fetchall()
        return [_record(r) for r in rows]

    def list_sagas(
        self,
        saga_type: str | None = None,
        state: str | None = None,
        stuck_before: float | None = None,
        limit: int = 1000,
        *,
        key: str | None = None,
        newest_first: bool = False,
        offset: int = 0,
        after: tuple[float, str] | None = None,
        key_prefix: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        failed: bool = False,
    ) -> list[SagaRecord]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if saga_type:
            where.append("type = ?")
            params.append(saga_type)
        if state:
            where.append("state = ?")
            params.append(state)
        if key:
            where.append(f"{_KEY_C} = ?")  # (so that PostgreSQL searches sagas_by_key)
            params.append(key)
        if stuck_before is not None:
            where.append("final = 0 AND (deadline IS NULL OR deadline <= ?)")
            params.append(stuck_before)
        if key_prefix:
            # a range on the key in code point order (the C collation on PostgreSQL): an index range scan
            where.append(f"{_KEY_C} >= ?")
            params.append(key_prefix)
            upper = prefix_upper_bound(key_prefix)
            if upper is not None:
                where.append(f"{_KEY_C} < ?")
                params.append(upper)
        if failed:
            where.append("state = ?")
            params.append(FAILED_STATE)
        if created_after is not None:
            where.append("created_at >= ?")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at < ?")
            params.append(created_before)
        if after is not None:
            where.append(f"(created_at, id) {'<' if newest_first else '>'} (?, ?)")
            params.extend((float(after[0]), str(after[1])))
        order = "DESC" if newest_first else "ASC"
        rows = self._execute(
            f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE {' AND '.join(where)}"
            f" ORDER BY created_at {order}, id {order} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        return [_record(r) for r in rows]

    def count_by_state(self) -> list[StateCount]:
        rows = self._execute(
            "SELECT type, state, final, count(*) FROM sagas GROUP BY type, state, final ORDER BY type, state"
        ).fetchall()
        return [StateCount(r[0], r[1], bool(r[2]), int(r[3])) for r in rows]

    #: how the database reads JSON text (the request type a saga waits on, in ``live_groups``)
    _JSON = "sqlite"

    def live_groups(self) -> list[LiveGroup]:
        awaits = _AWAITS_POSTGRES if self._JSON == "postgres" else _AWAITS_SQLITE
        # (the partial index of sagas that have not ended: the live ones only)
        rows = self._execute(
            f"SELECT type, state, fingerprint, {awaits} AS awaits, count(*) FROM sagas WHERE final = 0"
            " GROUP BY type, state, fingerprint, awaits ORDER BY type, state"
        ).fetchall()
        return [LiveGroup(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    def save_definition(self, saga_type: str, fingerprint: str, graph: str, now: float) -> None:
        with self._atomic():
            self._execute(
                "INSERT INTO definitions (type, fingerprint, graph, first_seen) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (saga_type, fingerprint, graph, now),
            )

    def definition_graph(self, saga_type: str, fingerprint: str) -> str | None:
        row = self._execute(
            "SELECT graph FROM definitions WHERE type = ? AND fingerprint = ?", (saga_type, fingerprint)
        ).fetchone()
        return None if row is None else str(row[0])

    def outbox_backlog(self) -> OutboxBacklog:
        row = self._execute("SELECT count(*), min(created_at) FROM outbox WHERE sent_at IS NULL").fetchone()
        return OutboxBacklog(int(row[0]), None if row[1] is None else float(row[1]))

    def count_sagas(self, final: bool | None = None) -> int:
        if final is None:
            return int(self._execute("SELECT count(*) FROM sagas").fetchone()[0])
        return int(self._execute("SELECT count(*) FROM sagas WHERE final = ?", (int(final),)).fetchone()[0])

    def count_deadlines(self, after: float, until: float) -> int:
        # (the partial index of sagas with a deadline: the waiting ones, not every saga)
        row = self._execute(
            "SELECT count(*) FROM sagas WHERE deadline IS NOT NULL AND deadline > ? AND deadline <= ?", (after, until)
        ).fetchone()
        return int(row[0])

    def saga_history(self, saga_id: str) -> list[HistoryEntry]:
        rows = self._execute(
            "SELECT at, message_id, from_state, to_state, reason, actor FROM saga_history"
            " WHERE saga_id = ? ORDER BY seq",
            (saga_id,),
        ).fetchall()
        return [HistoryEntry(float(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def last_reasons(self, saga_ids: Sequence[str]) -> dict[str, HistoryEntry]:
        out: dict[str, HistoryEntry] = {}
        for chunk in _chunked(saga_ids):
            # (per saga, the greatest seq is one probe of the primary key (saga_id, seq))
            rows = self._execute(
                "SELECT h.saga_id, h.at, h.message_id, h.from_state, h.to_state, h.reason, h.actor"
                f" FROM saga_history h WHERE h.saga_id IN ({', '.join('?' for _ in chunk)})"
                " AND h.seq = (SELECT max(l.seq) FROM saga_history l WHERE l.saga_id = h.saga_id)",
                chunk,
            ).fetchall()
            for r in rows:
                out[r[0]] = HistoryEntry(float(r[1]), r[2], r[3], r[4], r[5], r[6])
        return out

    def outbox_rows(self, saga_id: str, limit: int = 50) -> list[OutboxState]:
        rows = self._execute(
            "SELECT id, saga_id, message_id, routing_key, body, mandatory, created_at, sent_at FROM outbox"
            " WHERE saga_id = ? ORDER BY id DESC LIMIT ?",
            (saga_id, limit),
        ).fetchall()
        return [
            OutboxState(
                OutboxRow(int(r[0]), r[1], r[2], r[3], r[4], bool(r[5]), float(r[6])),
                None if r[7] is None else float(r[7]),
            )
            for r in rows
        ]

    def unsent(self, created_before: float, limit: int = 500) -> list[OutboxRow]:
        rows = self._execute(
            "SELECT id, saga_id, message_id, routing_key, body, mandatory, created_at FROM outbox"
            " WHERE sent_at IS NULL AND created_at <= ? ORDER BY id LIMIT ?",
            (created_before, limit),
        ).fetchall()
        return [OutboxRow(int(r[0]), r[1], r[2], r[3], r[4], bool(r[5]), float(r[6])) for r in rows]

    def mark_sent(self, ids: Sequence[int]) -> None:
        now = self.clock()
        with self._atomic():
            for chunk in _chunked(ids):
                self._execute(
                    f"UPDATE outbox SET sent_at = ? WHERE id IN ({', '.join('?' for _ in chunk)})", (now, *chunk)
                )

    def row_counts(self) -> dict[str, int]:
        """Rows in each table retention bounds (:data:`RETAINED_TABLES`): for measuring, not the hot path."""
        counts: dict[str, int] = {}
        for table in RETAINED_TABLES:
            counts[table] = int(self._execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        return counts

    # retention (schema 7)

    @staticmethod
    def _ended_params(cutoffs: PruneCutoffs) -> list[Any]:
        """The parameters of the condition (on ``sagas``) of an ended saga a prune may delete:
        :data:`_ENDED` and, with cutoffs per saga type, one ``WHEN ? THEN ?`` each (:func:`_ended_cases`).
        The range on updated_at reads the partial index sagas_ended_by_updated."""
        latest = max([cutoffs.finished, *cutoffs.finished_by_type.values()])
        params: list[Any] = [FAILED_STATE, latest]
        if cutoffs.finished_by_type:
            for saga_type, cutoff in sorted(cutoffs.finished_by_type.items()):
                params.extend((saga_type, float(cutoff)))
            params.append(float(cutoffs.finished))
        return params

    def prune_counts(self, cutoffs: PruneCutoffs) -> dict[str, int]:
        cases = " ".join("WHEN ? THEN ?" for _ in cutoffs.finished_by_type)
        where = _ENDED + (f" AND updated_at < (CASE type {cases} ELSE ? END)" if cases else "")
        params = self._ended_params(cutoffs)
        ended = f"SELECT id FROM sagas WHERE {where}"
        sagas = self._execute(f"SELECT count(*) FROM sagas WHERE {where}", params).fetchone()[0]
        history = self._execute(f"SELECT count(*) FROM saga_history WHERE saga_id IN ({ended})", params).fetchone()[0]
        outbox = self._execute(
            f"SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL AND (sent_at < ? OR saga_id IN ({ended}))",
            (cutoffs.outbox_sent, *params),
        ).fetchone()[0]
        inbox = self._execute("SELECT count(*) FROM inbox WHERE handled_at < ?", (cutoffs.inbox,)).fetchone()[0]
        replies = self._execute("SELECT count(*) FROM reply_cache WHERE cached_at < ?", (cutoffs.replies,)).fetchone()[
            0
        ]
        claims = self._execute("SELECT count(*) FROM claims WHERE expires_at < ?", (cutoffs.claims,)).fetchone()[0]
        return {
            "sagas": int(sagas),
            "saga_history": int(history),
            "outbox": int(outbox),
            "inbox": int(inbox),
            "reply_cache": int(replies),
            "claims": int(claims),
        }

    def prune(self, table: str, cutoffs: PruneCutoffs, limit: int) -> dict[str, int]:
        with self._transaction():
            if table == "sagas":
                cases = " ".join("WHEN ? THEN ?" for _ in cutoffs.finished_by_type)
                where = _ENDED + (f" AND updated_at < (CASE type {cases} ELSE ? END)" if cases else "")
                params = self._ended_params(cutoffs)
                ids = [
                    r[0]
                    for r in self._execute(
                        f"SELECT id FROM sagas WHERE {where} ORDER BY updated_at LIMIT ?", (*params, limit)
                    ).fetchall()
                ]
                none = {"sagas": 0, "saga_history": 0, "outbox": 0}
                if not ids:
                    return none
                marks = ", ".join("?" for _ in ids)
                # (the condition again: on PostgreSQL, a saga a worker changed meanwhile is re-checked, and kept)
                gone = [
                    r[0]
                    for r in self._execute(
                        f"DELETE FROM sagas WHERE id IN ({marks}) AND {where} RETURNING id", (*ids, *params)
                    ).fetchall()
                ]
                if not gone:
                    return none
                marks = ", ".join("?" for _ in gone)
                history = self._execute(f"DELETE FROM saga_history WHERE saga_id IN ({marks})", gone)
                outbox = self._execute(f"DELETE FROM outbox WHERE sent_at IS NOT NULL AND saga_id IN ({marks})", gone)
                return {"sagas": len(gone), "saga_history": self._count(history), "outbox": self._count(outbox)}
            if table == "outbox":
                cur = self._execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NOT NULL"
                    " AND sent_at < ? ORDER BY sent_at LIMIT ?)",
                    (cutoffs.outbox_sent, limit),
                )
                return {"outbox": self._count(cur)}
            if table == "inbox":
                cur = self._execute(
                    "DELETE FROM inbox WHERE (consumer, message_id) IN (SELECT consumer, message_id FROM inbox"
                    " WHERE handled_at < ? ORDER BY handled_at LIMIT ?)",
                    (cutoffs.inbox, limit),
                )
                return {"inbox": self._count(cur)}
            if table == "reply_cache":
                cur = self._execute(
                    "DELETE FROM reply_cache WHERE (consumer, request_id) IN (SELECT consumer, request_id"
                    " FROM reply_cache WHERE cached_at < ? ORDER BY cached_at LIMIT ?)",
                    (cutoffs.replies, limit),
                )
                return {"reply_cache": self._count(cur)}
            if table == "claims":
                # (the condition again, on the deleted row: a claim a worker took again meanwhile, with a
                # new lease, is re-checked on PostgreSQL, and kept)
                cur = self._execute(
                    "DELETE FROM claims WHERE expires_at < ? AND (consumer, message_id) IN (SELECT consumer,"
                    " message_id FROM claims WHERE expires_at < ? ORDER BY expires_at LIMIT ?)",
                    (cutoffs.claims, cutoffs.claims, limit),
                )
                return {"claims": self._count(cur)}
            raise ConfigurationError(f"cannot prune {table!r}: prune sagas, outbox, inbox, reply_cache or claims")

    # the queue registry (schema 9)

    def register_queues(self, records: Sequence[QueueRecord]) -> None:
        with self._atomic():
            for r in records:
                self._execute(
                    "INSERT INTO queue_registry (exchange, queue, app, consumer, patterns, delay_queues, declared_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (exchange, queue, app) DO UPDATE SET"
                    " consumer = excluded.consumer, patterns = excluded.patterns,"
                    " delay_queues = excluded.delay_queues, declared_at = excluded.declared_at",
                    (
                        r.exchange,
                        r.queue,
                        r.app,
                        r.consumer,
                        json.dumps(list(r.patterns)),
                        json.dumps(list(r.delay_queues)),
                        r.declared_at,
                    ),
                )

    def registered_queues(self, exchange: str) -> list[QueueRecord]:
        rows = self._execute(
            "SELECT exchange, queue, app, consumer, patterns, delay_queues, declared_at FROM queue_registry"
            f" WHERE exchange = ? ORDER BY queue {_C_MARK}, app {_C_MARK}",
            (exchange,),
        ).fetchall()
        return [
            QueueRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), tuple(json.loads(r[5])), float(r[6]))
            for r in rows
        ]

    def registered_exchanges(self) -> list[str]:
        rows = self._execute("SELECT DISTINCT exchange FROM queue_registry").fetchall()
        return sorted(str(r[0]) for r in rows)

    def forget_queue(self, exchange: str, queue: str, app: str) -> None:
        with self._atomic():
            self._execute(
                "DELETE FROM queue_registry WHERE exchange = ? AND queue = ? AND app = ?", (exchange, queue, app)
            )


class SQLiteStore(_SqlStore):
    """An SQLite file in WAL mode.

    ``synchronous=NORMAL`` (the default here) survives any process crash; a power loss can roll back
    the last transactions. Pass ``synchronous="FULL"`` (``?synchronous=full`` in the URL) to survive
    that too, at about one fsync per commit.
    """

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        try:
            if path != ":memory:" and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=10000")
            # (a WAL that grew while checkpoints waited for readers is cut back to 64 MiB when it restarts)
            self._db.execute("PRAGMA journal_size_limit=67108864")
            self._create_schema(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store at {path!r}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._depth:
            # Inside a group: a savepoint, so that this part can fail alone.
            # (SQLite resolves a savepoint name to the innermost one: one name serves every level.)
            self._depth += 1
            self._db.execute("SAVEPOINT part")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK TO part")
                self._db.execute("RELEASE part")
                raise
            finally:
                self._depth -= 1
            self._db.execute("RELEASE part")
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


_SETUP_LOCK = "sagas-schema-setup:"


class PostgresStore(_SqlStore):
    """PostgreSQL through psycopg 3 (``pip install 'kombu-sagas[postgres]'``), for workers on several machines.

    Tables live in ``schema`` (default ``public``), so several apps or test runs can share a database.
    With ``create=False`` (operator tools), a schema that holds no store is an error instead of a new,
    empty store.
    """

    def __init__(self, url: str, *, schema: str = "public", create: bool = True) -> None:
        try:
            import psycopg
            from psycopg import sql
        except ImportError:
            raise ConfigurationError(
                "the PostgreSQL store needs psycopg: pip install 'kombu-sagas[postgres]'"
            ) from None
        if not schema.replace("_", "").isalnum():
            raise ConfigurationError(f"invalid schema name {schema!r}")
        self.schema = schema
        self._url = url
        try:
            self._connect(setup=True)
            if not create and not self._has_table("schema_version"):
                self._db.close()
                raise StoreError(
                    f"no sagas store in schema {schema!r} of that database: give the store URL the workers use"
                    " (a worker creates the store when it first starts)"
                )
            try:
                self._db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                self._create_schema(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")
                self._db.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_SETUP_LOCK + schema,))
            except BaseException:
                self._db.close()  # and with it the lock
                raise
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {exc}") from None

    def _connect(self, *, setup: bool = False) -> None:
        import psycopg
        from psycopg import sql

        #: the session advisory locks this connection holds (see :meth:`hold_lock`)
        self._locks: set[str] = set()
        # Named in pg_stat_activity after the schema, so an operator can tell the store's sessions apart.
        self._db = psycopg.connect(
            self._url, autocommit=True, connect_timeout=10, application_name=f"sagas:{self.schema}"[:63]
        )
        if setup:
            # Two processes creating one schema at the same moment collide on the catalog's unique keys
            # (CREATE ... IF NOT EXISTS is not safe against that): they take turns. __init__ unlocks.
            self._db.execute("SELECT pg_advisory_lock(hashtext(%s))", (_SETUP_LOCK + self.schema,))
        self._db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    def _live(self) -> None:
        """Reconnect if the connection broke (PostgreSQL restarted, or the session was killed). The call
        that met the break failed; the next one gets a new connection. Never inside a transaction: what
        the group wrote before the break is gone with the old connection, and writes on a new one would
        commit one by one (an outbox row or an inbox record without the saga they belong with). There
        the statement runs on the broken connection and raises, and so does the group."""
        if self._depth == 0 and (self._db.closed or self._db.broken):
            self._connect()

    def _execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self._live()
        return self._db.execute(self._sql(statement), params)

    _JSON = "postgres"

    def _columns(self, table: str) -> set[str]:
        rows = self._execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ?",
            (table,),
        ).fetchall()
        return {str(r[0]) for r in rows}

    def _has_table(self, table: str) -> bool:
        row = self._execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ).fetchone()
        return row is not None

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s").replace(_C_MARK, ' COLLATE "C"')

    #: statements are sent in pipeline mode inside a group: save_saga checks its row count after the rest
    _checks_after_writes = True
    #: the pipeline of the open group (None outside one): its writes are sent, not waited for, and the
    #: commit waits for them all (one round trip); a read, or a row count, waits for what was sent before
    _pipeline: Any = None

    def _flush(self) -> None:
        if self._pipeline is not None:
            self._pipeline.sync()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        import psycopg

        if self._depth:
            # Inside a group: a savepoint (the name resolves to the innermost one), sent with what follows.
            self._depth += 1
            try:
                self._db.execute("SAVEPOINT part")
                yield
            except BaseException:
                self._undo(part=True)
                raise
            finally:
                self._depth -= 1
            self._db.execute("RELEASE part")
            return
        self._live()
        self._depth = 1
        commit = None
        try:
            # (the pipeline's end sends the COMMIT and waits for every result: one round trip)
            with self._db.pipeline() as pipeline:
                self._pipeline = pipeline
                try:
                    self._db.execute("BEGIN")
                    yield
                except BaseException:
                    self._undo(part=False)
                    raise
                commit = self._db.execute("COMMIT")
        except psycopg.Error:
            if commit is not None and not (self._db.closed or self._db.broken):
                # A statement sent before the COMMIT failed: PostgreSQL skipped the rest, the COMMIT too.
                with suppress(psycopg.Error):
                    self._db.execute("ROLLBACK")
            raise
        finally:
            self._pipeline = None
            self._depth = 0
        assert commit is not None  # (the block raised otherwise)
        # A statement that failed inside the group (its error caught, and no savepoint rolled back to
        # undo it) leaves the transaction in error: PostgreSQL answers COMMIT with a rollback, no error.
        # (A connection that broke made the COMMIT, or the wait for it, raise.)
        if commit.statusmessage != "COMMIT":
            raise psycopg.OperationalError("a statement of the transaction failed: it was rolled back")

    def _undo(self, *, part: bool) -> None:
        """Roll back the transaction, or the ``part`` (the innermost savepoint ``part``), after an error
        inside a group, not hiding that error: wait for what was sent (a failed statement makes PostgreSQL
        skip what follows it until then), then send the rollback. A failure here (a broken connection)
        makes the group's commit fail instead."""
        import psycopg

        with suppress(psycopg.Error):
            self._flush()
        with suppress(psycopg.Error):
            if part:
                self._db.execute("ROLLBACK TO part")
                self._db.execute("RELEASE part")
            else:
                self._db.execute("ROLLBACK")

    def renew_claims(self, owner: str, until: float) -> None:
        # Rows locked in key order, the order claim_many takes them in: a renewal and another worker's
        # batch of claims over the same rows never wait on each other in a cycle.
        with self._atomic():
            self._execute(
                "UPDATE claims SET expires_at = ? WHERE (consumer, message_id) IN (SELECT consumer, message_id"
                " FROM claims WHERE owner = ? ORDER BY consumer, message_id FOR UPDATE)",
                (until, owner),
            )

    @property
    def url(self) -> str:
        """The URL that opens this store again (with its ``schema``): for a connection of its own."""
        return f"{self._url}{'&' if '?' in self._url else '?'}schema={self.schema}"

    def hold_lock(self, name: str) -> bool:
        """Take, or keep, the session advisory lock ``name`` (per schema) without waiting: whether this
        connection holds it. It is released when the connection closes or breaks (then a later call
        takes it again, if no other session did): how one worker per store is elected to prune."""
        self._live()
        if name not in self._locks:
            row = self._db.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"{name}:{self.schema}",)).fetchone()
            if not row[0]:
                return False
            self._locks.add(name)
        return True

    def database_time(self) -> float:
        """The database's clock, in seconds since the epoch: the one clock every worker of this store
        shares (a worker's deadlines follow it; see :mod:`sagas._clock`)."""
        row = self._execute("SELECT extract(epoch from clock_timestamp())").fetchone()
        return float(row[0])

    def close(self) -> None:
        if self._locks and not (self._db.closed or self._db.broken):
            # Released now, not when the server notices the closed session (a moment later): another
            # worker's next election takes the lock at once.
            with suppress(Exception):
                self._db.execute("SELECT pg_advisory_unlock_all()")
            self._locks.clear()
        self._db.close()


def open_store(url: str | Store | None = None, *, create: bool = True) -> Store:
    """Open a store from a URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    (optionally ``?synchronous=full``), or ``postgresql://user@host/db`` (optionally ``?schema=name``).

    With ``create=False``, a SQLite file or PostgreSQL schema that holds no store is a
    :class:`StoreError` instead of a new, empty store (for operator tools: a mistyped URL must not
    look like a store without sagas)."""
    if url is None:
        url = os.environ.get("SAGAS_STORE_URL") or DEFAULT_STORE_URL
    if not isinstance(url, str):
        if not isinstance(url, Store):
            raise ConfigurationError(f"{type(url).__name__} is not a store (see sagas.Store)")
        return url
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    if parts.scheme == "memory":
        return MemoryStore()
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError("sqlite store URL needs a path: sqlite:///sagas.db or sqlite:////abs/sagas.db")
        if unknown := sorted(set(query) - {"synchronous"}):
            raise ConfigurationError(f"unknown sqlite store URL option {unknown[0]!r}: the one option is synchronous")
        synchronous = query.get("synchronous", "NORMAL")
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        if not create and path != ":memory:" and not os.path.exists(path):
            raise StoreError(
                f"no SQLite store at {path!r}: give the store URL the workers use (a worker creates the store"
                " when it first starts)"
            )
        return SQLiteStore(path, synchronous=synchronous)
    if parts.scheme in ("postgresql", "postgres"):
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ConfigurationError(
                "the PostgreSQL store URL has a port that is not a number from 0 to 65535"
            ) from None
        schema = query.pop("schema", "public")
        rest = "&".join(f"{k}={v}" for k, v in query.items())
        return PostgresStore(parts._replace(query=rest).geturl(), schema=schema, create=create)
    raise ConfigurationError(
        f"unknown store URL scheme {parts.scheme!r}: use memory://, sqlite:///path or postgresql://..."
    )
