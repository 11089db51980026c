"""The apps the fault drills (drills.py) and the fault tests (tests/faults) run in worker processes.

Each handler appends the event's sequence number to the file named by ``DRILL_OUT``, flushed per
line, so a kill -9 loses at most the line being written and the drill can count every effect.

``app`` has the drill service only; ``with_sagas`` adds the post-processing saga and its simulated
participants (examples/postprocessing.py, which reads FAIL_RATE and DROP_RATE), so one worker process
carries both plain at-least-once events and sagas through the same faults. ``slow`` is a saga whose
one step's deadline (``DRILL_SLOW_TIMEOUT``) is shorter than its participant's handling time
(``DRILL_SLOW_SECONDS``): every re-sent request meets the claim of the worker on it. ``unpaid`` is an
order saga whose timeout action raises for an order placed without a customer (fault isolation).
"""

from __future__ import annotations

import os
import time
from typing import Any

from examples.postprocessing import Postprocessing, antivirus, policies, storage
from sagas import AT_MOST_ONCE, App, Event, Final, Go, Saga, SagaContext, Service, Start, State, Step, StepSaga

drill = Service("drill")
_out = None


def _record(tag: str, event: Event) -> None:
    global _out
    if _out is None:
        _out = open(os.environ["DRILL_OUT"], "a", buffering=1)  # noqa: SIM115 - kept open for the process
    _out.write(f"{tag} {event.payload['n']}\n")


@drill.on("drill.events.created")
def record(event: Event) -> None:
    _record("alo", event)


@drill.on("drill.presence.seen", delivery=AT_MOST_ONCE)
def seen(event: Event) -> None:
    _record("amo-start", event)
    time.sleep(float(os.environ.get("DRILL_AMO_SLEEP", "0")))
    _record("amo", event)


app = App(drill, exchange=os.environ.get("DRILL_EXCHANGE", "drill"))
with_sagas = App(
    drill, antivirus, policies, storage, sagas=[Postprocessing], exchange=os.environ.get("DRILL_EXCHANGE", "drill")
)


hotels = Service("slow_hotels")


# (concurrency: one request per pool thread, so a kill -9 catches at most 4 done and not yet recorded)
@hotels.handles("drill.slow.book", cache_replies=True, concurrency=4)
def book(event: Event) -> dict[str, Any]:
    """A slow participant: ``book-start@<pid> n`` when it starts, ``book@<pid> n`` (the effect) when it
    is done, each with the worker process that did it, in one line (one write: a kill -9 leaves it
    whole or not at all)."""
    _record(f"book-start@{os.getpid()}", event)
    time.sleep(float(os.environ.get("DRILL_SLOW_SECONDS", "1.5")))
    _record(f"book@{os.getpid()}", event)
    return {"room": event.payload["n"]}


def _keep_n(ctx: SagaContext) -> None:
    if ctx.event is not None:  # (a start always has its event)
        ctx.data["n"] = ctx.event.payload["n"]


def _trip(ctx: SagaContext) -> dict[str, Any]:
    return {"n": ctx.data["n"]}


class SlowTrip(StepSaga):
    type = "slow_trip"
    start = Start("drill.slow.requested", key="trip", do=_keep_n)
    steps = [  # noqa: RUF012 - a saga type declares its steps as a class-level list
        Step(
            "book",
            "drill.slow.book",
            payload=_trip,
            timeout=float(os.environ.get("DRILL_SLOW_TIMEOUT", "0.5")),
            retries=int(os.environ.get("DRILL_SLOW_RETRIES", "12")),
            backoff=1.5,
        )
    ]


slow = App(hotels, sagas=[SlowTrip], exchange=os.environ.get("DRILL_EXCHANGE", "drill"))


# -- one saga's own code raises on timeout (fault isolation) ------------------------------------------


def _greet_on_cancel(ctx: SagaContext) -> None:
    """The timeout action reads the customer's name: an order placed without a customer makes it raise
    ``KeyError``, for that saga alone."""
    ctx.data["note"] = f"sorry, {ctx.data['customer']['name']}: no payment came"


class UnpaidOrder(Saga):
    type = "unpaid_order"
    start = Start("drill.orders.placed", key="order_id", to="awaiting_payment")
    correlate = {"drill.orders.paid": "order_id"}  # noqa: RUF012 - a saga type declares its correlations
    states = [  # noqa: RUF012 - a saga type declares its states as a class-level list
        State(
            "awaiting_payment",
            timeout=float(os.environ.get("DRILL_PAYMENT_TIMEOUT", "1.0")),
            on={"drill.orders.paid": "paid"},
            on_timeout=Go("cancelled", do=_greet_on_cancel),
        ),
        Final("paid"),
        Final("cancelled"),
    ]


unpaid = App(sagas=[UnpaidOrder], exchange=os.environ.get("DRILL_EXCHANGE", "drill"))
