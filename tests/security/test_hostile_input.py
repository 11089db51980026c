"""Hostile input, in one place: what a running worker does with every kind of bad message, on memory://
and on RabbitMQ.

Each test sends hostile messages to a worker that is stepped on the test thread (``Worker.run_until``),
so a crash fails the test with its own traceback. It checks the clear error (for calls) or the dead letter
and the reason it carries (for messages), that every message was acked (nothing is left to come back),
and that a good event sent right after is still handled. Some cases are also tested closer to their
code (tests/transport/test_envelope.py for the decoder, tests/sagas/test_saga_engine.py for the engine,
tests/sagas/test_delivery_conformance.py for a first set of hostile bodies); this module is the index.

What the framework does with AMQP headers and properties (docs/security.md, "Hostile input"):

* Routing and handling go by the envelope, and the envelope's ``type`` must equal the routing key the
  message was published with. Headers never select a queue, a saga, a request or a content type.
* The framework's own ``x-sagas-*`` dead-letter headers are overwritten (or dropped) when it dead-letters
  a message; forged ones never redirect a replay.
* A forged attempt count is clamped to 1..1,000,000: it can only shorten that message's own retries.
* A ``compression`` header is refused before kombu can decompress anything (a zip bomb otherwise).
* Properties that are not UTF-8 (message id, content type, ...) are refused instead of crashing the
  connection's frame reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import amqp
import kombu.message
import kombu.serialization
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection

from sagas import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    App,
    Context,
    Event,
    EventBus,
    MemoryStore,
    Retry,
    Service,
    Start,
    Step,
    StepSaga,
    Store,
    Worker,
    configure_logging,
)
from sagas._cli import main
from sagas._protocol import REQUEST_ID_HEADER, SAGA_TYPE_HEADER
from transport import (
    ATTEMPT_HEADER,
    CONTENT_TYPE,
    DEFAULT_MAX_EVENT_SIZE,
    DeadLetter,
    DecodeError,
    EventTooLarge,
    InvalidEvent,
    InvalidEventName,
    _memory,
    decode,
    encode,
)
from transport._deadletters import (
    DL_ATTEMPTS,
    DL_DEAD_AT,
    DL_ERROR_MESSAGE,
    DL_ERROR_TYPE,
    DL_QUEUE,
    DL_REASON,
    DL_ROUTING_KEY,
    DL_TRACEBACK,
)

SHARE = "ocis.sharing.share_created"
VICTIM = "ocis.victim.notified"
FAST = Retry(attempts=3, initial=0.05, factor=2.0)
UNDECODABLE = "undecodable message: "


# -- raw publishing ------------------------------------------------------------------------------------


def send_raw(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    content_type: str | bytes | None = CONTENT_TYPE,
    headers: dict[Any, Any] | None = None,
    **properties: Any,
) -> None:
    """Publish ``body`` as it is, with any content type, headers and properties (bytes included), bypassing
    the envelope codec and kombu's serializers: what a hostile publisher can do."""
    props: dict[str, Any] = {"delivery_mode": 2, **properties}
    if url.startswith("memory://"):
        # kombu's Connection is unannotated.
        with Connection("memory://", transport=_memory.Transport) as conn:  # type: ignore[no-untyped-call]
            ch = conn.channel()
            message = ch.prepare_message(body, content_type=content_type, headers=dict(headers or {}), properties=props)
            ch.basic_publish(message, exchange=exchange, routing_key=routing_key)
        return
    if content_type is not None:
        props["content_type"] = content_type
    props["application_headers"] = dict(headers or {})
    with Connection(url) as conn:  # type: ignore[no-untyped-call]
        ch = conn.channel()  # py-amqp's own channel: properties go on the wire as given
        ch.basic_publish(amqp.Message(body, **props), exchange=exchange, routing_key=routing_key)
        ch.close()


def envelope(**changes: Any) -> dict[str, Any]:
    """A valid envelope of a SHARE event as a dict, with ``changes`` applied (``...`` deletes a field)."""
    data: dict[str, Any] = json.loads(encode(Event(SHARE, {"share_id": "s-1"}, source="sharing")))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


def body_of(data: object) -> bytes:
    return json.dumps(data).encode()


# -- a worker with its acks and dead letters recorded ---------------------------------------------------


