"""What travels on the wire between sagas and their participants, in one place.

- **Requests.** A saga in a state that sends a request publishes an event of the request's type
  (``ocis.antivirus.scan``), correlated by the saga's id, with the headers ``request_id`` (the
  request's own id) and ``saga_type``. A re-sent request keeps its id.
- **Replies.** A participant answers with an event of type ``<request type>.reply`` whose payload is
  ``{"ok": true, "result": {...}}`` or ``{"ok": false, "reason": "..."}``, with the same correlation
  id and both headers copied from the request.
- **Ids.** Every id the framework derives is a UUID 5 in a namespace of its own, from what makes the
  message unique, so a step that runs again sends the same ids and receivers' inboxes drop the repeats:
  a saga's request and events from (saga id, version, position); a reply from (request id, handler);
  a handler's follow-up from (event id, handler, position).
- **Triggers.** What moves a saga: a reply or a failure reply to one of its requests, a correlated
  event, its deadline, or an operator's compensate. A :class:`Trigger` is a value, never a string to
  parse; :attr:`Trigger.name` is the name the type's ``transitions`` machine knows it by.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transport import Event

from . import _tracing

#: Header of a request and its reply: the request's id (a reply to an older request is recognised).
REQUEST_ID_HEADER = "request_id"
#: Header of a request and its reply: the type of the saga that sent the request.
SAGA_TYPE_HEADER = "saga_type"
#: A reply's type is the request's type with this suffix.
REPLY_SUFFIX = ".reply"

_SAGA_IDS = uuid.UUID("0b5c8a4e-54c4-4f7e-9a0f-6a3d8f1f2e11")
_REPLY_IDS = uuid.UUID("7d0d2c8e-3f0a-4d7c-9d53-94a1c3b5e6f7")
_FOLLOW_UP_IDS = uuid.UUID("6f1c2a52-9d1e-4c55-8f55-0b1e0f6a9c21")


def name_id(namespace: uuid.UUID, name: str) -> str:
    """``uuid.uuid5(namespace, name).hex``, the same 32 hex digits (these ids must never change: a
    re-sent request, a redelivered reply, a worker of the next version all derive the same ones), at a
    third of the cost: without the UUID object between the hash and its hex form."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


class Kind(enum.StrEnum):
    """What kind of thing moves a saga."""

    REPLY = "reply"
    FAILURE = "failure"
    EVENT = "event"
    TIMEOUT = "timeout"
    COMPENSATE = "compensate"


@dataclass(frozen=True, slots=True)
class Trigger:
    """One thing that can move a saga: ``kind``, and for replies, failures and events the request or
    event type it concerns (``subject``)."""

    kind: Kind
    subject: str = ""

    @property
    def name(self) -> str:
        """The trigger's name in the saga type's ``transitions`` machine."""
        return f"{self.kind.value}:{self.subject}" if self.subject else self.kind.value

    def __str__(self) -> str:
        return self.name


TIMEOUT = Trigger(Kind.TIMEOUT)
COMPENSATE = Trigger(Kind.COMPENSATE)


def on_reply(request_type: str) -> Trigger:
    return Trigger(Kind.REPLY, request_type)


def on_failure(request_type: str) -> Trigger:
    return Trigger(Kind.FAILURE, request_type)


def on_event(event_type: str) -> Trigger:
    return Trigger(Kind.EVENT, event_type)


def reply_type(request_type: str) -> str:
    """The event type a participant replies with to a request of ``request_type``."""
    return request_type + REPLY_SUFFIX


# -- what a saga sends ---------------------------------------------------------------------------------


def request_event(
    saga_id: str,
    saga_type: str,
    version: int,
    request_type: str,
    payload: Mapping[str, Any],
    causation_id: str | None,
) -> Event:
    """The request a saga sends on entering a state at ``version`` (a stable id: the same transition
    applied again builds the same request)."""
    request_id = name_id(_SAGA_IDS, f"{saga_id}/{version}/request")
    return Event(
        type=request_type,
        payload=dict(payload),
        source=saga_type,
        correlation_id=saga_id,
        id=request_id,
        causation_id=causation_id,
        headers=_tracing.outgoing(request_type, request_id, {SAGA_TYPE_HEADER: saga_type}),
    )


