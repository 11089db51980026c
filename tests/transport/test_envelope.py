"""The event envelope and its strict JSON codec (``transport._envelope``)."""

from __future__ import annotations

import json
import os
import pickle
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from transport import (
    CONTENT_TYPE,
    DEFAULT_MAX_EVENT_SIZE,
    DecodeError,
    Event,
    EventTooLarge,
    InvalidEvent,
    decode,
    encode,
    new_id,
)

FIELDS = ("id", "type", "source", "time", "correlation_id", "causation_id", "headers", "payload")

# --- strategies ----------------------------------------------------------------------------------

word = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(string.ascii_lowercase),
    st.text(string.ascii_lowercase + string.digits + "_", max_size=12),
)
event_names = st.lists(word, min_size=3, max_size=6).map(".".join)
printable = st.characters(categories=("L", "M", "N", "P", "S"))
ids = st.text(printable, min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)
payloads = st.dictionaries(st.text(), json_values, max_size=6)
headers = st.dictionaries(st.text(printable, min_size=1, max_size=20), st.text(max_size=40), max_size=5)
# Fixed offsets only: zoneinfo times in a DST fold or gap never compare equal across zones. One day is
# kept clear of each end of datetime's range so that every time has a UTC equivalent.
offsets = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59))
)
times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets | st.just(UTC))
events = st.builds(
    Event,
    type=event_names,
    payload=payloads,
    source=st.text(max_size=30),
    id=ids,
    time=times,
    correlation_id=st.just("") | ids,
    causation_id=st.none() | ids,
    headers=headers,
)


def envelope(**changes: Any) -> dict[str, Any]:
    """A valid envelope as a dict, with ``changes`` applied (a value of ``...`` deletes the field)."""
    data: dict[str, Any] = {
        "id": "0f1e2d3c",
        "type": "ocis.sharing.share_created",
        "source": "sharing",
        "time": "2026-11-27T01:02:03.456789Z",
        "correlation_id": "0f1e2d3c",
        "causation_id": None,
        "headers": {"tenant": "acme"},
        "payload": {"share_id": "s-1", "count": 3},
    }
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


def body_of(data: object) -> bytes:
    return json.dumps(data).encode("utf-8")


def reason_of(body: bytes | str, content_type: str | None = CONTENT_TYPE, **kwargs: Any) -> str:
    """Decode ``body``, which must fail, and return the DecodeError's reason."""
    with pytest.raises(DecodeError) as info:
        decode(body, content_type, **kwargs)
    assert isinstance(info.value.reason, str)
    assert info.value.reason == str(info.value)
    return info.value.reason


# --- round trip ----------------------------------------------------------------------------------


def test_valid_envelope_decodes() -> None:
    """The reference envelope decodes to an Event carrying every field."""
    decoded = decode(body_of(envelope()), CONTENT_TYPE)
    assert decoded == Event(
        type="ocis.sharing.share_created",
        payload={"share_id": "s-1", "count": 3},
        source="sharing",
        id="0f1e2d3c",
        time=datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC),
        correlation_id="0f1e2d3c",
        headers={"tenant": "acme"},
    )


@given(events)
def test_encode_then_decode_returns_an_equal_event(original: Event) -> None:
    """Every valid Event survives encode followed by decode unchanged."""
    assert decode(encode(original), CONTENT_TYPE) == original


@given(events)
def test_decode_accepts_the_body_as_str(original: Event) -> None:
    """decode also accepts the JSON body as a str."""
    assert decode(encode(original).decode("utf-8"), CONTENT_TYPE) == original


def test_encode_writes_time_as_utc_with_microseconds() -> None:
    """encode writes the time in UTC with a 'Z' suffix and microseconds, whatever the event's offset."""
    e = Event("a.b.c", time=datetime(2026, 1, 1, 3, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))))
    assert json.loads(encode(e))["time"] == "2026-01-01T01:00:00.000005Z"


@pytest.mark.parametrize("year", [1, 999])
def test_event_before_year_1000_round_trips(year: int) -> None:
    """An event dated before year 1000 encodes with a four-digit year and survives decode."""
    e = Event("a.b.c", time=datetime(year, 12, 31, tzinfo=UTC))
    body = encode(e)
    assert json.loads(body)["time"] == f"{year:04d}-12-31T00:00:00.000000Z"
    assert decode(body, CONTENT_TYPE) == e


