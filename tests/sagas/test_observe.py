"""The observation seam (sagas._observe): what a worker tells its observer, through the test harness."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples import postprocessing
from sagas import App, Event, Retry, Service
from sagas._observe import NULL_OBSERVER, NullObserver, Observer
from sagas.testing import Drop, Harness
from tests.helpers import CommitFailsOnce
from transport import Subscription

UPLOAD = {"upload_id": "u1", "name": "a.txt", "size": 10, "user": "marie"}


class Recording:
    """An observer that keeps every call, as (method, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def of(self, method: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == method]

    def consuming(self, subscriptions: Sequence[Subscription]) -> None:
        self.calls.append(("consuming", (tuple(s.queue for s in subscriptions),)))

    def message(self, service: str, handler: str, event_type: str, outcome: str, duration: float | None) -> None:
        self.calls.append(("message", (service, handler, event_type, outcome, duration)))

    def transition(self, saga_type: str, from_state: str, to_state: str, final: bool) -> None:
        self.calls.append(("transition", (saga_type, from_state, to_state, final)))

    def deadline_fired(self, saga_type: str) -> None:
        self.calls.append(("deadline_fired", (saga_type,)))

    def request_resent(self, saga_type: str, request_type: str) -> None:
        self.calls.append(("request_resent", (saga_type, request_type)))

    def published(self, count: int, seconds: float) -> None:
        self.calls.append(("published", (count, seconds)))

    def connection(self, state: str) -> None:
        self.calls.append(("connection", (state,)))

    def turn(self, inflight: int, ready: int) -> None:
        self.calls.append(("turn", (inflight, ready)))


def test_the_null_observer_is_an_observer_and_the_default() -> None:
    observer: Observer = NullObserver()
    observer.message("s", "h", "t", "ok", 0.1)
    assert isinstance(NULL_OBSERVER, NullObserver)
    recording: Observer = Recording()  # (mypy checks that it matches the protocol)
    assert recording is not None


def test_a_saga_run_reports_its_transitions_messages_publishes_and_turns() -> None:
    rec = Recording()
    with Harness(postprocessing.app, observer=rec) as h:
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    moves = [(f, t, final) for saga_type, f, t, final in rec.of("transition") if saga_type == "postprocessing"]
    assert moves == [
        ("-", "scanning", False),
        ("scanning", "checking", False),
        ("checking", "finishing", False),
        ("finishing", "done", True),
    ]
    handled = {(s, h, e, o) for s, h, e, o, _ in rec.of("message")}
    assert ("antivirus", "scan", "ocis.antivirus.scan", "ok") in handled
    assert ("postprocessing", "saga", "ocis.storage.bytes_received", "moved") in handled
    durations = [d for s, _, _, _, d in rec.of("message") if s == "antivirus"]
    assert durations
    assert all(d is not None and d >= 0 for d in durations)
    assert all(d is None for s, _, _, _, d in rec.of("message") if s == "postprocessing")
    assert sum(n for n, _ in rec.of("published")) >= 4  # requests, replies, the finished event, ready
    assert rec.of("connection")[0] == ("up",)
    assert rec.of("consuming")
    assert rec.of("turn")


def test_a_lost_reply_reports_the_deadline_and_the_request_resent() -> None:
    rec = Recording()
    with Harness(postprocessing.app, observer=rec) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=1)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    assert ("postprocessing",) in rec.of("deadline_fired")
    assert rec.of("request_resent") == [("postprocessing", "ocis.antivirus.scan")]


def test_transitions_are_reported_once_when_the_commit_of_their_group_failed_and_was_redone(tmp_path: Path) -> None:
    """The first message's group fails to commit (rolled back, the message comes back and moves the saga
    again): each transition is reported once, after the commit that kept it."""
    rec = Recording()
    store = CommitFailsOnce(str(tmp_path / "s.db"))
    with Harness(postprocessing.app, store=store, observer=rec) as h:
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    assert store.failures == 0
    outcomes = [o for s, _, e, o, _ in rec.of("message") if e == "ocis.storage.bytes_received"]
    assert outcomes == ["retry", "moved"]  # (the group that failed was redone)
    moves = [(f, t) for saga_type, f, t, _ in rec.of("transition") if saga_type == "postprocessing"]
    assert moves == [("-", "scanning"), ("scanning", "checking"), ("checking", "finishing"), ("finishing", "done")]


def test_a_deadline_is_reported_once_when_the_commit_of_its_group_failed_and_was_redone(tmp_path: Path) -> None:
    """A deadline fires in a group whose commit fails (rolled back: it is still due, and fires again):
    the deadline fired and the request re-sent are reported once."""
    rec = Recording()
    store = CommitFailsOnce(str(tmp_path / "s.db"))
    store.failures = 0
    with Harness(postprocessing.app, store=store, observer=rec) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=1)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.run()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "scanning"
        assert rec.of("deadline_fired") == []
        store.failures = 1  # the next group that writes is the deadline's
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    assert store.failures == 0
    assert rec.of("deadline_fired") == [("postprocessing",)]
    assert rec.of("request_resent") == [("postprocessing", "ocis.antivirus.scan")]
    moves = [(f, t) for saga_type, f, t, _ in rec.of("transition") if saga_type == "postprocessing"]
    assert moves == [("-", "scanning"), ("scanning", "checking"), ("checking", "finishing"), ("finishing", "done")]


def test_a_failing_handler_reports_its_retries_then_its_dead_letter() -> None:
    svc = Service("flaky")

    @svc.on("test.flaky.happened", retry=Retry(attempts=3, initial=1.0))
    def fail(event: Event) -> None:
        raise ConnectionError("down")

    rec = Recording()
    with Harness(App(svc), observer=rec) as h:
        h.publish("test.flaky.happened", {})
        h.settle()
    outcomes = [o for s, _, _, o, _ in rec.of("message") if s == "flaky"]
    assert outcomes == ["retry", "retry", "dead-letter"]


def test_a_lost_connection_reports_down_then_reconnected() -> None:
    rec = Recording()
    with Harness(postprocessing.app, observer=rec) as h:
        h.restart_broker()
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
    states = [s for (s,) in rec.of("connection")]
    assert states[0] == "up"
    assert "down" in states
    assert "reconnected" in states
    assert states.index("down") < states.index("reconnected")