def saga_event(
    saga_id: str,
    saga_type: str,
    version: int,
    index: int,
    event_type: str,
    payload: Mapping[str, Any],
    causation_id: str | None,
) -> Event:
    """The ``index``-th event a saga publishes in the transition to ``version`` (a stable id)."""
    event_id = name_id(_SAGA_IDS, f"{saga_id}/{version}/{index}")
    return Event(
        type=event_type,
        payload=payload,
        source=saga_type,
        id=event_id,
        correlation_id=saga_id,
        causation_id=causation_id,
        headers=_tracing.outgoing(event_type, event_id, {}),
    )


# -- what starts work from outside ---------------------------------------------------------------------


def start_event(type: str, payload: Mapping[str, Any], *, source: str, correlation_id: str = "") -> Event:
    """An event published from outside any handler or saga (``sagas publish``), traced as every event
    the framework builds: a PRODUCER span ``<type> publish``, child of the current span, whose context
    it carries (nothing is added while no tracer provider records)."""
    event = Event(type=type, payload=payload, source=source, correlation_id=correlation_id)  # (validated first)
    headers = _tracing.outgoing(type, event.id, {})
    if not headers:
        return event
    return Event(
        type=type,
        payload=payload,
        source=source,
        id=event.id,
        time=event.time,
        correlation_id=event.correlation_id,
        headers=headers,
    )


# -- what a participant sends --------------------------------------------------------------------------


def reply_event(
    request: Event,
    handler: str,
    source: str,
    *,
    ok: bool,
    result: Mapping[str, Any] | None = None,
    reason: str | None = None,
) -> Event:
    """The reply of ``handler`` (``service.name``) to a saga's request: a stable id (a repeat is
    recognised), the request id and saga type in its headers."""
    reply_id, kind = name_id(_REPLY_IDS, f"{request.id}/{handler}"), reply_type(request.type)
    headers = {REQUEST_ID_HEADER: request.id, SAGA_TYPE_HEADER: request.headers.get(SAGA_TYPE_HEADER, "")}
    return Event(
        type=kind,
        payload={"ok": ok, "result": dict(result) if result else None, "reason": reason},
        source=source,
        id=reply_id,
        correlation_id=request.correlation_id,
        causation_id=request.id,
        headers=_tracing.outgoing(kind, reply_id, headers),
    )


def follow_up_id(event_id: str, handler: str, index: int) -> str:
    """The id of the ``index``-th follow-up ``handler`` (``service.name``) publishes for ``event_id``."""
    return name_id(_FOLLOW_UP_IDS, f"{event_id}/{handler}/{index}")


# -- reading a reply -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A participant's reply as a saga reads it."""

    request_id: str
    ok: bool
    result: Mapping[str, Any]
    reason: str | None


def read_reply(event: Event) -> Reply:
    """What a reply says. A malformed one reads as a failure with a reason saying so."""
    ok = event.payload.get("ok") is True
    result = event.payload.get("result") if ok else None
    reason = None if ok else str(event.payload.get("reason") or "the participant failed")
    return Reply(
        request_id=str(event.headers.get(REQUEST_ID_HEADER, "")),
        ok=ok,
        result=result if isinstance(result, Mapping) else {},
        reason=reason,
    )


__all__ = [
    "COMPENSATE",
    "REPLY_SUFFIX",
    "REQUEST_ID_HEADER",
    "SAGA_TYPE_HEADER",
    "TIMEOUT",
    "Kind",
    "Reply",
    "Trigger",
    "follow_up_id",
    "on_event",
    "on_failure",
    "on_reply",
    "read_reply",
    "reply_event",
    "reply_type",
    "request_event",
    "saga_event",
    "start_event",
]