@pytest.mark.parametrize(
    "time",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_event_time_without_utc_equivalent_raises_invalid_event(time: datetime) -> None:
    """An event whose time lies outside datetime's range in UTC raises InvalidEvent, not OverflowError."""
    with pytest.raises(InvalidEvent, match="out of range"):
        encode(Event("a.b.c", time=time))


def test_decode_rejects_a_time_without_utc_equivalent() -> None:
    """An envelope whose time lies outside datetime's range in UTC is rejected, not an OverflowError."""
    reason = reason_of(body_of(envelope(time="0001-01-01T00:00:00+05:00")))
    assert reason.startswith("invalid envelope: time")
    assert "out of range" in reason


# --- size cap ------------------------------------------------------------------------------------


def test_encode_rejects_an_event_over_the_default_cap() -> None:
    """encode raises EventTooLarge, naming the encoded size and the 1 MiB limit, past the default cap."""
    big = Event("a.b.c", payload={"blob": "x" * DEFAULT_MAX_EVENT_SIZE})
    size = len(encode(big, max_size=2 * DEFAULT_MAX_EVENT_SIZE))
    with pytest.raises(EventTooLarge, match=f"encodes to {size} bytes, over the limit of {DEFAULT_MAX_EVENT_SIZE}"):
        encode(big)


def test_encode_accepts_an_event_exactly_at_a_custom_cap() -> None:
    """encode accepts an event whose encoded size equals max_size."""
    e = Event("a.b.c", payload={"k": "v" * 100})
    size = len(encode(e))
    assert len(encode(e, max_size=size)) == size


def test_encode_rejects_an_event_one_byte_over_a_custom_cap() -> None:
    """encode raises EventTooLarge, naming both sizes, for an event one byte over max_size."""
    e = Event("a.b.c", payload={"k": "v" * 100})
    size = len(encode(e))
    with pytest.raises(EventTooLarge, match=f"{size} bytes, over the limit of {size - 1}"):
        encode(e, max_size=size - 1)


def test_encode_counts_bytes_not_characters() -> None:
    """The cap applies to the encoded bytes: non-ASCII characters go out as 6-byte escapes and count so."""
    e = Event("a.b.c", payload={"k": "é" * 100})
    size = len(encode(e))
    assert size >= 600 + len(encode(Event("a.b.c", payload={"k": ""})))
    with pytest.raises(EventTooLarge):
        encode(e, max_size=size - 1)


def test_event_too_large_is_a_value_error() -> None:
    """EventTooLarge is a ValueError."""
    with pytest.raises(ValueError, match="over the limit"):
        encode(Event("a.b.c", payload={"k": "v" * 100}), max_size=10)


def test_encode_rejects_a_non_json_payload_with_invalid_event() -> None:
    """encode raises InvalidEvent naming the event when the payload is not JSON-serialisable."""
    with pytest.raises(InvalidEvent, match=r"payload of a\.b\.c is not JSON-serialisable"):
        encode(Event("a.b.c", payload={"when": datetime.now(UTC)}))


def test_encode_rejects_nan_in_the_payload() -> None:
    """encode raises InvalidEvent for NaN, which is not JSON."""
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        encode(Event("a.b.c", payload={"x": float("nan")}))


# --- decode rejections ---------------------------------------------------------------------------


UNPICKLED: list[str] = []


def _record_unpickling(marker: str) -> str:
    UNPICKLED.append(marker)
    return marker


class _Tripwire:
    """Unpickling this object calls _record_unpickling."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_unpickling, ("unpickled",))


def test_decode_rejects_pickle_without_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle body is rejected by content type, and nothing is ever unpickled."""
    body = pickle.dumps(_Tripwire())

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("decode must never unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    reason = reason_of(body, "application/x-python-serialize")
    assert "'application/x-python-serialize' is not accepted" in reason
    assert CONTENT_TYPE in reason
    assert UNPICKLED == []


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "application/JSON", "application/json; charset=utf-8"]
)
def test_decode_rejects_any_other_content_type(content_type: str | None) -> None:
    """A valid JSON body under any content type but application/json is rejected, naming that type."""
    reason = reason_of(body_of(envelope()), content_type)
    assert f"content type {content_type!r} is not accepted" in reason


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"{'id': 'x'}", id="single-quotes"),
        pytest.param(b'{"id": "x",}', id="trailing-comma"),
        pytest.param(b'{"a": 1} {"b": 2}', id="two-documents"),
    ],
)
def test_decode_rejects_invalid_json(body: bytes) -> None:
    """A body that is not JSON is rejected as not valid UTF-8 JSON."""
    assert "not valid UTF-8 JSON" in reason_of(body)


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"id": "\xc3"}', "{}".encode("utf-16")])
def test_decode_rejects_non_utf8_bytes(body: bytes) -> None:
    """A body that is not UTF-8 is rejected as not valid UTF-8 JSON."""
    assert "not valid UTF-8 JSON" in reason_of(body)


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"[]", "list"), (b"[1, 2]", "list"), (b"42", "int"), (b"4.2", "float"), (b'"x"', "str"), (b"null", "NoneType")],
)
def test_decode_rejects_json_that_is_not_an_object(body: bytes, kind: str) -> None:
    """A JSON document that is not an object is rejected, naming what it is."""
    assert reason_of(body) == f"body must be a JSON object, not {kind}"


