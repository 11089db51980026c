"""A classic order saga in the state-machine style: reserve stock, wait for the payment, ship.

``shop.orders.placed`` ``{order_id, items, pay}`` starts one saga per order. The saga reserves stock,
then asks for the payment (``shop.orders.awaiting_payment``) and waits for ``shop.payments.authorized``
for that order. The waiting state's own timeout cancels an order whose payment does not come within
``ORDER_PAYMENT_TIMEOUT`` seconds (default 3): the stock is released. A payment that comes after
that is refunded (``late=``): the card was charged, and the order is cancelled. If shipping fails,
the payment is refunded and then the stock released: the compensations run in the reverse order of
the steps that completed. The participants are simulated: the payment service pays every order whose ``pay``
is true, and the carrier cannot ship to ``"nowhere"``.

    export SAGAS_BROKER_URL=amqp://guest:guest@localhost//   # sagas publish refuses memory://
    sagas run examples.order:app
    sagas publish shop.orders.placed '{"order_id": "o1", "items": 2, "pay": true, "address": "Paris"}'
"""

from __future__ import annotations

import os
from collections.abc import Callable

from sagas import (
    App,
    Context,
    Event,
    Failure,
    Final,
    Go,
    Request,
    Saga,
    SagaContext,
    Service,
    Start,
    State,
    compensate,
)

RESERVE, RELEASE = "shop.stock.reserve", "shop.stock.release"
REFUND, SHIP = "shop.payments.refund", "shop.shipping.ship"
PAID, AWAITING = "shop.payments.authorized", "shop.orders.awaiting_payment"


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


def _ask_for_payment(ctx: SagaContext) -> None:
    ctx.publish(AWAITING, {"order_id": ctx.data["order_id"], "pay": ctx.data.get("pay", False)})


def _why(reason: str) -> Callable[[SagaContext], None]:
    def note(ctx: SagaContext) -> None:
        ctx.data["cancelled_because"] = reason

    return note


class Order(Saga):
    type = "order"
    start = Start("shop.orders.placed", key="order_id", to="reserving", do=_keep)
    correlate = {PAID: "order_id"}
    states = [
        State(
            "reserving",
            sends=Request(RESERVE),
            timeout=5,
            on_reply=Go("awaiting_payment", do=_ask_for_payment),
            on_failure=Go("cancelled", do=_why("out of stock")),
        ),
        State(
            "awaiting_payment",
            timeout=float(os.environ.get("ORDER_PAYMENT_TIMEOUT", "3")),
            on={PAID: "shipping"},
            # No payment, no order; and a payment that comes after all is refunded.
            on_timeout=Go("releasing", do=_why("payment not received in time")),
            late={PAID: compensate(REFUND)},
        ),
        State(
            "shipping",
            sends=Request(SHIP),
            timeout=5,
            on_reply="shipped",
            on_failure=Go("refunding", do=_why("could not ship")),
            on_timeout="refunding",
        ),
        State("refunding", sends=Request(REFUND), timeout=5, on_reply="releasing"),
        State("releasing", sends=Request(RELEASE), timeout=5, on_reply="cancelled"),
        Final("shipped"),
        Final("cancelled"),
    ]


stock, payments, shipping = Service("stock"), Service("payments"), Service("shipping")

#: What the simulated participants did, in order.
effects: list[str] = []


@stock.handles(RESERVE)
def reserve(event: Event) -> None:
    if int(event.payload.get("items", 1)) > 100:
        raise Failure("not enough stock")
    effects.append(f"reserve {event.payload['order_id']}")


@stock.handles(RELEASE)
def release(event: Event) -> None:
    effects.append(f"release {event.payload['order_id']}")


@payments.on(AWAITING, name="charge")
def charge(event: Event, ctx: Context) -> None:
    if event.payload.get("pay"):
        effects.append(f"charge {event.payload['order_id']}")
        ctx.publish(PAID, {"order_id": event.payload["order_id"]})


@payments.handles(REFUND)
def refund(event: Event) -> None:
    effects.append(f"refund {event.payload['order_id']}")


@shipping.handles(SHIP)
def ship(event: Event) -> None:
    if event.payload.get("address") == "nowhere":
        raise Failure("cannot ship to nowhere")
    effects.append(f"ship {event.payload['order_id']}")


app = App(stock, payments, shipping, sagas=[Order])
