"""The bookkeeping of late successes, in a saga's metadata.

A saga that stops waiting for something (a request's reply, an event its state's ``late=`` names)
keeps it under :data:`AWAITED_META`, so that a success that comes after all can be undone. The
compensations of late successes in flight are kept under :data:`LATE_META`, each with its own
deadline and retries; while there are any, the record's deadline is the earliest of theirs and the
state's own (kept under :data:`OWN_DEADLINE_META`).

Everything here reads and builds metadata only: the saga engine (``_saga_engine``) decides what a
message does, and commits it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from ._saga import COMPENSATION_META, LateUndo, SagaDefinition, backoff_wait
from ._store import SagaRecord

#: In a saga's metadata: what it stopped waiting for without getting it (requests, by id, and
#: events), kept while a state's ``late=`` (or a step's compensation) says how to undo a late success
AWAITED_META = "awaited"
#: In a saga's metadata: the compensations of late successes in flight, each with its own deadline
LATE_META = "late"
#: In a saga's metadata, while late compensations are in flight: the state's own deadline (the
#: record's deadline is the earliest of it and theirs)
OWN_DEADLINE_META = "own_deadline"


# -- what the saga stopped waiting for -------------------------------------------------------------


def left_unanswered(
    d: SagaDefinition,
    previous: str,
    left: Mapping[str, Any],
    answered: tuple[str, bool] | None,
    taken: str | None,
    now: float,
) -> list[dict[str, Any]]:
    """What a saga leaving ``previous`` waited for and did not get, where a late success would need
    undoing: the ids of its request (all attempts but the one that answered; ``counted`` when one
    succeeded) and the events its ``late=`` names, but the one that moved it."""
    if previous not in d.states:
        return []
    undoes = d.late.get(previous, {})
    out: list[dict[str, Any]] = []
    request_type = left.get("type")
    if left and (request_type in undoes or previous in d.undo_states):
        counted = answered is not None and answered[1]
        for request_id in (left["id"], *(left.get("superseded") or ())):
            if answered is None or request_id != answered[0]:
                out.append({"id": request_id, "state": previous, "what": request_type, "counted": counted, "at": now})
    for what in undoes:
        if what != request_type and what != taken:
            out.append({"id": None, "state": previous, "what": what, "counted": False, "at": now})
    return out


def _is(entry: Mapping[str, Any], request_id: str | None, what: str | None) -> bool:
    """Whether an awaited ``entry`` is the request ``request_id`` (or, for an event, of type ``what``)."""
    return (request_id is not None and entry.get("id") == request_id) or (
        what is not None and entry.get("id") is None and entry.get("what") == what
    )


def awaited(meta: Mapping[str, Any], *, request_id: str | None = None, what: str | None = None) -> Any:
    """The latest thing the saga stopped waiting for with this request id (or, for an event, type)."""
    for entry in reversed(meta.get(AWAITED_META) or ()):
        if _is(entry, request_id, what):
            return entry
    return None


def awaited_but(meta: Mapping[str, Any], *, request_id: str | None = None, what: str | None = None) -> list[Any]:
    """What the saga stopped waiting for, but every entry with this request id (or, for an event, type)."""
    return [e for e in meta.get(AWAITED_META) or () if not _is(e, request_id, what)]


# -- which steps are undone ------------------------------------------------------------------------


def mark_undone(meta: Mapping[str, Any], step: str) -> dict[str, list[str]]:
    """The compensation metadata with ``step`` undone (and no longer listed as not undone)."""
    compensation = meta.get(COMPENSATION_META) or {}
    undone = list(compensation.get("undone", ()))
    return {
        "undone": undone if step in undone else [*undone, step],  # (in the order first undone)
        "not_undone": [s for s in compensation.get("not_undone", ()) if s != step],
    }


def mark_not_undone(meta: Mapping[str, Any], step: str) -> dict[str, list[str]]:
    """The compensation metadata with ``step`` not undone, last (a step undone before is in place again)."""
    compensation = meta.get(COMPENSATION_META) or {}
    return {
        "undone": [s for s in compensation.get("undone", ()) if s != step],
        "not_undone": [*(s for s in compensation.get("not_undone", ()) if s != step), step],
    }


# -- the compensations of late successes -----------------------------------------------------------


def late_compensation(
    request_id: str, request_type: str, body: str, state: str, what: str, undo: LateUndo, now: float, rng: random.Random
) -> dict[str, Any]:
    """The entry of a late success's compensation, just sent (attempt 1) as ``request_id``."""
    return {
        "id": request_id,
        "type": request_type,
        "body": body,
        "state": state,
        "what": what,
        "step": undo.step,
        "sent_at": now,
        "attempts": 1,
        "timeout": undo.timeout,
        "retries": undo.retries,
        "backoff": undo.backoff,
        "due": now + undo.deadline_after(1, rng),
    }


def spent(entry: Mapping[str, Any]) -> bool:
    """Whether a late success's compensation has been sent as often as its retries allow."""
    return int(entry["attempts"]) >= int(entry["retries"]) + 1


def sent_again(entry: Mapping[str, Any], now: float, rng: random.Random) -> dict[str, Any]:
    """The entry of a late success's compensation sent once more, now, with its next deadline."""
    attempt = int(entry["attempts"]) + 1
    wait = backoff_wait(float(entry["timeout"]), float(entry["backoff"]), attempt, rng)
    return dict(entry, attempts=attempt, due=now + wait)


def late_but(meta: Mapping[str, Any], request_id: str) -> list[Any]:
    """The late compensations in flight, but the one sent as ``request_id``."""
    return [e for e in meta.get(LATE_META) or () if e["id"] != request_id]


# -- deadlines -------------------------------------------------------------------------------------


def own_deadline(record: SagaRecord) -> float | None:
    """The deadline of the saga's state (not of a late success's compensation)."""
    if record.meta.get(LATE_META):
        own = record.meta.get(OWN_DEADLINE_META)
        return None if own is None else float(own)
    return record.deadline


def set_deadline(record: SagaRecord, own: float | None) -> None:
    """Set the record's deadline: the state's own (``own``), or a late compensation's if earlier."""
    late = record.meta.get(LATE_META) or []
    if not late:
        record.meta.pop(OWN_DEADLINE_META, None)
        record.deadline = own
        return
    record.meta[OWN_DEADLINE_META] = own
    record.deadline = min([float(e["due"]) for e in late] + ([own] if own is not None else []))