@pytest.mark.parametrize("missing", FIELDS)
def test_decode_rejects_a_missing_field(missing: str) -> None:
    """An envelope without one of its eight fields is rejected, naming the field."""
    assert reason_of(body_of(envelope(**{missing: ...}))) == f"envelope is missing field(s): {missing}"


def test_decode_rejects_unknown_fields() -> None:
    """An envelope with fields beyond the eight is rejected, naming them."""
    reason = reason_of(body_of(envelope(zeta=1, alpha=2)))
    assert reason == "envelope has unknown field(s): alpha, zeta"


@pytest.mark.parametrize("name", ["id", "type", "source", "time", "correlation_id"])
@pytest.mark.parametrize("value", [None, 1, 1.5, True, [], {}])
def test_decode_rejects_a_non_string_string_field(name: str, value: object) -> None:
    """A string field holding any other JSON type is rejected, naming the field."""
    assert reason_of(body_of(envelope(**{name: value}))) == f"envelope field {name!r} must be a string"


@pytest.mark.parametrize("value", [1, [], {}, True])
def test_decode_rejects_a_non_string_causation_id(value: object) -> None:
    """A causation_id that is neither a string nor null is rejected."""
    assert reason_of(body_of(envelope(causation_id=value))) == "envelope field 'causation_id' must be a string or null"


@pytest.mark.parametrize("payload", [[], [{"a": 1}], "text", 3, None])
def test_decode_rejects_a_payload_that_is_not_an_object(payload: object) -> None:
    """A payload that is not a JSON object is rejected."""
    assert reason_of(body_of(envelope(payload=payload))) == "envelope field 'payload' must be a JSON object"


@pytest.mark.parametrize("headers", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"v": "w"}}, ["k", "v"], None, "k=v"])
def test_decode_rejects_headers_that_are_not_str_to_str(headers: object) -> None:
    """Headers that are not an object of string values are rejected as an invalid envelope."""
    reason = reason_of(body_of(envelope(headers=headers)))
    assert reason.startswith("invalid envelope: headers must")


@pytest.mark.parametrize("time", ["yesterday", "", "2026-13-01T00:00:00Z", "27/11/2026 01:02:03+00:00"])
def test_decode_rejects_a_time_that_is_not_iso_8601(time: str) -> None:
    """A time that is not ISO 8601 is rejected, quoting the value."""
    assert reason_of(body_of(envelope(time=time))) == f"envelope field 'time' is not an ISO 8601 time: {time!r}"


def test_decode_quotes_at_most_64_characters_of_a_bad_time() -> None:
    """A long bad time is quoted truncated to 64 characters in the reason."""
    reason = reason_of(body_of(envelope(time="x" * 10_000)))
    assert reason == f"envelope field 'time' is not an ISO 8601 time: {'x' * 64!r}"


@pytest.mark.parametrize("time", ["2026-11-27T01:02:03", "2026-11-27T01:02:03.456789", "2026-11-27"])
def test_decode_rejects_a_time_without_timezone(time: str) -> None:
    """A time without a timezone is rejected."""
    assert reason_of(body_of(envelope(time=time))) == "envelope field 'time' has no timezone"


@pytest.mark.parametrize("name", ["Ocis.Sharing.Created", "ocis.sharing", "ocis.*.share_created", "a b.c.d"])
def test_decode_rejects_an_invalid_event_name(name: str) -> None:
    """An envelope whose type is not a valid event name is rejected as an invalid envelope."""
    assert reason_of(body_of(envelope(type=name))).startswith("invalid envelope: invalid event name")