@dataclass
class Rig:
    """A worker stepped on the test thread, a bus to publish with, and what the worker acked and
    dead-lettered (message ids and reasons), recorded at the worker's bus."""

    url: str
    exchange: str
    worker: Worker
    publisher: EventBus
    handled: list[Event]
    acked: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def until(self, predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
        """Step the worker until ``predicate()``; a crash of the worker raises here."""
        if not self.worker.run_until(lambda: bool(predicate()), timeout):
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def send(
        self,
        routing_key: str,
        body: bytes,
        content_type: str | bytes | None = CONTENT_TYPE,
        headers: dict[Any, Any] | None = None,
        **properties: Any,
    ) -> None:
        send_raw(self.url, self.exchange, routing_key, body, content_type, headers, **properties)

    def dead_lettered(self, count: int) -> None:
        self.until(lambda: len(self.reasons) >= count, f"{count} dead letter(s)")

    def letters(self) -> dict[str, DeadLetter]:
        """The dead-letter queue's contents (browsed; they stay), by message id."""
        return {d.id: d for d in self.publisher.dead_letters()}

    def still_handles(self, event_type: str = SHARE) -> Event:
        """Publish a good event and wait until the handler got it: nothing else was lost or blocked."""
        good = Event(event_type, {"good": True})
        self.publisher.publish(good)
        self.until(lambda: good.id in self.acked, "a good event sent after the hostile ones to be handled")
        assert any(e.id == good.id for e in self.handled)
        return good


@contextlib.contextmanager
def rig(buses: list[object], url: str, app: App, handled: list[Event], store: Store | None = None) -> Iterator[Rig]:
    bus = EventBus(url, exchange=app.exchange)
    worker = Worker(app, broker=url, store=store or MemoryStore(), bus=bus, timer_interval=0.05)
    r = Rig(url, app.exchange, worker, EventBus(url, exchange=app.exchange), handled)
    buses += [worker, r.publisher]
    ack, ack_many, dead_letter = bus.ack, bus.ack_many, bus.dead_letter
    singly: list[Any] = []

    def recording_ack(inbound: Any) -> None:
        first = not inbound.acked
        ack(inbound)
        if first:
            r.acked.append(inbound.message_id)
            singly.append(inbound)

    def recording_ack_many(inbounds: Any) -> None:
        # one multiple ack covers a run of them without ack(); ack_many acks the rest through ack()
        fresh = [i for i in inbounds if not i.acked]
        singly.clear()
        ack_many(inbounds)
        r.acked.extend(i.message_id for i in fresh if i.acked and not any(i is s for s in singly))

    def recording_dead_letter(inbound: Any, reason: str, error: BaseException | None = None) -> None:
        dead_letter(inbound, reason, error)
        r.reasons.append(reason)

    bus.ack = recording_ack  # type: ignore[method-assign]
    bus.ack_many = recording_ack_many  # type: ignore[method-assign]
    bus.dead_letter = recording_dead_letter  # type: ignore[method-assign]
    worker.start()
    try:
        yield r
    finally:
        worker.shutdown()


def mailer(exchange: str, handled: list[Event], *, delivery: str = AT_LEAST_ONCE) -> App:
    """Service ``mailer`` (handler ``send`` on SHARE) and service ``victim`` (handler ``inbox`` on VICTIM),
    whose queue forged headers try to reach."""
    svc, victim = Service("mailer"), Service("victim")
    retry = FAST if delivery == AT_LEAST_ONCE else None
    svc.on(SHARE, name="send", delivery=delivery, retry=retry)(handled.append)
    victim.on(VICTIM, name="inbox")(handled.append)
    return App(svc, victim, exchange=exchange)


def assert_dead(r: Rig, expected: dict[str, str], queue: str) -> None:
    """Each message id in ``expected`` is in the dead-letter queue, from ``queue``, with a reason that
    contains the given text; each was acked on its queue; none reached a handler."""
    letters = r.letters()
    for mid, text in expected.items():
        assert mid in letters, f"{mid} was not dead-lettered"
        letter = letters[mid]
        assert text in letter.reason, (mid, letter.reason)
        assert letter.reason.startswith(UNDECODABLE), letter.reason
        assert letter.queue == queue
        assert mid in r.acked
    assert r.handled == []


# -- invalid JSON --------------------------------------------------------------------------------------

INVALID_JSON = [
    (b"", "not valid UTF-8 JSON"),
    (b'{"id": "x", "type": ', "not valid UTF-8 JSON"),
    (b"{'id': 'x'}", "not valid UTF-8 JSON"),
    (b'{"a": 1} {"b": 2}', "not valid UTF-8 JSON"),
    (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
    ("{}".encode("utf-16"), "not valid UTF-8 JSON"),
    (json.dumps(envelope(payload={"n": 1})).replace('"n": 1', '"n": NaN').encode(), "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object, not list"),
    (b'"text"', "must be a JSON object, not str"),
    (b"null", "must be a JSON object, not NoneType"),
    (b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize("delivery", [AT_LEAST_ONCE, AT_MOST_ONCE])
def test_invalid_json_is_dead_lettered_with_the_reason(
    broker_url: str, unique: str, buses: list[object], delivery: str
) -> None:
    """Bodies that are not a JSON object (truncated, not UTF-8, NaN, a list, nested too deeply) are
    dead-lettered with the parser's reason, on both delivery modes, and the next good event is handled."""
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled, delivery=delivery), handled) as r:
        for i, (body, _) in enumerate(INVALID_JSON):
            r.send(SHARE, body, message_id=f"bad-{i}")
        r.dead_lettered(len(INVALID_JSON))
        assert_dead(r, {f"bad-{i}": text for i, (_, text) in enumerate(INVALID_JSON)}, f"{unique}.mailer.send")
        r.still_handles()


# -- non-JSON content types, pickle ------------------------------------------------------------------


UNPICKLED: list[str] = []


def _record_unpickling(marker: str) -> str:
    UNPICKLED.append(marker)
    return marker


class _Tripwire:
    """Unpickling this object records it (it would run any callable)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_unpickling, ("unpickled",))


CONTENT_TYPES = [
    ("pickle", pickle.dumps(_Tripwire()), "application/x-python-serialize"),
    ("pickle-of-envelope", pickle.dumps(envelope()), "application/x-python-serialize"),
    ("yaml", b"!!python/object/apply:os.system ['true']", "application/x-yaml"),
    ("msgpack", b"\x81\xa2id\xa1x", "application/x-msgpack"),
    ("text", body_of(envelope()), "text/plain"),
    ("with-charset", body_of(envelope()), "application/json; charset=utf-8"),
    ("upper-case", body_of(envelope()), "APPLICATION/JSON"),
    ("none", body_of(envelope()), None),
]


def test_non_json_content_types_are_never_deserialised(
    broker_url: str, unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickle (application/x-python-serialize), YAML, msgpack or any content type but exactly
    application/json is dead-lettered by its content type; nothing is ever unpickled or handed to kombu's
    serializers, even when the body is a valid envelope."""

    def refuse(*args: object, **kwargs: object) -> object:
        pytest.fail("a message body was deserialised by pickle or kombu's serializer registry")

    for target, name in (
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (kombu.serialization, "loads"),
        (kombu.message, "loads"),
    ):
        monkeypatch.setattr(target, name, refuse)
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        for name, body, content_type in CONTENT_TYPES:
            r.send(SHARE, body, content_type, message_id=name)
        r.dead_lettered(len(CONTENT_TYPES))
        assert_dead(
            r,
            {name: f"content type {ct!r} is not accepted; only application/json is" for name, _, ct in CONTENT_TYPES},
            f"{unique}.mailer.send",
        )
        r.still_handles()
    assert UNPICKLED == []


# -- missing and mistyped envelope fields -------------------------------------------------------------

FIELD_CASES: list[tuple[dict[str, Any], str]] = [
    ({"id": ...}, "envelope is missing field(s): id"),
    ({"type": ..., "payload": ...}, "envelope is missing field(s): type, payload"),
    ({"headers": ...}, "envelope is missing field(s): headers"),
    ({"extra": 1, "__proto__": {}}, "envelope has unknown field(s): __proto__, extra"),
    ({"id": 42}, "envelope field 'id' must be a string"),
    ({"type": None}, "envelope field 'type' must be a string"),
    ({"source": ["x"]}, "envelope field 'source' must be a string"),
    ({"time": 1700000000}, "envelope field 'time' must be a string"),
    ({"correlation_id": {}}, "envelope field 'correlation_id' must be a string"),
    ({"causation_id": 7}, "envelope field 'causation_id' must be a string or null"),
    ({"payload": ["a"]}, "envelope field 'payload' must be a JSON object"),
    ({"payload": "text"}, "envelope field 'payload' must be a JSON object"),
    ({"headers": {"k": 1}}, "invalid envelope: headers must map str to str"),
    ({"headers": ["k"]}, "invalid envelope: headers must be a mapping"),
    ({"time": "yesterday"}, "envelope field 'time' is not an ISO 8601 time"),
    ({"time": "2026-11-27T01:02:03"}, "envelope field 'time' has no timezone"),
    ({"id": "x" * 129}, "invalid envelope: id must be a printable"),
    ({"id": ""}, "invalid envelope: id must be a printable"),
]


def test_missing_and_mistyped_envelope_fields_are_dead_lettered(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """An envelope with a missing, unknown or mistyped field is dead-lettered naming the field."""
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        for i, (changes, _) in enumerate(FIELD_CASES):
            r.send(SHARE, body_of(envelope(**changes)), message_id=f"field-{i}")
        r.dead_lettered(len(FIELD_CASES))
        assert_dead(r, {f"field-{i}": text for i, (_, text) in enumerate(FIELD_CASES)}, f"{unique}.mailer.send")
        r.still_handles()


def test_publishing_an_invalid_event_raises_a_clear_error(broker_url: str, unique: str, buses: list[object]) -> None:
    """Building or publishing an invalid event raises a typed error that says what is wrong, and a batch
    with one invalid event publishes none of it."""
    with pytest.raises(InvalidEventName, match=r"invalid event name 'Ocis\.Sharing'"):
        Event("Ocis.Sharing")
    with pytest.raises(InvalidEvent, match="payload must be a JSON object"):
        Event(SHARE, payload=["a"])  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="headers must map str to str"):
        Event(SHARE, headers={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidEvent, match="id must be a printable"):
        Event(SHARE, id="x" * 129)
    with pytest.raises(InvalidEvent, match="timezone-aware"):
        Event(SHARE, time=datetime(2026, 1, 1))
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        with pytest.raises(InvalidEvent, match=f"payload of {SHARE} is not JSON-serialisable"):
            r.publisher.publish(Event(SHARE, {"when": datetime.now(UTC)}))
        with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
            r.publisher.publish(Event(SHARE, {"x": float("nan")}))
        first = Event(SHARE, {"n": 1})
        with pytest.raises(InvalidEvent):
            r.publisher.publish_many([first, Event(SHARE, {"bad": {1, 2}})])
        good = r.still_handles()
    assert [e.id for e in handled] == [good.id]  # `first` was never sent


def test_cli_publish_of_an_invalid_event_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sagas publish` with an invalid name, an oversized payload or a payload that is not an object exits
    non-zero with a one-line error, not a traceback (tests/sagas/test_cli.py has more)."""
    cases = [
        (["Bad Name", "{}"], 2, "invalid event name 'Bad Name'"),
        (["ocis.a.b", json.dumps({"blob": "x" * DEFAULT_MAX_EVENT_SIZE})], 2, "over the limit of 1048576"),
        (["ocis.a.b", "[1]"], 2, "PAYLOAD must be a JSON object"),
    ]
    for args, code, text in cases:
        monkeypatch.setattr("sys.argv", ["sagas", "publish", *args, "--broker", "memory://"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == code, err
        assert text in err
        assert "Traceback" not in err


# -- oversized payloads -------------------------------------------------------------------------------


def test_oversized_events_are_refused_and_dead_lettered(broker_url: str, unique: str, buses: list[object]) -> None:
    """Publishing an event over max_event_size raises EventTooLarge; a raw 2 MiB body is dead-lettered
    before it is parsed; an event of exactly the limit is handled."""
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        with pytest.raises(EventTooLarge, match=f"over the limit of {DEFAULT_MAX_EVENT_SIZE}"):
            r.publisher.publish(Event(SHARE, {"blob": "x" * DEFAULT_MAX_EVENT_SIZE}))
        big = body_of(envelope(payload={"blob": "x" * (2 * 1024 * 1024)}))
        r.send(SHARE, big, message_id="two-mib")
        r.dead_lettered(1)
        assert_dead(
            r,
            {"two-mib": f"message of {len(big)} bytes exceeds the limit of {DEFAULT_MAX_EVENT_SIZE}"},
            f"{unique}.mailer.send",
        )
        assert r.letters()["two-mib"].size == len(big)
        empty = Event(SHARE, {"blob": ""})
        exact = dataclasses.replace(empty, payload={"blob": "x" * (DEFAULT_MAX_EVENT_SIZE - len(encode(empty)))})
        assert len(encode(exact)) == DEFAULT_MAX_EVENT_SIZE
        r.publisher.publish(exact)
        r.until(lambda: any(e.id == exact.id for e in handled), "the event of exactly the limit")
        r.still_handles()


def test_compressed_bodies_are_refused_before_they_are_inflated(
    broker_url: str, unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body with kombu's `compression` header (a zip bomb: 8 KiB that inflate to 8 MiB, or a compressed
    valid event) is dead-lettered as compressed. On RabbitMQ nothing is ever decompressed; memory:// is in
    process, where kombu inflates it before the framework sees it, and the framework still refuses it."""
    if not broker_url.startswith("memory://"):
        monkeypatch.setattr(
            kombu.message, "decompress", lambda *a, **k: pytest.fail("kombu decompressed a message body")
        )
    bomb = zlib.compress(b"{" + b" " * (8 * 1024 * 1024) + b"}", 9)
    assert len(bomb) < 16 * 1024
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        r.send(SHARE, bomb, headers={"compression": "application/x-gzip"}, message_id="bomb")
        r.send(
            SHARE,
            zlib.compress(encode(Event(SHARE))),
            headers={"compression": "application/x-gzip"},
            message_id="compressed-event",
        )
        r.dead_lettered(2)
        text = "compressed messages are not accepted (AMQP header 'compression' is 'application/x-gzip')"
        assert_dead(r, {"bomb": text, "compressed-event": text}, f"{unique}.mailer.send")
        if not broker_url.startswith("memory://"):
            assert r.letters()["bomb"].size == len(bomb)  # kept as it came, still compressed
        r.still_handles()


# -- event names and routing keys ---------------------------------------------------------------------

NAME_255 = "ocis.names." + "y" * (255 - len("ocis.names."))


def test_invalid_and_huge_event_names(broker_url: str, unique: str, buses: list[object]) -> None:
    """An invalid or over-255-character name cannot be built or published (InvalidEventName). A raw
    message whose `type` is invalid or too long, or whose routing key is not its type (invalid, or another
    valid name), is dead-lettered naming it; a 255-character name is the limit and is handled."""
    with pytest.raises(InvalidEventName, match="256 characters long; the limit is 255"):
        Event(NAME_255 + "z")
    with pytest.raises(InvalidEventName, match="invalid event name"):
        Event("ocis.files.Deleted")
    handled: list[Event] = []
    audit = Service("audit")
    audit.on("ocis.#", name="everything")(handled.append)
    with rig(buses, broker_url, App(audit, exchange=unique), handled) as r:
        at_limit = Event(NAME_255)
        r.send(NAME_255, encode(at_limit), message_id="at-limit")
        r.until(lambda: [e.id for e in handled] == [at_limit.id], "the 255-character event")
        handled.clear()
        cases = {
            "type-256": (
                "ocis.names.long",
                envelope(type=NAME_255 + "z"),
                "event name is 256 characters long; the limit is 255",
            ),
            "type-invalid": ("ocis.files.bad", envelope(type="Ocis.Files.Bad"), "invalid event name 'Ocis.Files.Bad'"),
            "rk-invalid": (
                "ocis.Files bad.x",
                envelope(type="ocis.files.x"),
                "routing key 'ocis.Files bad.x' does not match the event type 'ocis.files.x'",
            ),
            "rk-other-type": (
                "ocis.files.deleted",
                envelope(type="ocis.admin.wiped"),
                "routing key 'ocis.files.deleted' does not match the event type 'ocis.admin.wiped'",
            ),
        }
        for mid, (routing_key, data, _) in cases.items():
            r.send(routing_key, body_of(data), message_id=mid)
        expected = {mid: text for mid, (_, _, text) in cases.items()}
        rk_256 = NAME_255 + "z"
        if broker_url.startswith("memory://"):
            r.send(rk_256, body_of(envelope(type=rk_256)), message_id="rk-256")
            expected["rk-256"] = "event name is 256 characters long"
        else:
            with pytest.raises(Exception, match="ubyte format requires"):  # the client refuses: AMQP's limit
                r.send(rk_256, body_of(envelope(type=rk_256)), message_id="rk-256")
        r.dead_lettered(len(expected))
        assert_dead(r, expected, f"{unique}.audit.everything")
        r.still_handles("ocis.names.after")


# -- replies and start events for sagas ---------------------------------------------------------------

TRIP_REQUESTED, HOTEL, CAR = "ocis.trip.requested", "ocis.trip.book_hotel", "ocis.trip.rent_car"
PARCEL_SENT, SHIP = "ocis.parcel.sent", "ocis.parcel.ship"


class Trip(StepSaga):
    type = "trip"
    start = Start(TRIP_REQUESTED, key="trip_id")
    steps = [Step("hotel", HOTEL, timeout=120.0), Step("car", CAR, timeout=120.0)]


class Parcel(StepSaga):
    type = "parcel"
    start = Start(PARCEL_SENT, key="parcel_id")
    steps = [Step("ship", SHIP, timeout=120.0)]


def saga_app(exchange: str, requests: list[Event]) -> App:
    """Trip and Parcel sagas, and a participant that takes their requests and never answers: the tests
    answer (and forge answers) themselves."""
    desk = Service("desk")
    for request in (HOTEL, CAR, SHIP):
        desk.on(request, name=request.rsplit(".", 1)[1])(requests.append)
    return App(desk, sagas=[Trip, Parcel], exchange=exchange)


def reply_to(
    request: Event,
    ok: bool = True,
    *,
    request_id: str | None = None,
    correlation_id: str | None = None,
    reply_type: str | None = None,
) -> Event:
    """A participant's reply to ``request`` as a worker builds it, or a forged one."""
    return Event(
        type=reply_type or request.type + ".reply",
        payload={"ok": ok, "result": {} if ok else None, "reason": None if ok else "no"},
        source="desk",
        correlation_id=correlation_id or request.correlation_id,
        causation_id=request.id,
        headers={REQUEST_ID_HEADER: request_id or request.id, SAGA_TYPE_HEADER: "trip"},
    )


def request_of(requests: list[Event], saga_id: str, request_type: str) -> Event:
    return next(e for e in reversed(requests) if e.correlation_id == saga_id and e.type == request_type)


def snapshot(store: Store, saga_id: str) -> tuple[str, int, int]:
    record = store.get_saga(saga_id)
    assert record is not None
    return record.state, record.version, len(store.saga_history(saga_id))


@contextlib.contextmanager
def saga_rig(buses: list[object], url: str, unique: str) -> Iterator[tuple[Rig, MemoryStore, list[Event]]]:
    store, requests = MemoryStore(), list[Event]()
    with rig(buses, url, saga_app(unique, requests), requests, store=store) as r:
        yield r, store, requests


def start(
    r: Rig,
    store: Store,
    requests: list[Event],
    saga_type: str,
    event_type: str,
    key_field: str,
    key: str,
    first_request: str,
) -> str:
    r.publisher.publish(Event(event_type, {key_field: key}))
    r.until(
        lambda: (
            (s := store.find_saga(saga_type, key)) is not None
            and any(e.correlation_id == s.id and e.type == first_request for e in requests)
        ),
        f"saga {key}",
    )
    found = store.find_saga(saga_type, key)
    assert found is not None
    return found.id


def ignored_notes(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(e.get("reason")) for e in logs if e.get("event") == "message.ignored"]


def test_replies_for_unknown_and_finished_sagas_are_ignored_logged_and_acked(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A reply whose correlation id names no saga, and replies (repeated or new, success or failure) to a
    saga that has ended, are acked and logged as ignored with the reason; no saga changes, and the next
    real reply still moves its saga."""
    with saga_rig(buses, broker_url, unique) as (r, store, requests), structlog.testing.capture_logs() as logs:
        done = start(r, store, requests, "trip", TRIP_REQUESTED, "trip_id", "finished", HOTEL)
        r.publisher.publish(reply_to(request_of(requests, done, HOTEL)))
        r.until(lambda: any(e.correlation_id == done and e.type == CAR for e in requests), "the car request")
        last = reply_to(request_of(requests, done, CAR))
        r.publisher.publish(last)
        r.until(lambda: snapshot(store, done)[0] == "completed", "the trip to complete")
        before = snapshot(store, done)
        waiting = start(r, store, requests, "trip", TRIP_REQUESTED, "trip_id", "waiting", HOTEL)
        hotel = request_of(requests, waiting, HOTEL)
        hostile = [
            reply_to(hotel, correlation_id="f" * 32),  # no such saga
            reply_to(hotel, correlation_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex),
            last,  # the ended saga's last reply again (same id: the inbox knows it)
            reply_to(request_of(requests, done, CAR), ok=False),  # a new, late failure reply
            reply_to(request_of(requests, done, HOTEL)),  # a reply to a step the saga left long ago
        ]
        for event in hostile:
            r.publisher.publish(event)
        r.until(
            lambda: all(e.id in r.acked for e in hostile) and r.acked.count(last.id) == 2,
            "the hostile replies to be acked",
        )
        assert snapshot(store, done) == before
        assert snapshot(store, waiting)[0] == "hotel"
        notes = ignored_notes(logs)
        assert sum("reply for unknown saga" in n for n in notes) == 2
        assert sum(n.startswith("duplicate: ") for n in notes) == 1
        assert sum("late or duplicate reply" in n for n in notes) == 2
        assert r.reasons == []  # ignored, not dead-lettered
        r.publisher.publish(reply_to(hotel))
        r.until(lambda: snapshot(store, waiting)[0] == "car", "the real reply to move its saga")


def test_replies_pointing_at_another_saga_type_or_request_move_nothing(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A reply whose correlation id names a saga of another type, or whose request id is another saga's
    pending request, or that carries the right request id only in its AMQP headers (which are never
    read), is ignored and acked; every saga stays as it was, and the real replies still work."""
    with saga_rig(buses, broker_url, unique) as (r, store, requests), structlog.testing.capture_logs() as logs:
        trip = start(r, store, requests, "trip", TRIP_REQUESTED, "trip_id", "t1", HOTEL)
        other = start(r, store, requests, "trip", TRIP_REQUESTED, "trip_id", "t2", HOTEL)
        parcel = start(r, store, requests, "parcel", PARCEL_SENT, "parcel_id", "p1", SHIP)
        hotel, other_hotel, ship = (
            request_of(requests, trip, HOTEL),
            request_of(requests, other, HOTEL),
            request_of(requests, parcel, SHIP),
        )
        before = {s: snapshot(store, s) for s in (trip, other, parcel)}
        forged = [
            # a parcel reply naming the trip and its real pending request: the parcel saga type ignores it
            reply_to(hotel, reply_type=SHIP + ".reply"),
            # a trip reply naming the parcel and the parcel's pending request
            reply_to(ship, reply_type=HOTEL + ".reply"),
            # the trip, with the other trip's pending request id
            reply_to(hotel, request_id=other_hotel.id),
        ]
        for event in forged:
            r.publisher.publish(event)
        in_headers = reply_to(hotel, request_id="0" * 32)
        r.send(
            in_headers.type,
            encode(in_headers),
            message_id=in_headers.id,
            headers={REQUEST_ID_HEADER: hotel.id, SAGA_TYPE_HEADER: "trip", "correlation_id": trip},
        )
        r.until(lambda: all(e.id in r.acked for e in [*forged, in_headers]), "the forged replies to be acked")
        assert {s: snapshot(store, s) for s in (trip, other, parcel)} == before
        notes = ignored_notes(logs)
        assert sum("reply for unknown saga" in n for n in notes) == 2
        assert sum("late or duplicate reply" in n for n in notes) == 2
        assert r.reasons == []
        r.publisher.publish_many([reply_to(hotel), reply_to(ship)])
        r.until(
            lambda: snapshot(store, trip)[0] == "car" and snapshot(store, parcel)[0] == "completed", "the real replies"
        )
        assert snapshot(store, other) == before[other]


def test_duplicate_start_events_start_exactly_one_saga(broker_url: str, unique: str, buses: list[object]) -> None:
    """The same start event five times and five other start events with the same key, taken by two workers
    on one store at once, start exactly one saga, which sends exactly one request; all are acked."""
    store, requests = MemoryStore(), list[Event]()
    with (
        rig(buses, broker_url, saga_app(unique, requests), requests, store=store) as r1,
        rig(buses, broker_url, saga_app(unique, requests), requests, store=store) as r2,
    ):
        same = Event(TRIP_REQUESTED, {"trip_id": "dup"})
        starts = [same] * 5 + [Event(TRIP_REQUESTED, {"trip_id": "dup", "n": i}) for i in range(5)]
        other = Event(TRIP_REQUESTED, {"trip_id": "other"})
        r1.publisher.publish_many([*starts, other])
        ids = {e.id for e in [*starts, other]}

        def settled() -> bool:
            acked = r1.acked + r2.acked
            return all(i in acked for i in ids) and len([a for a in acked if a == same.id]) == 5

        deadline = time.monotonic() + 20
        while not settled() or sum(e.type == HOTEL for e in requests) < 2:
            assert time.monotonic() < deadline, "timed out waiting for the start events to be acked"
            r1.worker.step(0.01)
            r2.worker.step(0.01)
        for _ in range(20):  # a little longer: no second saga, no second request
            r1.worker.step(0.01)
            r2.worker.step(0.01)
    assert sorted(s.key for s in store.list_sagas(saga_type="trip")) == ["dup", "other"]
    dup = store.find_saga("trip", "dup")
    assert dup is not None
    assert [e.correlation_id for e in requests if e.type == HOTEL].count(dup.id) == 1
    assert len(requests) == 2
    assert r1.reasons == r2.reasons == []


def test_hostile_messages_on_a_saga_queue(broker_url: str, unique: str, buses: list[object]) -> None:
    """On a saga type's queue, an undecodable message, and start events whose key is missing or not a
    usable string, are dead-lettered with the reason (and logged at warning); a good start event after
    them starts its saga."""
    with saga_rig(buses, broker_url, unique) as (r, store, requests), structlog.testing.capture_logs() as logs:
        r.send(TRIP_REQUESTED, b'{"id": "x", "type": ', message_id="truncated")
        values = (None, True, "", ["a"], {"k": "v"}, 7, 1.5, "k" * 1025)
        keyless = [Event(TRIP_REQUESTED, {"trip_id": value}) for value in values]
        keyless.append(Event(TRIP_REQUESTED, {"tripid": "m1"}))
        r.publisher.publish_many(keyless)
        r.dead_lettered(1 + len(keyless))
        letters = r.letters()
        letter = letters["truncated"]
        assert letter.reason.startswith(UNDECODABLE + "body is not valid UTF-8 JSON")
        assert letter.queue == f"{unique}.saga.trip"
        for event in keyless:
            assert letters[event.id].reason.startswith("saga trip refused it: start event without a usable key: ")
            assert letters[event.id].queue == f"{unique}.saga.trip"
        assert "the payload has no 'trip_id'" in letters[keyless[-1].id].reason
        assert '(send it as the string "7")' in letters[keyless[5].id].reason
        assert "1025 bytes long in UTF-8; the limit is 1024" in letters[keyless[7].id].reason
        dead = [e for e in logs if e["event"] == "message.dead_lettered" and e["log_level"] == "warning"]
        refused = [e for e in dead if e.get("kind") == "refused"]
        assert sorted(e["event_id"] for e in refused) == sorted(e.id for e in keyless)
        assert [e["message_id"] for e in dead if "kind" not in e] == ["truncated"]
        assert store.list_sagas() == []
        start(r, store, requests, "trip", TRIP_REQUESTED, "trip_id", "good", HOTEL)


# -- header injection ---------------------------------------------------------------------------------


def test_forged_dead_letter_headers_are_overwritten_and_never_redirect_a_replay(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A message whose AMQP headers claim the framework's x-sagas-* dead-letter fields and an x-death
    pointing at another service's queue is dead-lettered with the framework's own queue, reason, routing
    key, attempt count and no error fields; replaying it puts it back on its real queue only. A good
    event with the same forged headers is simply handled."""
    victim_queue = f"{unique}.victim.inbox"
    forged = {
        DL_QUEUE: victim_queue,
        DL_REASON: "forged reason",
        DL_ERROR_TYPE: "forged.Error",
        DL_ERROR_MESSAGE: "forged message",
        DL_TRACEBACK: "forged traceback",
        DL_ATTEMPTS: 99,
        DL_DEAD_AT: "1970-01-01T00:00:00+00:00",
        DL_ROUTING_KEY: VICTIM,
        "x-death": [{"queue": victim_queue, "reason": "delivery_limit", "routing-keys": [VICTIM], "count": 1}],
        "x-first-death-queue": victim_queue,
    }
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        r.send(SHARE, b"not json", headers=forged, message_id="forged")
        r.dead_lettered(1)
        letter = r.letters()["forged"]
        assert letter.queue == f"{unique}.mailer.send"
        assert letter.reason == UNDECODABLE + "body is not valid UTF-8 JSON: Expecting value: line 1 column 1 (char 0)"
        assert letter.routing_key == SHARE
        assert (letter.error_type, letter.error_message, letter.traceback) == ("", "", "")
        assert letter.attempts == 1
        assert letter.dead_at != forged[DL_DEAD_AT]
        assert r.publisher.replay_dead(["forged"]) == ["forged"]
        r.dead_lettered(2)  # back on its own queue, and dead-lettered from there again
        (again,) = r.letters().values()
        assert (again.id, again.queue, again.routing_key) == ("forged", f"{unique}.mailer.send", SHARE)
        good = Event(SHARE, {"n": 1})
        r.send(SHARE, encode(good), headers=forged, message_id=good.id)
        r.until(lambda: good.id in r.acked, "the good event with forged headers")
        assert [e.id for e in handled] == [good.id]
        handled.clear()
        r.still_handles()


@pytest.mark.parametrize(
    ("headers", "attempts"),
    [
        ({ATTEMPT_HEADER: -5}, [1, 2]),
        ({ATTEMPT_HEADER: 0}, [1, 2]),
        ({ATTEMPT_HEADER: "abc"}, [1, 2]),
        ({ATTEMPT_HEADER: b"\xff"}, [1, 2]),
        ({ATTEMPT_HEADER: 3.7}, [1, 2]),
        ({ATTEMPT_HEADER: [1]}, [1, 2]),
        ({"x-delivery-count": -9}, [1, 2]),
        ({ATTEMPT_HEADER: 2**63 - 1, "x-delivery-count": 2**63 - 1}, [1_000_000]),
    ],
    ids=["negative", "zero", "text", "bytes", "float", "list", "negative-delivery-count", "int64-max"],
)
def test_a_forged_attempt_count_never_breaks_retries(
    broker_url: str, unique: str, buses: list[object], headers: dict[str, Any], attempts: list[int]
) -> None:
    """A forged x-sagas-attempt or x-delivery-count header is clamped to 1..1,000,000: a failing handler's
    message is retried through the delay levels that exist (a negative count crashed the worker), or, with
    a huge count, dead-lettered at its first failure; it is never lost and the worker keeps going."""
    seen: list[int] = []
    handled: list[Event] = []
    svc = Service("mailer")

    @svc.on(SHARE, name="send", retry=FAST)
    def send(event: Event, ctx: Context) -> None:
        if event.payload.get("flaky"):
            seen.append(ctx.attempt)
            if len(seen) == 1:
                raise ConnectionError("smtp is down")
        handled.append(event)

    with rig(buses, broker_url, App(svc, exchange=unique), handled) as r:
        flaky = Event(SHARE, {"flaky": True})
        r.send(SHARE, encode(flaky), headers=headers, message_id=flaky.id)
        r.until(lambda: flaky.id in r.acked and (len(seen) == len(attempts)), "the flaky event to settle")
        if attempts == [1_000_000]:
            r.dead_lettered(1)
            letter = r.letters()[flaky.id]
            assert letter.attempts == 1_000_000
            assert letter.error_message == "smtp is down"
        else:
            r.until(lambda: any(e.id == flaky.id for e in handled), "the retried event")
            assert r.reasons == []
        assert seen == attempts
        r.still_handles()


def test_junk_x_death_headers_do_not_break_listing_or_replay(broker_url: str, unique: str, buses: list[object]) -> None:
    """Letters put straight into the dead-letter queue with malformed x-death headers (not a list, a list
    of junk, wrong types inside) are listed and skipped by replay instead of crashing `sagas dead ls`."""
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        junk: dict[str, dict[str, Any]] = {
            "not-a-list": {"x-death": "queue=x"},
            "list-of-junk": {"x-death": ["junk", 5], DL_ROUTING_KEY: ""},
            "wrong-types": {"x-death": [{"queue": ["x"], "reason": 7, "routing-keys": 7}], DL_ROUTING_KEY: ""},
            "empty": {"x-death": []},
        }
        for mid, headers in junk.items():
            send_raw(broker_url, "", f"{unique}.dead", b"{}", headers=headers, message_id=mid)
        letters = r.letters()
        assert set(letters) == set(junk)
        assert letters["list-of-junk"].routing_key == ""
        assert letters["wrong-types"].queue == "['x']"
        skipped: dict[str, str] = {}
        assert r.publisher.replay_dead(skipped=skipped) == []
        assert set(skipped) == set(junk)
        r.still_handles()


def test_crlf_and_odd_header_values_are_data_never_log_lines(
    broker_url: str, unique: str, buses: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    """CR/LF in AMQP header names and values and in the message id is carried as data: the event is
    handled, envelope header values keep it verbatim, and every log line stays one line (JSON lines parse,
    forged lines never appear). CR/LF where the envelope wants printable text is dead-lettered."""
    configure_logging(json=True, level="debug")  # into capsys's stderr: reset before the fixtures' teardown
    try:
        _send_crlf(broker_url, unique, buses)
    finally:
        structlog.reset_defaults()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert record.get("event") != "forged.line", line
    assert any("forged.line" in line for line in lines)  # it was logged, inside a value


def _send_crlf(broker_url: str, unique: str, buses: list[object]) -> None:
    forged_line = '\n{"event": "forged.line", "level": "error"}\r\n2026-01-01 [error    ] forged.line'
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        carried = Event(SHARE, {"n": 1}, headers={"note": "line1\r\nX-Forged: 1" + forged_line})
        r.send(
            SHARE,
            encode(carried),
            headers={"x-evil": "a\r\nb" + forged_line, "x-evil\r\nname": "v"},
            message_id=carried.id,
        )
        r.until(lambda: [e.id for e in handled] == [carried.id], "the event with CR/LF in its headers")
        assert handled[0].headers == carried.headers
        handled.clear()
        bad = {
            "crlf-header-name": envelope(headers={"a\r\nb": "v"}),
            "crlf-id": envelope(id="x\r\ny"),
        }
        for mid, data in bad.items():
            r.send(SHARE, body_of(data), message_id=mid + forged_line)
        r.dead_lettered(2)
        letters = r.letters()
        assert "header names must be printable" in letters["crlf-header-name" + forged_line].reason
        assert "id must be a printable" in letters["crlf-id" + forged_line].reason
        r.still_handles()


def test_header_claiming_a_content_type_is_ignored(
    broker_url: str, unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the content-type property counts: a JSON event whose headers claim pickle is handled as JSON,
    and a pickle whose headers claim JSON is dead-lettered by its real content type, never unpickled."""
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a pickle body was unpickled"))
    claims_pickle = {
        "content-type": "application/x-python-serialize",
        "content_type": "application/x-python-serialize",
        "Content-Type": "application/x-python-serialize",
        "serializer": "pickle",
    }
    claims_json = {"content-type": CONTENT_TYPE, "content_type": CONTENT_TYPE, "Content-Type": CONTENT_TYPE}
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        event = Event(SHARE, {"n": 1})
        r.send(SHARE, encode(event), CONTENT_TYPE, headers=claims_pickle, message_id=event.id)
        r.until(lambda: [e.id for e in handled] == [event.id], "the JSON event whose headers claim pickle")
        handled.clear()
        r.send(
            SHARE, pickle.dumps(_Tripwire()), "application/x-python-serialize", headers=claims_json, message_id="pickle"
        )
        r.dead_lettered(1)
        assert_dead(
            r, {"pickle": "content type 'application/x-python-serialize' is not accepted"}, f"{unique}.mailer.send"
        )
        r.still_handles()
    assert UNPICKLED == []


EXOTIC_HEADERS: dict[str, Any] = {
    "bytes": b"\xff\xfe\x00",
    "nested": {"a": {"b": [1, "x", None, True]}},
    "decimal": Decimal("1.5"),
    "big": 2**63 - 1,
    "small": -(2**63),
    "float": 1e308,
    "none": None,
    "bool": False,
    "list": [b"\x00", 1.5],
    "time": datetime(2030, 1, 1, tzinfo=UTC),
    "": "empty name",
    "k" * 255: "longest name",
    "unicode-\u2603": "\u2603",
    "many": ["x" * 100] * 50,
}


def test_exotic_header_values_survive_retry_and_dead_letter_copies(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """Header values of every AMQP type (bytes that are not UTF-8, nested tables, decimals, 64-bit
    extremes, timestamps, empty and 255-character names) are copied through retries and into the
    dead-letter queue without breaking anything."""
    handled: list[Event] = []
    svc = Service("mailer")

    @svc.on(SHARE, name="send", retry=FAST)
    def send(event: Event) -> None:
        if event.payload.get("fail"):
            raise ValueError("always")
        handled.append(event)

    with rig(buses, broker_url, App(svc, exchange=unique), handled) as r:
        failing = Event(SHARE, {"fail": True})
        r.send(SHARE, encode(failing), headers=EXOTIC_HEADERS, message_id=failing.id)
        r.send(SHARE, b"not json", headers=EXOTIC_HEADERS, message_id="undecodable")
        r.dead_lettered(2)
        letters = r.letters()
        assert letters[failing.id].attempts == 3
        assert letters[failing.id].error_type == "builtins.ValueError"
        assert letters["undecodable"].reason.startswith(UNDECODABLE)
        r.still_handles()


def test_headers_too_big_to_copy_are_left_off_the_copies(broker_url: str, unique: str, buses: list[object]) -> None:
    """A message whose headers nearly fill an AMQP frame (128 KiB) is dead-lettered, or retried, with a copy
    that leaves the original headers off: the copy with the framework's headers added did not fit, RabbitMQ
    closed the connection, and that message and every one prefetched with it came back until the delivery
    limit dead-lettered them all. Nothing reconnects, and the events after it are handled."""
    big = {"big": "x" * 130_880}
    handled: list[Event] = []
    failed_once: list[str] = []
    svc = Service("mailer")

    @svc.on(SHARE, name="send", retry=FAST)
    def send(event: Event) -> None:
        if event.payload.get("flaky") and not failed_once:
            failed_once.append(event.id)
            raise ConnectionError("smtp is down")
        handled.append(event)

    with rig(buses, broker_url, App(svc, exchange=unique), handled) as r:
        r.send(SHARE, b"not json", headers=big, message_id="undecodable")
        flaky = Event(SHARE, {"flaky": True})
        r.send(SHARE, encode(flaky), headers=big, message_id=flaky.id)
        r.dead_lettered(1)
        r.until(lambda: any(e.id == flaky.id for e in handled), "the flaky event, retried without its headers")
        letter = r.letters()["undecodable"]
        assert letter.reason.startswith(UNDECODABLE)
        assert letter.routing_key == SHARE
        assert r.worker.reconnects == 0
        r.still_handles()


@pytest.mark.parametrize("broker_url", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True)
@pytest.mark.parametrize(
    "prop", ["message_id", "content_type", "content_encoding", "correlation_id", "reply_to", "type", "app_id"]
)
def test_properties_that_are_not_utf8_are_dead_lettered_not_a_crash(
    broker_url: str, unique: str, buses: list[object], prop: str
) -> None:
    """A message whose AMQP property (message id, content type, ...) is not UTF-8 on the wire is
    dead-lettered with the reason; py-amqp used to raise out of the frame reader, crashing the worker on
    every redelivery, and `sagas dead ls` on the letter. (RabbitMQ only: memory:// has no wire format.)"""
    handled: list[Event] = []
    with rig(buses, broker_url, mailer(unique, handled), handled) as r:
        properties: dict[str, Any] = {prop: b"\xff\xfe bad"}
        content_type = properties.pop("content_type", CONTENT_TYPE)
        r.send(SHARE, encode(Event(SHARE)), content_type, **properties)
        r.dead_lettered(1)
        (reason,) = r.reasons
        assert reason.startswith(UNDECODABLE + "its AMQP properties cannot be decoded (UnicodeDecodeError")
        (letter,) = r.letters().values()  # listing it works too
        assert letter.queue == f"{unique}.mailer.send"
        assert letter.reason == reason
        r.still_handles()


# -- fuzzing the whole receive path -------------------------------------------------------------------

_header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
_header_names = st.sampled_from(
    [
        ATTEMPT_HEADER,
        "x-delivery-count",
        DL_QUEUE,
        DL_REASON,
        DL_ERROR_TYPE,
        DL_ATTEMPTS,
        DL_ROUTING_KEY,
        "x-death",
        "compression",
        "content-type",
        REQUEST_ID_HEADER,
        SAGA_TYPE_HEADER,
    ]
) | st.text(max_size=12)
_bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda fail: encode(Event(SHARE, {"fail": fail})), st.booleans()),
    st.builds(lambda t: body_of(envelope(type=t)), st.text(max_size=20)),
)


def test_fuzz_any_headers_body_and_content_type_never_crash_the_worker(unique: str, buses: list[object]) -> None:
    """Arbitrary AMQP headers (the framework's own names included, with values of any type), arbitrary
    bodies and content types, sent to a worker on memory://: each message is handled or dead-lettered
    exactly once and acked, and the worker never crashes."""
    handled: list[Event] = []
    failed_once: set[str] = set()
    svc = Service("mailer")

    @svc.on(SHARE, name="send", retry=FAST)
    def send(event: Event) -> None:
        if event.payload.get("fail") and event.id not in failed_once:
            failed_once.add(event.id)
            raise ValueError("first time")
        handled.append(event)

    with rig(buses, "memory://", App(svc, exchange=unique), handled) as r:
        sent = [0]

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            headers=st.dictionaries(_header_names, _header_values, max_size=5),
            body=_bodies,
            content_type=st.sampled_from([CONTENT_TYPE, None, "", "application/x-python-serialize"]),
        )
        def one(headers: dict[str, Any], body: bytes, content_type: str | None) -> None:
            mid = f"fuzz-{sent[0]}"
            sent[0] += 1
            r.send(SHARE, body, content_type, headers=headers, message_id=mid)
            r.until(
                lambda: len({e.id for e in handled}) + len(r.reasons) == sent[0] and r.worker.idle,
                f"message {mid} to settle",
            )
            assert mid in r.acked

        one()
        r.still_handles()


# -- fuzzing the decoder (tests/transport/test_envelope.py fuzzes arbitrary bytes, text, JSON objects and
# -- near-envelopes under the JSON content type; these add other content types and corrupted envelopes)


@settings(max_examples=300)
@given(body=st.binary(max_size=256), content_type=st.none() | st.text(max_size=40) | st.binary(max_size=20))
def test_fuzz_decoder_refuses_every_content_type_but_json(body: bytes, content_type: str | bytes | None) -> None:
    """Under any content type but exactly application/json, any body is a DecodeError naming the type,
    before the body is looked at."""
    if content_type == CONTENT_TYPE:
        return
    with pytest.raises(DecodeError, match="is not accepted; only application/json is"):
        decode(body, content_type)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(
    event=st.builds(lambda p: Event(SHARE, {"k": p}), st.text(max_size=30)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3), st.integers(0, 3)), min_size=1, max_size=4),
)
def test_fuzz_decoder_on_corrupted_envelopes(event: Event, edits: list[tuple[int, bytes, int]]) -> None:
    """A valid envelope with bytes inserted, replaced or deleted decodes to an event that encodes again,
    or is a DecodeError with a reason; nothing else is ever raised."""
    body = bytearray(encode(event))
    for position, insert, delete in edits:
        at = position % (len(body) + 1)
        body[at : at + delete] = insert
    result: Event | DecodeError
    try:
        result = decode(bytes(body), CONTENT_TYPE)
    except DecodeError as exc:
        result = exc
    if isinstance(result, DecodeError):
        assert result.reason
    else:
        assert decode(encode(result), CONTENT_TYPE) == result
