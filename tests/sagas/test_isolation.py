"""Fault isolation: a saga whose own code raises (a guard, an action, a payload builder, data that is
not JSON) is parked in ``failed`` with the error and its traceback in its history, and every other saga
goes on; a start whose code raises is dead-lettered with the reason; the relay and the deadlines fail
apart; an operator action whose saga code raises changes nothing and says why."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from sagas import (
    ActionRefused,
    App,
    Context,
    Event,
    EventBus,
    Final,
    Go,
    MemoryStore,
    Request,
    Retry,
    Saga,
    SagaContext,
    Service,
    Start,
    State,
    Step,
    StepSaga,
    Worker,
)
from sagas._saga_pipeline import SagaPipeline
from sagas.testing import Harness
from tests.helpers import wait_for

PAID, CHARGE = "iso.orders.paid", "iso.cards.charge"

#: the saga code's behaviour, per order id: what raises where
BROKEN: dict[str, str] = {}


def _maybe_raise(ctx: SagaContext, where: str) -> None:
    if BROKEN.get(ctx.data.get("order_id", "")) == where:
        raise KeyError("customer")


def _on_timeout(ctx: SagaContext) -> None:
    _maybe_raise(ctx, "timeout")
    ctx.data["note"] = "no payment"


def _guard(ctx: SagaContext) -> bool:
    _maybe_raise(ctx, "guard")
    return True


def _charge_payload(ctx: SagaContext) -> dict[str, Any]:
    _maybe_raise(ctx, "payload")
    if BROKEN.get(ctx.data["order_id"]) == "not-json":
        ctx.data["when"] = datetime.datetime(2026, 1, 1)
    return {"order_id": ctx.data["order_id"]}


def _start(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)
    _maybe_raise(ctx, "start")


class Order(Saga):
    type = "iso_order"
    start = Start("iso.orders.placed", key="order_id", to="awaiting_payment", do=_start)
    correlate = {PAID: "order_id"}
    states = [
        State(
            "awaiting_payment",
            timeout=5,
            on={PAID: Go("charging", when=_guard)},
            on_timeout=Go("cancelled", do=_on_timeout),
            on_compensate=Go("cancelled", do=_on_timeout),
        ),
        State("charging", sends=Request(CHARGE, _charge_payload), timeout=5, on_reply="paid"),
        Final("paid"),
        Final("cancelled"),
    ]


cards = Service("cards")


@cards.handles(CHARGE)
def charge(event: Event) -> None:
    return None


app = App(cards, sagas=[Order])


@pytest.fixture(autouse=True)
def _clear() -> None:
    BROKEN.clear()


def _place(h: Harness, n: int, *, broken: str = "", where: str = "") -> None:
    if broken:
        BROKEN[broken] = where
        h.publish("iso.orders.placed", {"order_id": broken})
        h.run()  # its deadline is the earliest
    for i in range(n):
        h.publish("iso.orders.placed", {"order_id": f"good-{i}"})


def _parked(h: Harness, key: str) -> str:
    record = h.saga(Order, key)
    assert record.state == "failed", (key, record.state)
    return h.history(record.id)[-1].reason


def test_a_timeout_action_that_raises_parks_its_saga_and_every_other_deadline_fires() -> None:
    with Harness(app, workers=2) as h:
        _place(h, 10, broken="bad", where="timeout")
        h.settle()
        states = {r.key: r.state for r in h.sagas(Order)}
        reason = _parked(h, "bad")
    assert {k: v for k, v in states.items() if k != "bad"} == {f"good-{i}": "cancelled" for i in range(10)}
    assert reason.startswith(
        "a guard or action of timeout in state 'awaiting_payment' raised KeyError: 'customer' (in _maybe_raise, "
    )
    assert "Traceback (most recent call last)" in reason
    assert "_on_timeout" in reason
    assert h.saga(Order, "bad").meta["failed_from"] == "awaiting_payment"
    assert "\n" not in h.saga(Order, "bad").meta["reason"]  # the traceback is in the history only


def test_a_guard_that_raises_on_a_message_parks_its_saga_alone() -> None:
    with Harness(app, workers=2) as h:
        _place(h, 5, broken="bad", where="guard")
        h.run()
        for key in ["bad", *(f"good-{i}" for i in range(5))]:
            h.publish(PAID, {"order_id": key})
        h.settle()
        states = {r.key: r.state for r in h.sagas(Order)}
        reason = _parked(h, "bad")
        parked = sum(w.sagas.outcomes["parked"] for w in h.live_workers() if w.sagas)
        dead = h.dead_letters()
    assert {k: v for k, v in states.items() if k != "bad"} == {f"good-{i}": "paid" for i in range(5)}
    assert f"a guard or action of event:{PAID} in state 'awaiting_payment' raised KeyError" in reason
    assert "_guard" in reason
    assert parked == 1
    assert dead == []  # the message was handled: it parked the saga


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("payload", f"the request {CHARGE} of state 'charging' raised KeyError: 'customer'"),
        ("not-json", "the saga's data (it cannot be stored as JSON) raised TypeError"),
    ],
)
def test_a_payload_builder_that_raises_or_data_that_is_not_json_parks_its_saga(where: str, says: str) -> None:
    with Harness(app) as h:
        _place(h, 3, broken="bad", where=where)
        h.run()
        for key in ["bad", "good-0", "good-1", "good-2"]:
            h.publish(PAID, {"order_id": key})
        h.settle()
        states = {r.key: r.state for r in h.sagas(Order)}
        reason = _parked(h, "bad")
    assert states == {"bad": "failed", "good-0": "paid", "good-1": "paid", "good-2": "paid"}
    assert reason.startswith(says), reason


def test_a_start_whose_code_raises_is_dead_lettered_with_the_reason_and_others_start() -> None:
    with Harness(app) as h:
        _place(h, 3, broken="bad", where="start")
        h.settle()
        keys = sorted(r.key for r in h.sagas(Order))
        dead = h.dead_letters()
    assert keys == ["good-0", "good-1", "good-2"]
    assert len(dead) == 1
    assert dead[0].routing_key == "iso.orders.placed"
    assert dead[0].attempts == 1  # at once: no retry can fix the saga's code
    assert dead[0].error_type.endswith("KeyError")
    assert "Traceback" in dead[0].traceback
    assert "(in _maybe_raise, test_isolation.py:" in dead[0].reason  # the innermost frame of the saga's code
    assert "the start action of iso.orders.placed raised KeyError: 'customer'" in dead[0].reason
    assert "no saga was started" in dead[0].reason


def test_a_saga_parked_on_a_message_applies_it_again_when_retried_after_the_fix() -> None:
    """The payment event met a guard that raised: the saga parked, and the event is in its inbox (it will
    not come again). After the fix, a retry applies that event again: the order is paid."""
    with Harness(app) as h:
        _place(h, 0, broken="bad", where="guard")
        h.publish(PAID, {"order_id": "bad"})
        h.settle()
        parked = h.saga(Order, "bad")
        assert parked.state == "failed"
        assert parked.meta["parked_on"]["state"] == "awaiting_payment"
        with pytest.raises(ActionRefused, match="nothing was changed"):
            h.operations.retry(parked.id, actor="marie")  # not fixed yet: refused, and nothing changes
        assert h.saga(Order, "bad").version == parked.version
        BROKEN.clear()  # the fix is deployed
        h.operations.retry(parked.id, actor="marie")
        h.settle()
        record = h.saga(Order, "bad")
        reasons = [e.reason for e in h.history(record.id)]
    assert record.state == "paid"
    assert f"operator: retry: {PAID} applied again in awaiting_payment" in reasons
    assert "parked_on" not in record.meta


def test_an_operator_action_whose_saga_code_raises_changes_nothing() -> None:
    with Harness(app) as h:
        _place(h, 0)
        h.publish("iso.orders.placed", {"order_id": "o1"})
        h.run()
        before = h.saga(Order, "o1")
        BROKEN["o1"] = "timeout"  # the compensate outcome runs the same action
        with pytest.raises(ActionRefused, match="raised KeyError: 'customer'; nothing was changed"):
            h.operations.compensate(before.id, actor="marie")
        after = h.saga(Order, "o1")
    assert (after.state, after.version) == (before.state, before.version)


class _FailingEngine:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def fire_due(self) -> list[Any]:
        if self.fail:
            raise RuntimeError("the store is restarting")
        return []


class _Outbox:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.relayed: list[float] = []

    def publish(self, rows: list[Any]) -> None:
        pass

    def relay(self, created_before: float) -> None:
        if self.fail:
            raise RuntimeError("the store is restarting")
        self.relayed.append(created_before)


@pytest.mark.parametrize(("timers_fail", "relay_fails"), [(True, False), (False, True)])
def test_the_relay_and_the_deadlines_fail_apart(timers_fail: bool, relay_fails: bool) -> None:
    """Failing deadlines never stop the relay, and a failing relay never stops the deadlines."""
    now = [1000.0]
    engine, outbox = _FailingEngine(timers_fail), _Outbox(relay_fails)
    fired: list[float] = []
    real_fire: Callable[[], list[Any]] = engine.fire_due

    def fire_due() -> list[Any]:
        fired.append(now[0])
        return real_fire()

    engine.fire_due = fire_due  # type: ignore[method-assign]
    pipeline = SagaPipeline(
        {},
        engine,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        outbox=outbox,  # type: ignore[arg-type]
        clock=lambda: now[0],
        timer_interval=0.2,
        relay_interval=5.0,
    )
    for _ in range(30):  # 30 turns of 0.5 s: 15 s
        pipeline.tick()
        now[0] += 0.5
    assert len(fired) == 30  # the deadlines were looked at every turn
    assert len(outbox.relayed) == (0 if relay_fails else 3)  # the relay ran every 5 s
    if not relay_fails:
        assert outbox.relayed == [995.0, 1000.0, 1005.0]


# -- grouped settling: one message whose follow-up or reply cannot be encoded fails alone ---------------


def _worker(buses: list[object], app: App, url: str) -> Worker:
    worker = Worker(app, broker=url, store="memory://", concurrency=8)
    buses.append(worker)
    return worker


def _bus(buses: list[object], url: str, exchange: str) -> EventBus:
    bus = EventBus(url, exchange=exchange)
    buses.append(bus)
    return bus


def test_a_follow_up_too_large_fails_its_own_message_alone(broker_url: str, unique: str, buses: list[object]) -> None:
    """200 orders and one whose follow-up is over 1 MiB, settled in groups: every handler runs once, the
    200 follow-ups go out, and the bad order is dead-lettered at once, its reason naming the field."""
    ran: Counter[str] = Counter()
    got: set[str] = set()
    shop, mail = Service("shop"), Service("mail")

    @shop.on("iso.shop.placed", retry=Retry(attempts=5, initial=0.05))
    def placed(event: Event, ctx: Context) -> None:
        ran[event.payload["n"]] += 1
        blob = "x" * (2 << 20) if event.payload["n"] == "bad" else ""
        ctx.publish("iso.shop.confirmed", {"n": event.payload["n"], "blob": blob})

    @mail.on("iso.shop.confirmed")
    def confirmed(event: Event) -> None:
        got.add(event.payload["n"])

    bus = _bus(buses, broker_url, unique)
    with _worker(buses, App(shop, mail, exchange=unique), broker_url).running():
        names = [str(i) for i in range(100)] + ["bad"] + [str(i) for i in range(100, 200)]
        bus.publish_many([Event("iso.shop.placed", {"n": n}) for n in names])
        wait_for(lambda: len(got) == 200 and bus.dead_letters(), timeout=30, what="200 follow-ups and a dead letter")
        dead = bus.dead_letters()
    assert got == {str(i) for i in range(200)}
    assert set(ran.values()) == {1}  # no handler ran twice: neither the bad one nor its neighbours
    assert len(ran) == 201
    assert len(dead) == 1
    assert dead[0].attempts == 1
    assert dead[0].error_type == "transport.EventTooLarge"  # the public name, not transport._errors
    assert "its largest field is payload.blob" in dead[0].error_message


def test_a_reply_that_is_not_json_fails_its_own_request_alone(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A participant returning a datetime for one request among many: its saga fails at once with the
    field named; every other request's work runs once and its saga completes."""
    ran: Counter[str] = Counter()
    svc = Service("stamps")

    @svc.handles("iso.stamps.stamp")
    def stamp(event: Event) -> dict[str, Any]:
        ran[event.payload["stamp_id"]] += 1
        if event.payload["stamp_id"] == "bad":
            return {"when": datetime.datetime.now(datetime.UTC)}
        return {"ok": True}

    store = MemoryStore()
    bus = _bus(buses, broker_url, unique)
    worker = Worker(App(svc, sagas=[_Stamped], exchange=unique), broker=broker_url, store=store, concurrency=8)
    buses.append(worker)
    keys = [f"s{i}" for i in range(50)] + ["bad"] + [f"s{i}" for i in range(50, 100)]
    with worker.running():
        bus.publish_many([Event("iso.stamps.requested", {"stamp_id": k}) for k in keys])

        def all_final() -> bool:
            return sum(r.final for r in store.list_sagas(limit=200)) == 101

        wait_for(all_final, timeout=30, what="101 sagas final")
    states = Counter(r.state for r in store.list_sagas(limit=200))
    bad = store.find_saga("stamped", "bad")
    assert bad is not None
    assert states == {"completed": 100, "compensated": 1}
    assert set(ran.values()) == {1}
    reasons = " ".join(h.reason for h in store.saga_history(bad.id))
    assert "not JSON-serialisable (at payload.result.when (a datetime))" in reasons


class _Stamped(StepSaga):
    type = "stamped"
    start = Start("iso.stamps.requested", key="stamp_id")
    steps = [Step("stamp", "iso.stamps.stamp", timeout=30.0)]