@pytest.mark.parametrize("event_id", ["", "x" * 129, "tab\there"])
def test_decode_rejects_an_invalid_id(event_id: str) -> None:
    """An empty, overlong or unprintable id is rejected as an invalid envelope."""
    assert reason_of(body_of(envelope(id=event_id))).startswith("invalid envelope: id must be")


def test_decode_rejects_a_body_over_max_size() -> None:
    """A body one byte over max_size is rejected, naming its size and the limit."""
    body = body_of(envelope())
    reason = reason_of(body, max_size=len(body) - 1)
    assert reason == f"message of {len(body)} bytes exceeds the limit of {len(body) - 1}"


def test_decode_accepts_a_body_exactly_at_max_size() -> None:
    """A body whose size equals max_size is decoded."""
    body = body_of(envelope())
    assert decode(body, CONTENT_TYPE, max_size=len(body)).id == "0f1e2d3c"


def test_decode_rejects_a_body_over_the_default_cap() -> None:
    """A body over 1 MiB is rejected by default, before it is parsed."""
    body = body_of(envelope(payload={"blob": "x" * DEFAULT_MAX_EVENT_SIZE}))
    assert reason_of(body).endswith(f"exceeds the limit of {DEFAULT_MAX_EVENT_SIZE}")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="closed"),
        pytest.param(b'{"payload": ' + b'{"a":' * 100_000, id="unclosed"),
    ],
)
def test_decode_rejects_deeply_nested_json(body: bytes) -> None:
    """A body nested deeper than the parser can follow, though under max_size, is a DecodeError."""
    assert len(body) < DEFAULT_MAX_EVENT_SIZE
    assert "nested too deeply" in reason_of(body)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_decode_rejects_non_finite_numbers(literal: str) -> None:
    """A payload holding NaN, Infinity or a number that overflows to infinity is rejected as not JSON."""
    body = json.dumps(envelope()).replace('"count": 3', f'"count": {literal}').encode()
    assert reason_of(body).startswith("body is not valid UTF-8 JSON")


@pytest.mark.parametrize("literal", ["1e308", "-1e308", "5e-324", "1e-400"])
def test_decode_accepts_extreme_finite_numbers(literal: str) -> None:
    """A payload holding a huge, tiny or underflowing but finite number decodes, and encodes again."""
    body = json.dumps(envelope()).replace('"count": 3', f'"count": {literal}').encode()
    decoded = decode(body, CONTENT_TYPE)
    assert decoded.payload["count"] == float(literal)
    assert decode(encode(decoded), CONTENT_TYPE) == decoded


# --- fuzzing -------------------------------------------------------------------------------------


def decodes_or_rejects(body: bytes | str) -> str:
    """Decode ``body``: it must give an Event that encodes again, or raise DecodeError. Returns which."""
    result: Event | DecodeError
    try:
        result = decode(body, CONTENT_TYPE)
    except DecodeError as exc:
        result = exc
    if isinstance(result, DecodeError):
        assert isinstance(result.reason, str)
        assert result.reason
    else:
        assert isinstance(result, Event)
        assert decode(encode(result), CONTENT_TYPE) == result
    return type(result).__name__


@given(st.binary())
def test_decode_of_arbitrary_bytes_never_raises_anything_else(body: bytes) -> None:
    """Arbitrary bytes decode to an Event that encodes again, or raise DecodeError."""
    event(decodes_or_rejects(body))


@given(st.text())
def test_decode_of_arbitrary_text_never_raises_anything_else(body: str) -> None:
    """An arbitrary str body decodes to an Event that encodes again, or raises DecodeError."""
    event(decodes_or_rejects(body))


@given(st.dictionaries(st.text(), json_values))
def test_decode_of_arbitrary_json_objects_never_raises_anything_else(data: dict[str, Any]) -> None:
    """An arbitrary JSON object decodes to an Event that encodes again, or raises DecodeError."""
    event(decodes_or_rejects(body_of(data)))


time_like = st.text(alphabet="0123456789-+:.TZWz ", max_size=40) | times.map(datetime.isoformat)
field_values = {
    "id": ids | json_values,
    "type": event_names | st.text(max_size=30) | json_values,
    "source": st.text(max_size=20) | json_values,
    "time": time_like | json_values,
    "correlation_id": ids | json_values,
    "causation_id": st.none() | ids | json_values,
    "headers": headers | json_values,
    "payload": payloads | json_values,
}


