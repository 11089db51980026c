"""Running sagas: one message in, one committed state change and its outbox out.

For each message (DESIGN: "Handling one saga message"):

1. load the saga (by its id for a reply, by its key for a start or correlated event);
2. if the message id is in the inbox, it is a duplicate: stop;
3. trigger the type's one machine on a throw-away model: a pure step from (state, data, event) to
   (new state, data, messages to send, next deadline);
4. save the new state with version + 1, the history entry, the inbox record and the outbox rows in
   one transaction (a version conflict means another worker got there first: load and try again);
5. the worker publishes the outbox rows with pipelined confirms, marks them sent, then acks.

Deadlines live in the store. :meth:`SagaEngine.fire_due` re-sends a waiting state's request with the
same request id (with backoff and jitter) until its retries are spent, then takes the timeout
transition. Nothing here touches the broker.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import random
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
import transitions

from transport import CONTENT_TYPE, Event, decode, encode

from . import _late, _tracing
from ._errors import ActionRefused, ConfigurationError, NotFound, SagaCodeError, SagasError
from ._observe import NULL_OBSERVER, AfterCommit, Observer
from ._protocol import (
    COMPENSATE,
    TIMEOUT,
    Kind,
    Trigger,
    on_event,
    on_failure,
    on_reply,
    read_reply,
    request_event,
    saga_event,
)
from ._saga import (
    COMPENSATION_META,
    FAILED,
    STEPS_META,
    Saga,
    SagaContext,
    SagaDefinition,
    steps_from_meta,
    steps_to_meta,
)
from ._store import DuplicateSaga, HistoryEntry, OutboxRow, Outgoing, SagaRecord, Store, VersionConflict

log = structlog.get_logger("sagas.saga")

_CONFLICT_RETRIES = 10
#: the end of a saga code error's traceback kept in the saga's history
_TRACEBACK_CHARS = 4000

#: In a saga's metadata, for a saga its own code parked while applying a message: that message (and the
#: state and request it met), which ``retry`` applies again
PARKED_ON_META = "parked_on"


class _Model:
    """The throw-away model the type's machine is triggered on (``transitions`` needs ``state``)."""

    __slots__ = ("state",)

    def __init__(self, state: str) -> None:
        self.state = state


#: What became of a message that did not move a saga (``Applied.outcome``). The pipeline logs each
#: with its reason (docs/sagas.md, "Messages that move no saga"); a refused one is dead-lettered.
DUPLICATE = "duplicate"  # its id is in the saga type's inbox: handled before
DUPLICATE_START = "duplicate-start"  # a start event for a key whose saga exists
LATE_REPLY = "late-reply"  # a reply to a request the saga no longer waits on, or to an ended saga
UNKNOWN_SAGA = "unknown-saga"  # a reply whose correlation id names no saga of this type
NOT_APPLICABLE = "not-applicable"  # no outcome of the saga's current state takes it (or no guard passed)
NO_WAITING_SAGA = "no-waiting-saga"  # a correlated event whose saga does not exist or has ended
ENDED = "ended"  # the saga has ended
UNRELATED = "unrelated"  # an event type this saga type does not use
REFUSED = "refused"  # bad input (a start or correlated event without an acceptable key): dead-lettered
#: a message that moved a saga
MOVED = "moved"
#: a success that came after the saga stopped waiting for it (a late reply or event): its effect is
#: undone, or the saga counts it already; recorded in the saga's history either way
LATE_SUCCESS = "late-success"
#: a message that parked a saga left in a state its type no longer has
STRANDED = "stranded"
#: a message whose saga's own code raised (or made data that cannot be kept): the saga is parked
PARKED = "parked"

#: The longest business key, in bytes of UTF-8. Keys are stored whole and indexed (unique per saga
#: type): this keeps them well inside PostgreSQL's B-tree entry limit (about 2,700 bytes).
MAX_KEY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Applied:
    """What handling one message did: the saga (if any), whether it moved, the rows to publish, and
    for a message that moved nothing, what became of it (``outcome``) and why (``note``)."""

    saga: SagaRecord | None
    moved: bool
    rows: list[OutboxRow]
    note: str = ""
    outcome: str = MOVED
    #: for a refused message, the error behind the refusal (kept with the dead letter), if any
    error: BaseException | None = None

    @property
    def refused(self) -> bool:
        """The message is bad input: dead-letter it with ``note`` instead of acking it."""
        return self.outcome == REFUSED


