"""Logs that never hide an outcome: every message that is not handled as expected leaves one line at
info or warning, with a stable event name, its reason and its ids (never its payload); a message
handled as expected stays at debug (``message.handled``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import pytest
import structlog

from sagas import App, Event, Failure, Final, MemoryStore, NoReply, Reject, Retry, Saga, Service, Start, State
from sagas._protocol import request_event
from sagas.testing import Harness

UPLOADED, SCAN = "lg.files.uploaded", "lg.antivirus.scan"
PLACED, PAID, SHIPPED = "lg.orders.placed", "lg.orders.paid", "lg.orders.shipped"
#: a value of personal data in payloads: no log line may carry it
PERSONAL = "alice@example.com"

notes = Service("notes")


@notes.on(UPLOADED, idempotent=True, name="note")
def note(event: Event) -> None:
    return None


scanner = Service("scanner")
#: what the scan handler raises, by the payload's ``file``
RAISES: dict[str, BaseException] = {}


@scanner.handles(SCAN, retry=Retry(attempts=1))
def scan(event: Event) -> dict[str, Any]:
    error = RAISES.get(event.payload["file"])
    if error is not None:
        raise error
    return {"clean": True}


class Order(Saga):
    type = "lg_order"
    start = Start(PLACED, key="order_id", to="awaiting_payment")
    correlate = {PAID: "order_id", SHIPPED: "order_id"}
    states = [
        State("awaiting_payment", timeout=600, on={PAID: "shipping"}),
        State("shipping", timeout=600, on={SHIPPED: "done"}),
        Final("done"),
    ]


app = App(notes, scanner, sagas=[Order], exchange="lg")

Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def h() -> Iterator[Harness]:
    RAISES.clear()
    with Harness(app) as harness:
        yield harness


def _outcomes(logs: Logs) -> Logs:
    """The lines about one message's outcome at info or above (not the worker's or a saga's own)."""
    return [
        e
        for e in logs
        if (e["event"].startswith("message.") or e["event"] == "saga.message_failed") and e["log_level"] != "debug"
    ]


def _one(logs: Logs, **match: Any) -> MutableMapping[str, Any]:
    """The single outcome line whose fields match (one line per outcome: never two)."""
    found = [e for e in _outcomes(logs) if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, _outcomes(logs))
    assert not any(PERSONAL in repr(e) for e in logs), "a payload was logged"
    return found[0]


def _request(file: str) -> Event:
    return request_event("f" * 32, Order.type, 1, SCAN, {"file": file, "owner": PERSONAL}, None)


def test_a_duplicate_of_an_idempotent_handler_message_is_logged_at_info(h: Harness) -> None:
    """A message the inbox has seen is acked without running, logged message.ignored (duplicate) at info."""
    with structlog.testing.capture_logs() as logs:
        event = Event(UPLOADED, {"path": "/a", "owner": PERSONAL})
        h.send(event)
        h.run()
        h.send(event)
        h.run()
    line = _one(logs, event_id=event.id)
    assert (line["event"], line["log_level"], line["kind"]) == ("message.ignored", "info", "duplicate")
    assert (line["service"], line["handler"], line["event_type"]) == ("notes", "note", UPLOADED)
    assert line["reason"] == "handled before: its id is in the inbox"


def test_a_repeated_request_answered_from_the_reply_cache_is_logged_at_info(h: Harness) -> None:
    """A re-sent request answered from the reply cache is logged message.ignored (cached-reply) at info."""
    request = _request("b")
    with structlog.testing.capture_logs() as logs:
        h.send(request)
        h.run()
        h.send(request)
        h.run()
    line = _one(logs, event_id=request.id)
    assert (line["event"], line["log_level"], line["kind"]) == ("message.ignored", "info", "cached-reply")
    assert (line["service"], line["handler"]) == ("scanner", "scan")
    assert "reply cache" in line["reason"]


def test_a_request_dropped_with_no_reply_is_logged_at_info_with_its_reason(h: Harness) -> None:
    """A request handler that raises NoReply is logged message.no_reply at info with the reason given."""
    RAISES["c"] = NoReply("not for this instance")
    request = _request("c")
    with structlog.testing.capture_logs() as logs:
        h.send(request)
        h.run()
    line = _one(logs, event_id=request.id)
    assert (line["event"], line["log_level"], line["outcome"]) == ("message.no_reply", "info", "no-reply")
    assert line["reason"] == "not for this instance"
    assert (line["service"], line["handler"], line["event_type"], line["attempt"]) == ("scanner", "scan", SCAN, 1)


