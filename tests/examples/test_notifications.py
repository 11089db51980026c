"""The seed example: one mail per share, on memory:// and RabbitMQ."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from examples.notifications import app, publish_share, share_created
from sagas import App, Event, EventBus, Worker
from sagas._demo import MailSink
from tests.helpers import wait_for


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[MailSink]:
    with MailSink() as s:
        monkeypatch.setenv("SMTP_HOST", s.host)
        monkeypatch.setenv("SMTP_PORT", str(s.port))
        yield s


def test_each_share_is_mailed_once(
    broker_url: str, unique: str, buses: list[object], sink: MailSink, tmp_path: object
) -> None:
    """Every share mails its grantee once, even when its event is delivered twice."""
    worker = Worker(App(*app.services, exchange=unique), broker=broker_url, store=f"sqlite:///{tmp_path}/s.db")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        events = [publish_share(bus, f"s{i}", "einstein", f"user{i}", f"/p{i}") for i in range(20)]
        bus.publish(events[3])  # a redelivery of an event that was already handled
        wait_for(lambda: len(sink.mails) >= 20, what="20 mails")
        sentinel = publish_share(bus, "last", "einstein", "marie", "/last")
        wait_for(lambda: any(m["X-Share-Id"] == "last" for m in sink.mails), what="the last mail")
    ids = sorted(m["X-Share-Id"] for m in sink.mails)
    assert ids == sorted([f"s{i}" for i in range(20)] + [sentinel.payload["share_id"]])
    assert sink.mails[0]["To"].endswith("@ocis.example")


def test_a_share_without_grantee_is_dead_lettered(
    broker_url: str, unique: str, buses: list[object], sink: MailSink
) -> None:
    """A share event missing fields is rejected to the dead-letter queue, not retried and not mailed."""
    worker = Worker(App(*app.services, exchange=unique), broker=broker_url, store="memory://")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        bad = Event("ocis.sharing.share_created", {"share_id": "x"})
        bus.publish(bad)
        (letter,) = wait_for(lambda: bus.dead_letters(), what="dead letter")
    assert letter.id == bad.id
    assert "without sharer, grantee, path" in letter.reason
    assert sink.mails == []


def test_share_created_builds_the_seed_payload() -> None:
    """The event carries share_id, sharer, grantee and path, from the sharing service."""
    event = share_created("s1", "einstein", "marie", "/Photos")
    assert event.type == "ocis.sharing.share_created"
    assert event.source == "sharing"
    assert dict(event.payload) == {"share_id": "s1", "sharer": "einstein", "grantee": "marie", "path": "/Photos"}
