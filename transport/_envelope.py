"""The event envelope and its JSON codec.

Only JSON goes over the wire. The body of every message is one JSON object::

    {"id": "...", "type": "ocis.sharing.share_created", "source": "sharing",
     "time": "2026-11-27T01:02:03.456789Z", "correlation_id": "...", "causation_id": null,
     "headers": {"k": "v"}, "payload": {...}}

Decoding is strict: anything that is not exactly such an object is a :class:`DecodeError`, whose
reason travels with the message into the dead-letter queue.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from ._errors import DecodeError, EventTooLarge, InvalidEvent, InvalidEventName
from ._names import validate_event_name

CONTENT_TYPE = "application/json"
#: Default cap on the encoded size of one event: 1 MiB.
DEFAULT_MAX_EVENT_SIZE = 1024 * 1024
MAX_ID_LENGTH = 128
MAX_HEADERS = 64
MAX_HEADER_LENGTH = 1024

_FIELDS = ("id", "type", "source", "time", "correlation_id", "causation_id", "headers", "payload")
_FIELD_SET = frozenset(_FIELDS)
# ASCII output: every string, lone surrogates included, survives the round trip as an escape.
_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


# Strict JSON: NaN, Infinity and numbers that overflow to inf are refused, so that whatever decodes
# can be encoded again.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


#: Ids drawn ahead, from one read of the OS's random source. ``os.urandom`` releases the GIL: one call per
#: event let a busy worker thread take the interpreter from the publishing one at every event, for up to
#: the switch interval (5 ms). ``deque`` appends and pops are atomic, so threads share the pool safely.
_ids: deque[str] = deque()
_IDS_PER_READ = 256
# A forked child must not hand out the ids its parent will hand out too.
os.register_at_fork(after_in_child=_ids.clear)


def new_id() -> str:
    """A new random event id: 128 random bits as 32 hex digits (the form of ``uuid.uuid4().hex``)."""
    try:
        return _ids.popleft()
    except IndexError:
        digits = os.urandom(16 * _IDS_PER_READ).hex()
        _ids.extend([digits[i : i + 32] for i in range(32, len(digits), 32)])
        return digits[:32]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: a name, a JSON-object payload and the metadata that ties it to other events.

    ``correlation_id`` groups every event of one piece of work (it defaults to the event's own id);
    ``causation_id`` is the id of the event this one reacts to, if any.
    """

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=_now)
    correlation_id: str = ""
    causation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.type, str):
            _checked_name(self.type)
        else:
            validate_event_name(self.type)  # raises, saying what a name must be
        if type(self.payload) is not dict and not isinstance(self.payload, Mapping):
            raise InvalidEvent(f"the payload must be a JSON object (a mapping), not {type(self.payload).__name__}")
        _check_id("id", self.id)
        if not isinstance(self.source, str):
            raise InvalidEvent("source must be a str (the name of the publishing service)")
        if not self.correlation_id:
            object.__setattr__(self, "correlation_id", self.id)
        _check_id("correlation_id", self.correlation_id)
        if self.causation_id is not None:
            _check_id("causation_id", self.causation_id)
        if not isinstance(self.time, datetime) or self.time.tzinfo is None:
            raise InvalidEvent("time must be a timezone-aware datetime")
        if self.time.utcoffset():
            try:
                object.__setattr__(self, "time", self.time.astimezone(UTC))
            except OverflowError:
                raise InvalidEvent(f"time {self.time.isoformat()} is out of range in UTC") from None
        if self.headers or type(self.headers) is not dict:
            _check_headers(self.headers)

    def follow_up(
        self,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        source: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """A new event caused by this one: same correlation id, causation id set to this event's id."""
        return Event(
            type=type,
            payload=payload or {},
            source=source,
            correlation_id=self.correlation_id,
            causation_id=self.id,
            headers=headers or {},
        )

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON-ready dict."""
        return {
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "time": self.time.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z",
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "headers": dict(self.headers),
            "payload": self.payload,
        }


#: an application has few event names: check each once (an invalid one raises, and is not cached)
_checked_name = lru_cache(maxsize=4096)(validate_event_name)


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidEvent(f"{name} must be a printable, non-empty str of at most {MAX_ID_LENGTH} characters")


def _check_headers(headers: object) -> None:
    if not isinstance(headers, Mapping):
        raise InvalidEvent("headers must be a mapping of str to str")
    if len(headers) > MAX_HEADERS:
        raise InvalidEvent(f"at most {MAX_HEADERS} headers are allowed, got {len(headers)}")
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidEvent("headers must map str to str")
        if not k or len(k) > MAX_HEADER_LENGTH or len(v) > MAX_HEADER_LENGTH or not k.isprintable():
            raise InvalidEvent(f"header names must be printable and header values at most {MAX_HEADER_LENGTH} chars")


def encode(event: Event, max_size: int = DEFAULT_MAX_EVENT_SIZE) -> bytes:
    """Encode ``event`` to its JSON body. Raises :class:`EventTooLarge` past ``max_size`` bytes."""
    try:
        body = _encoder.encode(event.to_dict()).encode("ascii")
    except (TypeError, ValueError) as exc:
        at = _not_json_at(event.payload, "payload")
        where = f" (at {at})" if at else ""
        raise InvalidEvent(f"the payload of {event.type} is not JSON-serialisable{where}: {exc}") from exc
    if len(body) > max_size:
        raise EventTooLarge(
            f"event {event.type} encodes to {len(body)} bytes, over the limit of {max_size}"
            f"{_largest_field(event.payload)}; "
            "send a reference (a path or URL) instead of the data, or raise max_event_size"
        )
    return body


def _not_json_at(value: Any, path: str, depth: int = 0) -> str | None:
    """Where in ``value`` the first value JSON cannot hold is (``payload.result.when``), or None."""
    if depth > 100:
        return None
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} ({value!r})"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path} (a {type(key).__name__} key)"
            found = _not_json_at(item, f"{path}.{key}", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _not_json_at(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    return f"{path} (a {type(value).__name__})"


def _largest_field(payload: Mapping[str, Any]) -> str:
    """``; its largest field is payload.x (N bytes)``, for an event that is too large."""
    sizes = {key: len(_encoder.encode(value)) for key, value in payload.items()}
    if not sizes:
        return ""
    key = max(sizes, key=lambda k: sizes[k])
    return f"; its largest field is payload.{key} ({sizes[key]} bytes)"


def decode(body: bytes | str, content_type: str | None, max_size: int = DEFAULT_MAX_EVENT_SIZE) -> Event:
    """Decode and validate a message body. Raises :class:`DecodeError` with the reason."""
    if content_type != CONTENT_TYPE:
        raise DecodeError(f"content type {content_type!r} is not accepted; only {CONTENT_TYPE} is")
    if len(body) > max_size:
        raise DecodeError(f"message of {len(body)} bytes exceeds the limit of {max_size}")
    try:
        text = body.decode("utf-8") if isinstance(body, bytes | bytearray) else body
        data = _decoder.decode(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"body is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise DecodeError(f"body must be a JSON object, not {type(data).__name__}")
    if data.keys() != _FIELD_SET:
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            raise DecodeError(f"envelope is missing field(s): {', '.join(missing)}")
        extra = sorted(set(data) - _FIELD_SET)
        raise DecodeError(f"envelope has unknown field(s): {', '.join(extra[:5])}")
    for name in ("id", "type", "source", "time", "correlation_id"):
        if not isinstance(data[name], str):
            raise DecodeError(f"envelope field {name!r} must be a string")
    if data["causation_id"] is not None and not isinstance(data["causation_id"], str):
        raise DecodeError("envelope field 'causation_id' must be a string or null")
    if not isinstance(data["payload"], dict):
        raise DecodeError("envelope field 'payload' must be a JSON object")
    try:
        time = datetime.fromisoformat(data["time"])
    except ValueError:
        raise DecodeError(f"envelope field 'time' is not an ISO 8601 time: {data['time'][:64]!r}") from None
    if time.tzinfo is None:
        raise DecodeError("envelope field 'time' has no timezone")
    try:
        return Event(
            type=data["type"],
            payload=data["payload"],
            source=data["source"],
            id=data["id"],
            time=time,
            correlation_id=data["correlation_id"],
            causation_id=data["causation_id"],
            headers=data["headers"],
        )
    except (InvalidEvent, InvalidEventName) as exc:
        raise DecodeError(f"invalid envelope: {exc}") from None