@pytest.mark.parametrize(
    ("error", "level", "reason"),
    [
        (Failure("quota exceeded"), "info", "quota exceeded"),
        (Reject("no such file"), "warning", "no such file"),
        (RuntimeError("disk on fire"), "warning", "RuntimeError: disk on fire"),
    ],
    ids=["failure", "reject", "error-given-up"],
)
def test_a_request_answered_with_a_failure_is_logged_with_its_reason(
    h: Harness, error: BaseException, level: str, reason: str
) -> None:
    """A failure reply is logged message.failure_reply: at info for a Failure the handler raised (its
    answer), at warning for a Reject or an error whose retries ran out."""
    RAISES["d"] = error
    request = _request("d")
    with structlog.testing.capture_logs() as logs:
        h.send(request)
        h.run()
    line = _one(logs, event_id=request.id)
    assert (line["event"], line["log_level"], line["outcome"]) == ("message.failure_reply", level, "failure-reply")
    assert line["reason"] == reason


@pytest.mark.parametrize(
    ("routing_key", "who"),
    [(UPLOADED, {"service": "notes", "handler": "note"}), (PLACED, {"saga_type": "lg_order"})],
    ids=["handler", "saga"],
)
def test_an_undecodable_message_is_logged_dead_lettered_at_warning(
    h: Harness, routing_key: str, who: Mapping[str, str]
) -> None:
    """An undecodable message is dead-lettered and logged message.dead_lettered at warning, on a
    handler's queue and on a saga type's queue alike, with the same reason as its dead letter."""
    with structlog.testing.capture_logs() as logs:
        h.client_bus().publish_encoded([(routing_key, b"not json", "garbled-1", False)])
        h.run()
    line = _one(logs, message_id="garbled-1")
    assert (line["event"], line["log_level"], line["outcome"]) == ("message.dead_lettered", "warning", "dead-letter")
    assert {k: line[k] for k in who} == who
    (letter,) = h.dead_letters()
    assert line["reason"] == letter.reason
    assert letter.reason.startswith("undecodable message: ")


@pytest.mark.parametrize(
    ("kind", "level", "reason"),
    [
        ("duplicate", "info", "duplicate: this message was handled before"),
        ("no-waiting-saga", "info", "no waiting saga for this event: no saga has this key"),
        ("not-applicable", "warning", "event:lg.orders.paid does not apply in state shipping"),
    ],
)
def test_a_saga_message_that_moves_no_saga_is_logged_ignored_with_its_reason(
    h: Harness, kind: str, level: str, reason: str
) -> None:
    """A saga message that moves no saga is logged message.ignored with its kind, level and reason."""
    placed = h.publish(PLACED, {"order_id": "o1", "owner": PERSONAL})
    h.run()
    with structlog.testing.capture_logs() as logs:
        if kind == "duplicate":
            h.send(placed)
            message = placed
        elif kind == "no-waiting-saga":
            message = h.publish(PAID, {"order_id": "nobody"})
        else:
            h.publish(PAID, {"order_id": "o1"})
            h.run()
            message = h.publish(PAID, {"order_id": "o1"})  # (a second payment: the state takes none)
        h.run()
    line = _one(logs, event_id=message.id)
    assert (line["event"], line["log_level"], line["kind"]) == ("message.ignored", level, kind)
    assert line["reason"].startswith(reason)
    assert (line["saga_type"], line["event_type"]) == ("lg_order", message.type)
    if kind == "not-applicable":
        assert line["saga_id"] == h.saga(Order, "o1").id
    else:
        assert "saga_id" not in line  # (no saga was found: no saga_id=None)


class _StoreDownOnce(MemoryStore):
    """A store whose first saga write fails, as a database that restarts."""

    failures = 1

    def save_saga(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the database restarts")
        return super().save_saga(*args, **kwargs)


def test_a_saga_message_sent_back_because_the_store_failed_is_logged_with_its_type() -> None:
    """A saga message whose step raised is sent back and logged saga.message_failed at warning, with its
    message id, event type and the error; once applied, nothing more is logged for it."""
    with Harness(app, store=_StoreDownOnce()) as h, structlog.testing.capture_logs() as logs:
        placed = h.publish(PLACED, {"order_id": "o3", "owner": PERSONAL})
        h.run()
        line = _one(logs, message_id=placed.id)
        h.advance(5)  # (the retry's delay)
        h.run()
    assert (line["event"], line["log_level"], line["outcome"]) == ("saga.message_failed", "warning", "retry")
    assert (line["saga_type"], line["event_type"], line["attempt"]) == ("lg_order", PLACED, 1)
    assert "the database restarts" in line["error"]
    assert h.saga(Order, "o3").state == "awaiting_payment"
    assert _one(logs, message_id=placed.id) is line
