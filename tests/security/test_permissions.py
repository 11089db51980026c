"""The per-service RabbitMQ users of docs/security.md, checked on a real broker.

The security tests' own node (tests/security/_node.py) creates every user of the page's
``rabbitmqctl set_permissions`` commands with exactly those regexes, so this tests the documentation
as written: each role can do its work, and is refused what is not its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sagas import App, Context, Event, EventBus, MemoryStore, Reject, Retry, Service, Start, Step, StepSaga, Worker
from tests.security._node import Permission, TlsBroker, documented_permissions
from transport import Subscription, TransportError

pytestmark = pytest.mark.tls

EXCHANGE = "sagas"  # the page's examples use the default exchange and the vhost ocis
SHARE = "ocis.sharing.share_created"
FAST = Retry(attempts=2, initial=0.05)


@pytest.fixture(scope="module")
def roles(tls_broker: TlsBroker) -> dict[str, Permission]:
    found = documented_permissions()
    assert {"notifications", "postprocessing", "sharing", "operator"} <= set(found)
    return found


def until(worker: Worker, predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    if not worker.run_until(lambda: bool(predicate()), timeout):
        raise AssertionError(f"timed out waiting for {what}")


def test_the_documented_roles_do_their_work(roles: dict[str, Permission]) -> None:
    """As documented: `notifications` runs its handlers (a retry through a delay queue, a dead letter);
    `sharing` publishes; `operator` lists and replays the dead letter; `postprocessing` runs a saga type
    with its own participant."""
    calls: list[tuple[str, int]] = []
    notifications = Service("notifications")

    @notifications.on(SHARE, name="mail", retry=FAST)
    def mail(event: Event, ctx: Context) -> None:
        calls.append((event.payload["what"], ctx.attempt))
        if event.payload["what"] == "flaky" and ctx.attempt == 1:
            raise ConnectionError("smtp is down")
        if event.payload["what"] == "poison" and len([c for c in calls if c[0] == "poison"]) == 1:
            raise Reject("no grantee")

    worker = Worker(App(notifications, exchange=EXCHANGE), broker=roles["notifications"].url(), store=MemoryStore())
    publisher = EventBus(roles["sharing"].url(), exchange=EXCHANGE)
    operator = EventBus(roles["operator"].url(), exchange=EXCHANGE)
    try:
        worker.start()
        publisher.publish_many([Event(SHARE, {"what": "flaky"}), Event(SHARE, {"what": "poison"})])
        until(worker, lambda: ("flaky", 2) in calls and ("poison", 1) in calls, "a retry and a rejection")
        (letter,) = operator.dead_letters()
        assert letter.queue == f"{EXCHANGE}.notifications.mail"
        assert "no grantee" in letter.reason
        assert operator.replay_dead([letter.id]) == [letter.id]
        until(worker, lambda: len([c for c in calls if c[0] == "poison"]) == 2, "the replayed dead letter")
        assert operator.dead_letters() == []
    finally:
        worker.shutdown()
        publisher.close()
        operator.close()

    class Postprocessing(StepSaga):
        type = "postprocessing"
        start = Start("ocis.postprocessing.upload_ready", key="upload_id")
        steps = [Step("scan", "ocis.postprocessing.scan", timeout=30.0)]

    participant = Service("postprocessing")
    participant.handles("ocis.postprocessing.scan", name="scan")(lambda event: {"clean": True})
    store = MemoryStore()
    saga_worker = Worker(
        App(participant, sagas=[Postprocessing], exchange=EXCHANGE),
        broker=roles["postprocessing"].url(),
        store=store,
        timer_interval=0.05,
    )
    try:
        saga_worker.start()
        with EventBus(roles["sharing"].url(), exchange=EXCHANGE) as sharing:
            sharing.publish(Event("ocis.postprocessing.upload_ready", {"upload_id": "u1"}))
        until(
            saga_worker,
            lambda: (s := store.find_saga("postprocessing", "u1")) is not None and s.final,
            "the saga to end",
        )
        saga = store.find_saga("postprocessing", "u1")
        assert saga is not None
        assert saga.state == "completed"
    finally:
        saga_worker.shutdown()


def test_each_role_is_refused_what_is_not_its_own(roles: dict[str, Permission]) -> None:
    """`notifications` cannot consume another service's queue or read the dead letters; `sharing` cannot
    declare or read queues; `operator` cannot consume a service's queue."""
    audit = Service("audit")
    audit.on(SHARE, name="record")(lambda event: None)
    intruder = Worker(
        App(audit, exchange=EXCHANGE), broker=roles["notifications"].url(), store=MemoryStore(), grace_period=1.0
    )
    try:
        with pytest.raises(TransportError, match="lacks a permission"):
            intruder.start()
    finally:
        intruder.close()  # a start that failed leaves its connection open (shutdown() only stops a started one)
    checks: list[tuple[str, Callable[[EventBus], object]]] = [
        ("notifications", lambda bus: bus.dead_letters()),
        ("sharing", lambda bus: bus.declare(Subscription(f"{EXCHANGE}.sharing.sneaky", (SHARE,)))),
        ("sharing", lambda bus: bus.dead_letters()),
        ("operator", lambda bus: bus.declare(Subscription(f"{EXCHANGE}.notifications.mail", (SHARE,)))),
    ]
    for user, action in checks:
        bus = EventBus(roles[user].url(), exchange=EXCHANGE)
        try:
            with pytest.raises(Exception, match=r"ACCESS_REFUSED|lacks a permission"):
                action(bus)
        finally:
            bus.close()