@given(
    st.fixed_dictionaries({}, optional=field_values),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)
def test_decode_of_near_envelopes_never_raises_anything_else(data: dict[str, Any], extra: dict[str, Any]) -> None:
    """An object with envelope fields of right and wrong types decodes and encodes again, or raises DecodeError."""
    event(decodes_or_rejects(body_of({**extra, **data})))


@given(st.fixed_dictionaries(field_values))
def test_decode_of_complete_envelopes_never_raises_anything_else(data: dict[str, Any]) -> None:
    """An object with all eight fields, each right or wrong, decodes and encodes again, or raises DecodeError."""
    event(decodes_or_rejects(body_of(data)))


@pytest.mark.parametrize("name", ["source", "headers", "payload"])
def test_decoded_event_with_an_escaped_lone_surrogate_encodes_again(name: str) -> None:
    """An envelope with a lone surrogate escape in a free-text field is rejected, or decodes and encodes again."""
    value = {"source": "\ud800", "headers": {"h": "\udfff"}, "payload": {"k": "\ud800"}}[name]
    assert decodes_or_rejects(body_of(envelope(**{name: value}))) in ("Event", "DecodeError")


# --- Event validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, None, ("a", 1)])
def test_event_rejects_a_payload_that_is_not_a_mapping(payload: object) -> None:
    """Building an Event with a payload that is not a mapping raises InvalidEvent naming the type."""
    with pytest.raises(InvalidEvent, match=f"payload must be a JSON object .*not {type(payload).__name__}"):
        Event("a.b.c", payload=payload)  # type: ignore[arg-type]


def test_event_rejects_an_invalid_name() -> None:
    """Building an Event with an invalid name raises InvalidEventName."""
    from transport import InvalidEventName

    with pytest.raises(InvalidEventName):
        Event("NotAName")


def test_event_rejects_a_naive_time() -> None:
    """Building an Event with a naive datetime raises InvalidEvent."""
    with pytest.raises(InvalidEvent, match="timezone-aware"):
        Event("a.b.c", time=datetime(2026, 1, 1))


def test_event_rejects_too_many_headers() -> None:
    """Building an Event with more than 64 headers raises InvalidEvent."""
    with pytest.raises(InvalidEvent, match="at most 64 headers"):
        Event("a.b.c", headers={f"h{i}": "v" for i in range(65)})


def test_correlation_id_defaults_to_the_event_id() -> None:
    """An Event built without a correlation id is correlated by its own id."""
    e = Event("a.b.c", id="abc")
    assert e.correlation_id == "abc"


def test_explicit_correlation_id_is_kept() -> None:
    """An Event built with a correlation id keeps it."""
    assert Event("a.b.c", id="abc", correlation_id="root").correlation_id == "root"


def test_events_get_distinct_ids() -> None:
    """Two Events built without ids get different ids."""
    assert Event("a.b.c").id != Event("a.b.c").id


def test_follow_up_carries_correlation_and_causation() -> None:
    """follow_up keeps the correlation id and sets the causation id to the parent's id."""
    parent = Event("a.b.c", id="parent", correlation_id="root")
    child = parent.follow_up("a.b.d", {"k": "v"}, source="svc", headers={"h": "1"})
    assert (child.type, child.payload, child.source, child.headers) == ("a.b.d", {"k": "v"}, "svc", {"h": "1"})
    assert child.correlation_id == "root"
    assert child.causation_id == "parent"
    assert child.id not in ("parent", "root")


def test_follow_up_of_a_root_event_is_correlated_by_the_root_id() -> None:
    """A follow-up of an event with no explicit correlation id is correlated by that event's id."""
    root = Event("a.b.c", id="root")
    grandchild = root.follow_up("a.b.d").follow_up("a.b.e")
    assert grandchild.correlation_id == "root"
    assert grandchild.causation_id != "root"


def test_new_ids_are_32_hex_digits_and_unique_across_several_reads_of_the_random_source() -> None:
    ids = [new_id() for _ in range(2_000)]  # (several pools of drawn-ahead ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in ids)


def test_a_forked_child_does_not_hand_out_the_ids_its_parent_drew_ahead() -> None:
    new_id()  # (the pool holds ids drawn ahead)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, "".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    theirs = {child[i : i + 32] for i in range(0, len(child), 32)}
    ours = {new_id() for _ in range(10)}
    assert len(theirs) == 10
    assert not theirs & ours
