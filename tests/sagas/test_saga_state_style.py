"""A state-machine-style saga compensates the steps it finished, in reverse order (memory:// and RabbitMQ)."""

from __future__ import annotations

import threading

from sagas import (
    App,
    Event,
    EventBus,
    Failure,
    Final,
    Request,
    Saga,
    SagaContext,
    Service,
    Start,
    State,
    Worker,
)
from tests.helpers import wait_for

RESERVE, RELEASE = "shop.stock.reserve", "shop.stock.release"
CHARGE, REFUND = "shop.payment.charge", "shop.payment.refund"
SHIP = "shop.shipping.ship"


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


class Order(Saga):
    type = "order"
    start = Start("shop.orders.placed", key="order_id", to="reserving", do=_keep)
    states = [
        State("reserving", sends=Request(RESERVE), timeout=5.0, on_reply="charging", on_failure="cancelled"),
        State(
            "charging",
            sends=Request(CHARGE),
            timeout=5.0,
            on_reply="shipping",
            on_failure="releasing",
            on_timeout="releasing",
        ),
        State(
            "shipping",
            sends=Request(SHIP),
            timeout=5.0,
            on_reply="shipped",
            on_failure="refunding",
            on_timeout="refunding",
        ),
        State("refunding", sends=Request(REFUND), timeout=5.0, on_reply="releasing"),
        State("releasing", sends=Request(RELEASE), timeout=5.0, on_reply="cancelled"),
        Final("shipped"),
        Final("cancelled"),
    ]


def _shop(calls: list[str]) -> list[Service]:
    lock = threading.Lock()
    stock, payment, shipping = Service("stock"), Service("payment"), Service("shipping")

    def record(name: str, event: Event) -> None:
        with lock:
            calls.append(f"{name}:{event.payload['order_id']}")

    @stock.handles(RESERVE)
    def reserve(event: Event) -> dict[str, str]:
        record("reserve", event)
        return {"reserved": "yes"}

    @stock.handles(RELEASE)
    def release(event: Event) -> None:
        record("release", event)

    @payment.handles(CHARGE)
    def charge(event: Event) -> None:
        record("charge", event)

    @payment.handles(REFUND)
    def refund(event: Event) -> None:
        record("refund", event)

    @shipping.handles(SHIP)
    def ship(event: Event) -> None:
        record("ship", event)
        if event.payload.get("address") == "nowhere":
            raise Failure("cannot ship to nowhere")

    return [stock, payment, shipping]


def test_state_style_saga_compensates_in_reverse_order(broker_url: str, unique: str, buses: list[object]) -> None:
    """When shipping fails, the payment is refunded and then the stock released: the reverse of the steps
    that completed; an order that ships runs no compensation."""
    calls: list[str] = []
    worker = Worker(
        App(*_shop(calls), sagas=[Order], exchange=unique), broker=broker_url, store="memory://", timer_interval=0.05
    )
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    with worker.running():
        bus.publish(Event("shop.orders.placed", {"order_id": "o1", "address": "nowhere"}))
        bus.publish(Event("shop.orders.placed", {"order_id": "o2", "address": "Paris"}))
        wait_for(
            lambda: all(s.final for s in worker.store.list_sagas()) and len(worker.store.list_sagas()) == 2,
            what="both orders final",
        )
        states = {s.key: s.state for s in worker.store.list_sagas()}
        o1 = worker.store.find_saga("order", "o1")
        assert o1 is not None
        history = [h.to_state for h in worker.store.saga_history(o1.id)]
    assert states == {"o1": "cancelled", "o2": "shipped"}
    assert [c for c in calls if c.endswith(":o1")] == ["reserve:o1", "charge:o1", "ship:o1", "refund:o1", "release:o1"]
    assert [c for c in calls if c.endswith(":o2")] == ["reserve:o2", "charge:o2", "ship:o2"]
    assert history == ["reserving", "charging", "shipping", "refunding", "releasing", "cancelled"]