class SagaEngine:
    """Applies messages and deadlines to the sagas of an app, through a store."""

    def __init__(
        self,
        sagas: Sequence[type[Saga]],
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.store = store
        self.clock = clock
        #: told of every transition, deadline fired and request re-sent (see :mod:`sagas._observe`), once
        #: the store group they happened in has committed (:meth:`group`)
        self.observer = observer
        self._after_commit = AfterCommit()
        self.rng = rng or random.Random()
        self._seeded = rng
        self.definitions: dict[str, SagaDefinition] = {}
        for cls in sagas:
            d = cls.definition()
            if d.type in self.definitions:
                raise ConfigurationError(f"two saga classes share the type {d.type!r}")
            self.definitions[d.type] = d
        #: the outbox rows of the migrations applied while handling the current message or deadline
        self._migration_rows: list[OutboxRow] = []
        self._reply_of: dict[str, dict[str, str]] = {
            d.type: {rt: req for req, rt in d.requests.items()} for d in self.definitions.values()
        }
        #: what :meth:`reading_ahead` read for the messages of the current batch, by message id: whether
        #: the inbox holds it, and its saga (None: none); taken once, by the message's first attempt
        self._ahead: dict[str, tuple[bool, SagaRecord | None]] = {}

    # -- messages ----------------------------------------------------------------------------------

    @_tracing.saga_message
    def handle(self, saga_type: str, event: Event) -> Applied:
        """Apply ``event`` to the saga it belongs to. Retries on version conflicts."""
        d = self.definitions[saga_type]
        self._migration_rows = []
        for _ in range(_CONFLICT_RETRIES):
            try:
                try:
                    applied = self._handle_once(d, event)
                except SagaCodeError as error:
                    applied = self._park_broken(d, error, event.id, (f"saga:{d.type}", event.id), event)
            except VersionConflict:
                continue
            migrated, self._migration_rows = self._migration_rows, []
            return dataclasses.replace(applied, rows=[*migrated, *applied.rows]) if migrated else applied
        raise SagasError(f"saga message {event.id} kept conflicting with other workers")

    def _handle_once(self, d: SagaDefinition, event: Event) -> Applied:
        consumer = f"saga:{d.type}"
        ahead = self._ahead.pop(event.id, None)  # (read ahead with the batch's other messages)
        if ahead[0] if ahead is not None else self.store.seen(consumer, event.id):
            return Applied(None, False, [], "duplicate: this message was handled before", DUPLICATE)
        inbox = (consumer, event.id)
        start = d.starts.get(event.type)
        if start is not None:
            key, problem = _key(event.payload, start.key)
            if key is None:
                return Applied(None, False, [], f"start event without a usable key: {problem}", REFUSED)
            existing: SagaRecord | None = self._migrated(
                d, ahead[1] if ahead is not None else self.store.find_saga(d.type, key)
            )
            if existing is not None:
                trigger = on_event(event.type)
                if not existing.final and trigger in d.triggers_from(existing.state):
                    ctx = _context(d, existing, event)
                    return self._trigger(d, existing, trigger, ctx, event.id, event.type, inbox)
                return Applied(
                    existing, False, [], f"duplicate start: the saga exists (in {existing.state})", DUPLICATE_START
                )
            now = self.clock()
            # Random; from the given RNG when there is one, so that sagas.testing (which seeds it) replays.
            saga_id = (
                uuid.uuid4() if self._seeded is None else uuid.UUID(int=self._seeded.getrandbits(128), version=4)
            ).hex
            record = SagaRecord(id=saga_id, type=d.type, key=key, state="", data={}, created_at=now, updated_at=now)
            ctx = SagaContext(record.id, d.type, "", {}, event)
            if start.keep:
                kept = {name: event.payload[name] for name in start.keep if name in event.payload}
                ctx.data.update(copy.deepcopy(kept))
            elif start.do is None:
                ctx.data.update(copy.deepcopy(dict(event.payload)))  # neither keep= nor do=: the whole payload
            if start.do is not None:
                with _saga_code(f"the start action of {event.type}", None):
                    start.do(ctx)
            try:
                rows = self._enter(
                    d, record, start.to, ctx, event.id, f"started by {event.type}", inbox, expected_version=None
                )
            except DuplicateSaga:
                return Applied(None, False, [], "duplicate start: the saga exists", DUPLICATE_START)
            return Applied(record, True, rows)
        if event.type in self._reply_of[d.type]:
            found = ahead[1] if ahead is not None else self.store.get_saga(event.correlation_id)
            if found is None or found.type != d.type:
                return Applied(None, False, [], f"reply for unknown saga {event.correlation_id[:64]!r}", UNKNOWN_SAGA)
            record = self._migrate(d, found)
            pending = record.meta.get("request") or {}
            reply = read_reply(event)
            live = reply.request_id == pending.get("id")
            # (a request an operator's retry superseded still counts while the saga waits on the retry:
            # its success is the step's success; its failure waits for the retry's answer)
            superseded = reply.ok and reply.request_id in (pending.get("superseded") or ())
            if not record.final and reply.request_id and (live or superseded):
                request_type = pending["type"]
                trigger = on_reply(request_type) if reply.ok else on_failure(request_type)
                ctx = _context(d, record, event, reply.result, reply.reason)
                reason = reply.reason or f"reply to {request_type}" + ("" if live else " (a superseded request)")
                answered = (reply.request_id, reply.ok)
                return self._trigger(d, record, trigger, ctx, event.id, reason, inbox, answered=answered)
            return self._late_reply(d, record, event, reply.request_id, reply.ok, reply.result, reply.reason, inbox)
        key_field = d.correlate.get(event.type)
        if key_field is not None:
            key, problem = _key(event.payload, key_field)
            if key is None:
                return Applied(None, False, [], f"correlated event without a usable key: {problem}", REFUSED)
            waiting: SagaRecord | None = self._migrated(
                d, ahead[1] if ahead is not None else self.store.find_saga(d.type, key)
            )
            trigger = on_event(event.type)
            if waiting is not None and (waiting.final or trigger not in d.triggers_from(waiting.state)):
                late = _late.awaited(waiting.meta, what=event.type)
                if late is not None:  # an event the saga stopped waiting for: a late success
                    return self._late_success(d, waiting, late, event, event.payload, inbox)
            if waiting is None or waiting.final:
                why = "no saga has this key" if waiting is None else f"the saga has ended in {waiting.state}"
                return Applied(waiting, False, [], f"no waiting saga for this event: {why}", NO_WAITING_SAGA)
            ctx = _context(d, waiting, event)
            return self._trigger(d, waiting, trigger, ctx, event.id, event.type, inbox)
        return Applied(None, False, [], f"{event.type} means nothing to saga type {d.type}", UNRELATED)

    def _trigger(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        trigger: Trigger,
        ctx: SagaContext,
        message_id: str,
        reason: str,
        inbox: tuple[str, str] | None,
        actor: str = "",
        answered: tuple[str, bool] | None = None,
    ) -> Applied:
        if record.final:
            return Applied(record, False, [], f"the saga has ended in {record.state}", ENDED)
        if record.state not in d.states:
            return Applied(record, True, self._park_stranded(d, record, message_id), "stranded: parked", STRANDED)
        model = _Model(record.state)
        event = d.machine.events.get(trigger.name)
        with _saga_code(f"a guard or action of {trigger} in state {record.state!r}", record.id):
            moved = event is not None and event.trigger(model, ctx=ctx)
        if not moved:
            why = f"{trigger} does not apply in state {record.state}: no outcome of that state takes it"
            return Applied(record, False, [], f"{why} (none is declared, or no guard passed)", NOT_APPLICABLE)
        rows = self._enter(
            d,
            record,
            model.state,
            ctx,
            message_id,
            reason,
            inbox,
            expected_version=record.version,
            actor=actor,
            answered=answered,
            taken=trigger.subject if trigger.kind is Kind.EVENT else None,
        )
        return Applied(record, True, rows)

    @_tracing.transition
    def _enter(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        new_state: str,
        ctx: SagaContext,
        message_id: str,
        reason: str,
        inbox: tuple[str, str] | None,
        expected_version: int | None,
        actor: str = "",
        *,
        answered: tuple[str, bool] | None = None,
        taken: str | None = None,
        supersede: bool = False,
        detail: str = "",
    ) -> list[OutboxRow]:
        """Move ``record`` into ``new_state``: build its request and deadline, and commit.

        What the state it leaves waited for and did not get (its request, unless ``answered`` says which
        attempt answered and whether it succeeded; its late-undoable events, unless ``taken`` is the one
        that moved it) is kept as awaited, so that a late success is undone. An operator's retry
        (``supersede``) keeps the state's earlier request ids with the new one instead."""
        now = self.clock()
        state = d.states[new_state]
        previous = record.state
        old_meta = record.meta
        record.version += 1
        record.state = new_state
        record.data = ctx.data
        record.updated_at = now
        record.fingerprint = d.fingerprint  # (the definition it last moved under)
        with _saga_code("an event the transition publishes", record.id):
            outgoing = [self._event_out(record, ctx, i, t, p) for i, (t, p) in enumerate(ctx.outbox)]
        meta = dict(old_meta)
        if ctx.steps:
            meta[STEPS_META] = steps_to_meta(ctx.steps)
        if ctx._note:  # noqa: SLF001 - what a step saga's compiled action says about this move
            reason = f"{reason}: {ctx._note}"  # noqa: SLF001
        compensation = ctx._compensation_meta()  # noqa: SLF001
        if compensation is not None:
            meta[COMPENSATION_META] = compensation
        if new_state == FAILED:
            meta["failed_from"], meta["reason"] = _resume_from(d, previous, compensation), reason
        left = old_meta.get("request") or {}
        if not supersede:
            awaited = _late.left_unanswered(d, previous, left, answered, taken, now)
            if awaited:
                meta[_late.AWAITED_META] = [*(old_meta.get(_late.AWAITED_META) or ()), *awaited]
        own: float | None = None
        if state.final:
            record.final, record.attempts = True, 0
            meta["request"] = None
        else:
            spec = state.request_spec
            if spec is not None:
                with _saga_code(f"the request {spec.type} of state {new_state!r}", record.id):
                    payload = spec.build(ctx)
                    request = request_event(
                        record.id, d.type, record.version, spec.type, payload, ctx.event.id if ctx.event else None
                    )
                    body = encode(request).decode()
                meta["request"] = {"id": request.id, "type": spec.type, "body": body, "sent_at": now}
                if supersede and left.get("type") == spec.type:
                    meta["request"]["superseded"] = [*(left.get("superseded") or ()), left["id"]]
                outgoing.append(Outgoing(request.id, spec.type, body, mandatory=True))
                record.attempts = 1
            else:
                meta["request"] = None
                record.attempts = 0
            own = now + state.deadline_after(max(record.attempts, 1), self.rng)
        record.meta = meta
        _late.set_deadline(record, own)
        history = HistoryEntry(now, message_id, previous or "-", new_state, reason + detail, actor)
        try:
            rows: list[OutboxRow] = self.store.save_saga(
                record, expected_version=expected_version, history=history, inbox=inbox, outbox=outgoing
            )
        except (TypeError, ValueError) as exc:  # (the store's own errors are neither)
            raise SagaCodeError("the saga's data (it cannot be stored as JSON)", exc, record.id) from exc
        log.info(
            "saga.transition",
            saga_id=record.id,
            saga_type=d.type,
            from_state=previous or "-",
            to_state=new_state,
            reason=reason,
            final=record.final,
        )
        self._after_commit.report(self.observer.transition, d.type, previous or "-", new_state, record.final)
        return rows

    def _event_out(
        self, record: SagaRecord, ctx: SagaContext, index: int, type: str, payload: Mapping[str, Any]
    ) -> Outgoing:
        causation = ctx.event.id if ctx.event else None
        out = saga_event(record.id, record.type, record.version, index, type, payload, causation)
        return Outgoing(out.id, type, encode(out).decode(), mandatory=False)

    @contextmanager
    def reading_ahead(self, saga_type: str, events: Sequence[Event]) -> Iterator[None]:
        """Inside a group, before :meth:`handle` applies ``events`` (a batch of messages of ``saga_type``):
        read what each will first read, the inbox record of its id and its saga, all at once
        (:meth:`Store.read_ahead`: one round trip on PostgreSQL instead of two per message). A message
        whose id, or saga, another message of the batch shares reads its own when it is handled (an
        earlier one may have changed it), and so does a retry after a version conflict."""
        d = self.definitions[saga_type]
        ids = collections.Counter(event.id for event in events)
        targets = {event.id: self._target(d, event) for event in events if ids[event.id] == 1}
        shared = collections.Counter(t for t in targets.values() if t is not None)
        keys = [t[1] for t in shared if t[0] == "key" and shared[t] == 1]
        saga_ids = [t[1] for t in shared if t[0] == "id" and shared[t] == 1]
        found = self.store.read_ahead(f"saga:{d.type}", list(targets), d.type, keys, saga_ids)
        sagas: dict[str, SagaRecord | None] = {}
        for event_id, t in targets.items():
            if t is None:
                sagas[event_id] = None  # (no saga is read for it)
            elif shared[t] == 1:
                sagas[event_id] = (found.by_key if t[0] == "key" else found.by_id).get(t[1])
        reached = collections.Counter(r.id for r in sagas.values() if r is not None)
        self._ahead = {
            event_id: (event_id in found.seen, record)
            for event_id, record in sagas.items()
            if record is None or reached[record.id] == 1
        }
        try:
            yield
        finally:
            self._ahead = {}

    def _target(self, d: SagaDefinition, event: Event) -> tuple[str, str] | None:
        """The saga :meth:`_handle_once` reads for ``event``: ("key", its key) or ("id", its id); None
        when it reads none (a start or correlated event without a usable key, an unrelated event)."""
        start = d.starts.get(event.type)
        if start is not None:
            key = _key(event.payload, start.key)[0]
            return None if key is None else ("key", key)
        if event.type in self._reply_of[d.type]:
            return ("id", event.correlation_id)
        key_field = d.correlate.get(event.type)
        if key_field is not None:
            key = _key(event.payload, key_field)[0]
            return None if key is None else ("key", key)
        return None

    def group(self) -> AbstractContextManager[None]:
        """A store group (:meth:`Store.group`, nested ones are savepoints) whose transitions, deadlines
        fired and requests re-sent are told to the observer only once the outermost group has committed:
        a commit that fails is redone, and must not count twice. Apply messages inside one."""
        return self._after_commit.group(self.store)

    # -- deadlines ---------------------------------------------------------------------------------

    def fire_due(self, limit: int = 500) -> list[OutboxRow]:
        """Fire every deadline that has passed (up to ``limit``), in one store transaction (group commit),
        with a savepoint per saga. Returns the committed rows to publish."""
        rows: list[OutboxRow] = []
        with self.group():
            for record in self.store.due_sagas(self.clock(), limit, types=tuple(self.definitions)):
                # Each saga alone: one whose own code raises is parked, and the others fire.
                message_id = f"deadline:{record.id}:{record.version}"
                try:
                    with self.group():
                        rows += self.fire(record)
                    self._after_commit.report(self.observer.deadline_fired, record.type)
                except VersionConflict:
                    continue  # another worker fired it, or a message moved the saga meanwhile
                except SagaCodeError as error:
                    try:
                        with self.group():
                            rows += self._park_broken(self.definitions[record.type], error, message_id, None).rows
                    except VersionConflict:
                        continue
        return rows

    @_tracing.deadline
    def fire(self, record: SagaRecord) -> list[OutboxRow]:
        d = self.definitions.get(record.type)
        if d is None:
            return []
        self._migration_rows = []
        version = record.version
        record = self._migrate(d, record)
        migrated, self._migration_rows = self._migration_rows, []
        if record.version != version and (record.final or record.deadline is None or record.deadline > self.clock()):
            return migrated  # the migration entered a state: its deadline is new
        return [*migrated, *self._fire(d, record)]

    def _fire(self, d: SagaDefinition, record: SagaRecord) -> list[OutboxRow]:
        late = record.meta.get(_late.LATE_META) or []
        if late:
            first = min(late, key=lambda e: float(e["due"]))
            if float(first["due"]) <= self.clock():
                return self._late_deadline(d, record, first)
            if record.final or (own := _late.own_deadline(record)) is None or own > self.clock():
                return []  # only a late compensation had a deadline, and it is not due any more
        if record.final:
            return []
        if record.state not in d.states:
            return self._park_stranded(d, record, f"deadline:{record.id}:{record.version}")
        state = d.states[record.state]
        pending = record.meta.get("request")
        now = self.clock()
        message_id = f"deadline:{record.id}:{record.version}"
        if pending and self.store.claimed(pending["id"], now):
            # A participant is handling the request (a worker holds its claim): re-sending it would only
            # bounce, and a slow participant is not a lost request. Wait, counting no attempt, until it
            # has taken longer than the state allows.
            sent_at = float(pending.get("sent_at", record.updated_at))
            limit = sent_at + state.handling_limit
            if now < limit:
                # (waits double with the time it has taken so far: few history entries for a long one)
                wait = max(state.deadline_after(max(record.attempts, 1), self.rng), now - sent_at)
                reason = f"deadline passed: {pending['type']} is being handled, waiting"
                waited = self._stay(record, now, min(limit, now + wait), message_id, reason, [])
                log.info("saga.request_being_handled", saga_id=record.id, saga_type=d.type, state=record.state)
                return waited
            ctx = _context(d, record, None, reason="timed out")
            what = f"timed out in {record.state}: {pending['type']} was still being handled after {limit - sent_at:g}s"
            return self._trigger(d, record, TIMEOUT, ctx, message_id, what, None).rows
        if pending and record.attempts < state.retries + 1:
            record.attempts += 1
            self._after_commit.report(self.observer.request_resent, d.type, pending["type"])
            reason = f"deadline passed: re-sent {pending['type']} (attempt {record.attempts})"
            resend = Outgoing(pending["id"], pending["type"], pending["body"], mandatory=True)
            deadline = now + state.deadline_after(record.attempts, self.rng)
            rows = self._stay(record, now, deadline, message_id, reason, [resend])
            log.info(
                "saga.request_resent",
                saga_id=record.id,
                saga_type=d.type,
                state=record.state,
                request=pending["type"],
                attempt=record.attempts,
            )
            return rows
        ctx = _context(d, record, None, reason="timed out")
        what = f"timed out in {record.state}" + (f" after {record.attempts} request(s)" if pending else "")
        return self._trigger(d, record, TIMEOUT, ctx, message_id, what, None).rows

    def _stay(
        self, record: SagaRecord, now: float, deadline: float, message_id: str, reason: str, outbox: list[Outgoing]
    ) -> list[OutboxRow]:
        """Commit a deadline that keeps the saga in its state: the next deadline, the history entry, and
        what it sends (the re-sent request, or nothing while a participant is still on it)."""
        record.version += 1
        _late.set_deadline(record, deadline)
        record.updated_at = now
        history = HistoryEntry(now, message_id, record.state, record.state, reason)
        rows: list[OutboxRow] = self.store.save_saga(
            record, expected_version=record.version - 1, history=history, inbox=None, outbox=outbox
        )
        return rows

    def request_unroutable(self, saga_id: str, request_id: str, reason: str) -> list[OutboxRow]:
        """A request could not be routed: nobody serves it. Fail the step at once (no waiting)."""
        for _ in range(_CONFLICT_RETRIES):
            record = self.store.get_saga(saga_id)
            if record is None or record.final:
                return []
            d = self.definitions[record.type]
            try:
                record = self._migrate(d, record)
            except SagaCodeError as error:
                return self._park_broken(d, error, f"unroutable:{request_id}", None).rows
            pending = record.meta.get("request") or {}
            late = [e for e in record.meta.get(_late.LATE_META) or () if e["id"] == request_id]
            if late:
                try:
                    return self._late_gave_up(d, record, late[0], f"unroutable:{request_id}", reason, None)
                except VersionConflict:
                    continue
            if pending.get("id") != request_id:
                return []
            ctx = _context(d, record, None, reason=reason)
            trigger = on_failure(pending["type"])
            try:
                try:
                    applied = self._trigger(d, record, trigger, ctx, f"unroutable:{request_id}", reason, None)
                    if not applied.moved:
                        applied = self._trigger(d, record, TIMEOUT, ctx, f"unroutable:{request_id}", reason, None)
                except SagaCodeError as error:
                    applied = self._park_broken(d, error, f"unroutable:{request_id}", None)
                return applied.rows
            except VersionConflict:
                continue
        return []

    def _park_broken(
        self,
        d: SagaDefinition,
        error: SagaCodeError,
        message_id: str,
        inbox: tuple[str, str] | None,
        event: Event | None = None,
    ) -> Applied:
        """The saga's own code raised: park the saga in ``failed``, with where, the error and its
        traceback in the history, so that it blocks nothing else (an operator retries it after the
        fix; the message that ran into it, kept in ``meta.parked_on``, is then applied again). A start
        whose code raised made no saga: the message is refused (dead-lettered) with the error."""
        trace = "".join(traceback.format_exception(error.error)).strip()[-_TRACEBACK_CHARS:]
        where = _user_frame(error.error)
        record: SagaRecord | None = self.store.get_saga(error.saga_id) if error.saga_id else None
        if record is None or record.type != d.type:
            return Applied(None, False, [], f"{error}{where}; no saga was started", REFUSED, error.error)
        reason = f"{error}{where}: parked; fix the saga's code or data, then retry it"
        if event is not None and record.state != FAILED:
            # what the retry applies again (the message is in the inbox: it will not come back)
            parked = {"state": record.state, "body": encode(event).decode(), "request": record.meta.get("request")}
            record.meta = {**record.meta, PARKED_ON_META: parked}
        log.error(
            "saga.code_failed",
            saga_id=record.id,
            saga_type=d.type,
            state=record.state,
            where=error.where,
            error=f"{type(error.error).__name__}: {error.error}"[:500],
        )
        ctx = _context(d, record, None, reason=reason)
        if record.state == FAILED:
            rows = self._aside(record, dict(record.meta), self.clock(), message_id, f"{reason}\n{trace}", inbox, [])
        else:
            rows = self._enter(
                d, record, FAILED, ctx, message_id, reason, inbox, expected_version=record.version, detail=f"\n{trace}"
            )
        return Applied(record, True, rows, reason, PARKED)

    def _park_stranded(self, d: SagaDefinition, record: SagaRecord, message_id: str) -> list[OutboxRow]:
        """A saga in a state its type no longer has (renamed or removed in a deploy): park it in
        ``failed``, visibly, so an operator can move it; it must not block anything else."""
        reason = f"state {record.state!r} no longer exists in saga type {d.type}"
        ctx = _context(d, record, None, reason=reason)
        log.warning("saga.stranded", saga_id=record.id, saga_type=d.type, state=record.state)
        return self._enter(d, record, FAILED, ctx, message_id, reason, None, expected_version=record.version)

    # -- late successes ----------------------------------------------------------------------------

    def _late_reply(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        event: Event,
        request_id: str,
        ok: bool,
        result: Mapping[str, Any],
        reason: str | None,
        inbox: tuple[str, str] | None,
    ) -> Applied:
        """A reply to a request the saga does not wait on (any more): the answer of a late success's
        compensation, a late success, or a duplicate or a late failure, which change nothing."""
        for entry in record.meta.get(_late.LATE_META) or ():
            if entry["id"] == request_id:
                if ok:
                    return self._late_undone(d, record, entry, event.id, inbox)
                why = f"{entry['type']} failed: {reason}"
                return Applied(
                    record, True, self._late_gave_up(d, record, entry, event.id, why, inbox), why, LATE_SUCCESS
                )
        awaited = _late.awaited(record.meta, request_id=request_id) if request_id else None
        if awaited is not None and ok:
            return self._late_success(d, record, awaited, event, result, inbox)
        why = "the saga has ended" if record.final else "the saga no longer waits on that request"
        if awaited is not None:
            why += " (a failure reply: nothing was done)"
        return Applied(record, False, [], f"late or duplicate reply: {why}", LATE_REPLY)

    def _late_success(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        awaited: Mapping[str, Any],
        event: Event,
        result: Mapping[str, Any],
        inbox: tuple[str, str] | None,
    ) -> Applied:
        """Something the saga stopped waiting for succeeded after all. A step saga's compensation: the
        step is undone after all. Otherwise, unless the saga counts its effect, send what undoes it
        (with its own deadline and retries), and record it in the history."""
        now = self.clock()
        meta = dict(record.meta)
        meta[_late.AWAITED_META] = [e for e in meta.get(_late.AWAITED_META) or () if e is not awaited]
        what, where = str(awaited["what"]), str(awaited["state"])
        came = f"{what} succeeded after the saga stopped waiting for it in {where}"
        outgoing: list[Outgoing] = []
        undone_step = d.undo_states.get(where)
        undo = None if undone_step is not None else d.late_undo(awaited, record.state, record.meta)
        if undone_step is not None:
            meta[COMPENSATION_META] = _late.mark_undone(meta, undone_step)
            reason = f"late success: {came}: {undone_step} is undone after all"
            if record.state == FAILED and not meta[COMPENSATION_META]["not_undone"] and "compensated" in d.states:
                # parked because that compensation went unanswered: now nothing is left to undo
                log.warning(
                    "saga.late_success",
                    saga_id=record.id,
                    saga_type=d.type,
                    state=record.state,
                    what=what,
                    reason=reason,
                )
                record.meta = {k: v for k, v in meta.items() if k not in ("failed_from", "reason")}
                ctx = _context(d, record, event, result)
                rows = self._enter(
                    d,
                    record,
                    "compensated",
                    ctx,
                    event.id,
                    f"{reason}: every step is undone",
                    inbox,
                    expected_version=record.version,
                )
                return Applied(record, True, rows, reason, LATE_SUCCESS)
        elif undo is None:
            reason = f"late success: {came}: the saga counts its effect already, nothing to undo"
        else:
            steps = dict(steps_from_meta(record.meta))
            if undo.step is not None:
                steps[undo.step] = result
            ctx = SagaContext(
                record.id, d.type, record.state, copy.deepcopy(record.data), event, result, None, steps=steps
            )
            with _saga_code(f"the request {undo.request.type} that undoes a late {what}", record.id):
                request = request_event(
                    record.id, d.type, record.version + 1, undo.request.type, undo.request.build(ctx), event.id
                )
                body = encode(request).decode()
            meta[_late.LATE_META] = [
                *(meta.get(_late.LATE_META) or ()),
                _late.late_compensation(request.id, request.type, body, where, what, undo, now, self.rng),
            ]
            outgoing.append(Outgoing(request.id, request.type, body, mandatory=True))
            reason = f"late success: {came}: sent {request.type} to undo it"
        log.warning(
            "saga.late_success", saga_id=record.id, saga_type=d.type, state=record.state, what=what, reason=reason
        )
        rows = self._aside(record, meta, now, event.id, reason, inbox, outgoing)
        return Applied(record, True, rows, reason, LATE_SUCCESS)

    def _late_undone(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        entry: Mapping[str, Any],
        message_id: str,
        inbox: tuple[str, str] | None,
    ) -> Applied:
        """The compensation of a late success answered: the effect is undone."""
        meta = dict(record.meta)
        meta[_late.LATE_META] = _late.late_but(meta, entry["id"])
        if entry.get("step"):
            meta[COMPENSATION_META] = _late.mark_undone(meta, str(entry["step"]))
        reason = f"late success of {entry['what']} undone: {entry['type']} answered"
        log.info("saga.late_success_undone", saga_id=record.id, saga_type=d.type, what=entry["what"])
        return Applied(
            record, True, self._aside(record, meta, self.clock(), message_id, reason, inbox, []), reason, LATE_SUCCESS
        )

    def _late_deadline(self, d: SagaDefinition, record: SagaRecord, entry: Mapping[str, Any]) -> list[OutboxRow]:
        """A late success's compensation is due: send it again (same id), or give up after its retries."""
        now = self.clock()
        message_id = f"deadline:{record.id}:{record.version}"
        if _late.spent(entry):
            why = f"{entry['type']} got no answer after {int(entry['attempts'])} request(s)"
            return self._late_gave_up(d, record, entry, message_id, why, None)
        again = _late.sent_again(entry, now, self.rng)
        meta = dict(record.meta)
        meta[_late.LATE_META] = [again if e["id"] == entry["id"] else e for e in meta.get(_late.LATE_META) or ()]
        reason = (
            f"deadline passed: re-sent {entry['type']} to undo the late success of {entry['what']} "
            f"(attempt {again['attempts']})"
        )
        resend = Outgoing(str(entry["id"]), str(entry["type"]), str(entry["body"]), mandatory=True)
        return self._aside(record, meta, now, message_id, reason, None, [resend])

    def _late_gave_up(
        self,
        d: SagaDefinition,
        record: SagaRecord,
        entry: Mapping[str, Any],
        message_id: str,
        why: str,
        inbox: tuple[str, str] | None,
    ) -> list[OutboxRow]:
        """A late success could not be undone: its effect remains. The saga says so, and parks in
        ``failed`` (or stays there) for an operator."""
        meta = dict(record.meta)
        meta[_late.LATE_META] = _late.late_but(meta, entry["id"])
        meta[COMPENSATION_META] = _late.mark_not_undone(meta, str(entry.get("step") or entry["what"]))
        reason = f"could not undo the late success of {entry['what']} ({why}): its effect remains"
        log.warning("saga.late_success_not_undone", saga_id=record.id, saga_type=d.type, what=entry["what"], why=why)
        if record.state == FAILED:
            return self._aside(record, meta, self.clock(), message_id, reason, inbox, [])
        record.meta = meta
        ctx = _context(d, record, None, reason=reason)
        return self._enter(d, record, FAILED, ctx, message_id, reason, inbox, expected_version=record.version)

    def _aside(
        self,
        record: SagaRecord,
        meta: dict[str, Any],
        now: float,
        message_id: str,
        reason: str,
        inbox: tuple[str, str] | None,
        outgoing: list[Outgoing],
    ) -> list[OutboxRow]:
        """Commit a change beside the state machine (the saga stays in its state): its metadata, the
        history entry, what it sends, and the deadline (the state's own, or a late compensation's)."""
        own = _late.own_deadline(record)
        record.version += 1
        record.meta = meta
        record.updated_at = now
        _late.set_deadline(record, own)
        history = HistoryEntry(now, message_id, record.state, record.state, reason)
        rows: list[OutboxRow] = self.store.save_saga(
            record, expected_version=record.version - 1, history=history, inbox=inbox, outbox=outgoing
        )
        return rows

    # -- operators ---------------------------------------------------------------------------------

    def retry(self, saga_id: str, *, actor: str) -> list[OutboxRow]:
        """Operator ``actor``: send the current request again now (fresh attempts); a saga parked in
        ``failed`` goes back to the state it failed in and starts that state again."""
        record = self._require(saga_id)
        d = self.definitions[record.type]
        target = record.state
        if record.state not in d.states:
            raise ActionRefused(
                f"saga {saga_id} is in state {record.state!r}, which saga type {d.type} no longer has (a deploy "
                "renamed or removed it): a worker parks it in 'failed' at its next deadline; retry it from there"
            )
        parked = record.meta.get(PARKED_ON_META) if record.state == FAILED else None
        if parked and parked.get("state") in d.states and not d.states[parked["state"]].final:
            with _refused_if_code_fails(saga_id):
                applied = self._apply_again(d, record, parked, actor)
            if applied is not None:
                return applied
        if record.state == FAILED:
            target = record.meta.get("failed_from") or ""
            if target not in d.states or target == FAILED:
                raise ActionRefused(
                    f"saga {saga_id} has no state to go back to (it failed in {target or 'no known state'!r}): "
                    "compensate it, or fix its data and start a new one"
                )
            if d.states[target].final:
                raise ActionRefused(
                    f"saga {saga_id} failed after it had ended in {target!r} ({record.meta.get('reason', '')}): "
                    "there is no step to send again; undo what its history lists as remaining by hand"
                )
            record.final = False
            record.meta = {k: v for k, v in record.meta.items() if k not in ("failed_from", "reason")}
        elif record.final:
            raise ActionRefused(f"saga {saga_id} has ended in {record.state}; only a failed saga can be retried")
        ctx = _context(d, record, None)
        message_id = f"operator:retry:{record.version}"
        # (the request it waits on is superseded, not forgotten: its success still counts, and after the
        # saga moved on, its late success is undone)
        with _refused_if_code_fails(saga_id):
            return self._enter(
                d,
                record,
                target,
                ctx,
                message_id,
                "operator: retry",
                None,
                expected_version=record.version,
                actor=actor,
                supersede=True,
            )

    def _apply_again(
        self, d: SagaDefinition, record: SagaRecord, parked: Mapping[str, Any], actor: str
    ) -> list[OutboxRow] | None:
        """Take a saga its own code parked back to the state it was in, and apply the message that
        parked it again; None when that message no longer moves it (then the state starts again)."""
        event = decode(str(parked["body"]).encode(), CONTENT_TYPE)
        state = str(parked["state"])
        meta = {k: v for k, v in record.meta.items() if k not in ("failed_from", "reason", PARKED_ON_META)}
        meta["request"] = parked.get("request")
        pending = parked.get("request") or {}
        result: Mapping[str, Any] | None = None
        reason: str | None = None
        answered: tuple[str, bool] | None = None
        if event.type in self._reply_of[d.type]:
            reply = read_reply(event)
            result, reason, answered = reply.result, reply.reason, (reply.request_id, reply.ok)
            request_type = str(pending.get("type") or self._reply_of[d.type][event.type])
            trigger = on_reply(request_type) if reply.ok else on_failure(request_type)
            meta[_late.AWAITED_META] = _late.awaited_but(meta, request_id=reply.request_id)
        else:
            trigger = on_event(event.type)
            meta[_late.AWAITED_META] = _late.awaited_but(meta, what=event.type)
        again = dataclasses.replace(record, state=state, final=False, meta=meta)
        ctx = _context(d, again, event, result, reason)
        why = f"operator: retry: {event.type} applied again in {state}"
        applied = self._trigger(
            d, again, trigger, ctx, f"operator:retry:{record.version}", why, None, actor=actor, answered=answered
        )
        return applied.rows if applied.moved else None

    def compensate(self, saga_id: str, *, actor: str) -> list[OutboxRow]:
        """Operator ``actor``: start compensating a saga now, where its type says how from its state."""
        record = self._require(saga_id)
        d = self.definitions[record.type]
        if record.final:
            raise ActionRefused(f"saga {saga_id} has ended in {record.state}; there is nothing to compensate")
        if not d.compensable_from(record.state):
            raise ActionRefused(
                f"saga type {d.type} defines no compensation from state {record.state!r} "
                "(give that State on_compensate=<the state that undoes it>)"
            )
        reason = "operator: compensate"
        ctx = _context(d, record, None, reason=reason)
        message_id = f"operator:compensate:{record.version}"
        with _refused_if_code_fails(saga_id):
            applied = self._trigger(d, record, COMPENSATE, ctx, message_id, reason, None, actor=actor)
        if not applied.moved:
            raise ActionRefused(f"saga {saga_id} did not move: {applied.note}")
        return applied.rows

    def _require(self, saga_id: str) -> SagaRecord:
        record: SagaRecord | None = self.store.get_saga(saga_id)
        if record is None:
            raise NotFound(f"no saga {saga_id!r}")
        if record.type not in self.definitions:
            raise NotFound(
                f"saga {saga_id} is of type {record.type!r}, which this app does not declare: give the app that runs it"
            )
        with _refused_if_code_fails(saga_id):
            return self._migrate(self.definitions[record.type], record)

    # -- migrations --------------------------------------------------------------------------------

    def _migrated(self, d: SagaDefinition, record: SagaRecord | None) -> SagaRecord | None:
        """:meth:`_migrate` for a saga that may not exist."""
        return None if record is None else self._migrate(d, record)

    def _migrate(self, d: SagaDefinition, record: SagaRecord) -> SagaRecord:
        """``record`` as this version of its type has it: a live saga created or last moved under another
        version (its fingerprint differs) whose state the type's ``migrations`` maps, or whose type has a
        ``migrate`` function, is migrated, once, in one store transaction with its history entry, and
        stamped with this version's fingerprint. Any other saga is returned as it is."""
        if record.final or record.fingerprint == d.fingerprint:
            return record
        target = d.migrations.get(record.state)
        if target is None and (d.migrate is None or record.state not in d.states):
            return record  # nothing to do (its next move stamps this version), or stranded: parked on its next move
        old = record.fingerprint
        data = copy.deepcopy(record.data)
        if d.migrate is not None:
            with _saga_code(f"the migrate function of saga type {d.type}", record.id):
                data = d.migrate(data, old)
                if not isinstance(data, dict):
                    raise TypeError(f"migrate() returned {type(data).__name__}, not the saga's data (a dict)")
        how = []
        if target is not None:
            how.append(f"migrations[{record.state!r}] = {target!r}")
        if d.migrate is not None:
            how.append("migrate()")
        reason = f"migrated from definition {(old or 'unknown')[:12]} to {d.fingerprint[:12]} by {' and '.join(how)}"
        message_id = f"migration:{record.id}:{record.version}"
        now = self.clock()
        pending = (record.meta.get("request") or {}).get("type")
        to = target or record.state
        spec = d.states[to].request_spec if to in d.states else None
        log.info("saga.migrated", saga_id=record.id, saga_type=d.type, from_state=record.state, to_state=to)
        if target is not None and target != record.state and (pending is None or spec is None or spec.type != pending):
            # the new state waits for something else: enter it (its request, its deadline)
            ctx = _context(d, record, None)
            ctx.data = data
            with self.group():
                self._migration_rows += self._enter(
                    d, record, to, ctx, message_id, reason, None, expected_version=record.version
                )
            return record
        # the same state, or one that waits for the same reply: the saga goes on waiting there
        previous = record.state
        record.version += 1
        record.state, record.data, record.updated_at, record.fingerprint = to, data, now, d.fingerprint
        history = HistoryEntry(now, message_id, previous, to, reason)
        try:
            with self.group():
                self.store.save_saga(
                    record, expected_version=record.version - 1, history=history, inbox=None, outbox=[]
                )
        except (TypeError, ValueError) as exc:
            raise SagaCodeError(
                "the saga's data after migrate() (it cannot be stored as JSON)", exc, record.id
            ) from exc
        return record


def _context(
    d: SagaDefinition,
    record: SagaRecord,
    event: Event | None,
    result: Mapping[str, Any] | None = None,
    reason: str | None = None,
) -> SagaContext:
    """What a guard, an action or a request builder of ``record`` sees."""
    steps = steps_from_meta(record.meta)
    compensation = record.meta.get(COMPENSATION_META)
    return SagaContext(
        record.id, d.type, record.state, record.data, event, result, reason, steps=steps, compensation=compensation
    )


@contextmanager
def _saga_code(where: str, saga_id: str | None) -> Iterator[None]:
    """Run a saga's own code (or make what it sends): what it raises is a :class:`SagaCodeError`."""
    try:
        yield
    except SagaCodeError:
        raise
    except Exception as exc:
        raise SagaCodeError(where, exc, saga_id) from exc


def _user_frame(error: BaseException) -> str:
    """`` (in function, file.py:line)``: the innermost frame of the error's traceback outside the
    framework and ``transitions`` (the saga's own code), or nothing."""
    libraries = (os.path.dirname(transitions.__file__), os.path.dirname(json.__file__))
    here = os.path.dirname(__file__)
    found = ""
    for frame in traceback.extract_tb(error.__traceback__):
        folder, name = os.path.split(frame.filename)
        if not frame.filename.startswith(libraries) and not (folder == here and name.startswith("_")):
            found = f" (in {frame.name}, {name}:{frame.lineno})"
    return found


@contextmanager
def _refused_if_code_fails(saga_id: str) -> Iterator[None]:
    """An operator's action whose saga code raises changes nothing, and says why."""
    try:
        yield
    except SagaCodeError as error:
        raise ActionRefused(f"saga {saga_id}: {error}; nothing was changed: fix the code or the data first") from error


def _resume_from(d: SagaDefinition, previous: str, compensation: Mapping[str, Any] | None) -> str:
    """Where ``sagas retry`` takes a saga parked in ``failed``: the state it failed in, or for a step
    saga whose compensations went on past one that failed, the first compensation not done."""
    not_undone = (compensation or {}).get("not_undone") or []
    first = f"undo_{not_undone[0]}" if not_undone else ""
    return first if first in d.states else previous


def _key(payload: Mapping[str, Any], field: str) -> tuple[str | None, str]:
    """The business key in ``payload[field]``, exactly as sent (never cut or converted), or None and
    why it is refused. A key is a non-empty string of at most :data:`MAX_KEY_BYTES` bytes of UTF-8,
    without NUL (PostgreSQL's text cannot hold one)."""
    if field not in payload:
        return None, f"the payload has no {field!r}"
    value = payload[field]
    if not isinstance(value, str):
        hint = f' (send it as the string "{value}")' if isinstance(value, int) and not isinstance(value, bool) else ""
        return None, f"{field!r} is {_json_kind(value)}, not a string{hint}: a saga key is a string"
    if value == "":
        return None, f"{field!r} is an empty string"
    if "\x00" in value:
        return None, f"{field!r} contains a NUL character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None, f"{field!r} is not valid Unicode (it holds a lone surrogate)"
    if size > MAX_KEY_BYTES:
        return None, f"{field!r} is {size} bytes long in UTF-8; the limit is {MAX_KEY_BYTES}"
    return value, ""


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"
