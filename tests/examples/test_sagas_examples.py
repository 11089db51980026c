"""The saga examples run on memory:// (and the share example on RabbitMQ too)."""

from __future__ import annotations

from types import ModuleType

import pytest

from examples import order, share
from sagas import App, Event, EventBus, Worker
from sagas.testing import Delay, Harness
from tests.helpers import wait_for


def _run(example: ModuleType, url: str, unique: str, buses: list[object]) -> tuple[Worker, EventBus]:
    app = example.app
    worker = Worker(
        App(*app.services, sagas=app.sagas, exchange=unique), broker=url, store="memory://", timer_interval=0.05
    )
    bus = EventBus(url, exchange=unique)
    buses += [worker, bus]
    return worker, bus


def _final(worker: Worker, n: int) -> bool:
    sagas = worker.store.list_sagas()
    return len(sagas) == n and all(s.final for s in sagas)


def test_share_completes_or_compensates_in_reverse(
    broker_url: str, unique: str, buses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share completes; one whose grantee cannot be notified revokes, then releases; one over quota
    undoes nothing."""
    monkeypatch.setenv("QUOTA_LIMIT", "5000")
    share.effects.clear()
    worker, bus = _run(share, broker_url, unique, buses)
    shares = [("ok", "marie", 100), ("mute", "nobody", 100), ("big", "marie", 9000)]
    with worker.running():
        for share_id, grantee, size in shares:
            bus.publish(
                Event(
                    "ocis.sharing.share_requested",
                    {"share_id": share_id, "owner": "einstein", "grantee": grantee, "path": "/p", "size": size},
                )
            )
        wait_for(lambda: _final(worker, 3), what="three shares final")
        states = {s.key: s.state for s in worker.store.list_sagas()}
    assert states == {"ok": "completed", "mute": "compensated", "big": "compensated"}
    assert [e for e in share.effects if e.endswith(" ok")] == ["reserve ok", "grant ok", "notify ok"]
    assert [e for e in share.effects if e.endswith(" mute")] == [
        "reserve mute",
        "grant mute",
        "revoke mute",
        "release mute",
    ]
    assert [e for e in share.effects if e.endswith(" big")] == []


def test_order_ships_cancels_unpaid_and_compensates_failed_shipping(unique: str, buses: list[object]) -> None:
    """A paid order ships; an unpaid one takes the author's timeout transition and releases its stock; a
    paid one that cannot ship is refunded, then its stock released."""
    order.effects.clear()
    worker, bus = _run(order, "memory://", unique, buses)
    orders = [("paid", True, "Paris"), ("unpaid", False, "Paris"), ("lost", True, "nowhere")]
    with worker.running():
        for order_id, pay, address in orders:
            bus.publish(Event("shop.orders.placed", {"order_id": order_id, "items": 1, "pay": pay, "address": address}))
        wait_for(lambda: _final(worker, 3), timeout=20, what="three orders final")
        sagas = {s.key: s for s in worker.store.list_sagas()}
    assert {k: s.state for k, s in sagas.items()} == {"paid": "shipped", "unpaid": "cancelled", "lost": "cancelled"}
    assert sagas["unpaid"].data["cancelled_because"] == "payment not received in time"
    assert [e for e in order.effects if e.endswith(" lost")] == [
        "reserve lost",
        "charge lost",
        "refund lost",
        "release lost",
    ]
    assert [e for e in order.effects if e.endswith(" unpaid")] == ["reserve unpaid", "release unpaid"]
    assert [e for e in order.effects if e.endswith(" paid")] == ["reserve paid", "charge paid", "ship paid"]


def test_readme_and_docs_show_the_diagram_sagas_graph_draws() -> None:
    """The post-processing diagram in the README and the docs is the one `sagas graph` prints today."""
    from pathlib import Path

    from click.testing import CliRunner

    from sagas._cli import cli

    drawn = CliRunner().invoke(cli, ["graph", "examples.postprocessing:Postprocessing"]).output.strip()
    root = Path(__file__).resolve().parents[2]
    assert drawn.startswith("stateDiagram-v2")
    assert (root / "docs" / "postprocessing.mmd").read_text().strip() == drawn
    assert f"```mermaid\n{drawn}\n```" in (root / "README.md").read_text()


def test_a_payment_that_comes_after_the_timeout_is_refunded() -> None:
    """The payment event is delayed past the order's payment timeout: the order is cancelled and its
    stock released, and when the payment comes after all, the card is refunded (``late=``), as the
    saga's history says."""
    order.effects.clear()
    with Harness(order.app) as h:
        h.inject(Delay(seconds=20), match="shop.payments.authorized")
        h.publish("shop.orders.placed", {"order_id": "slow", "items": 1, "pay": True, "address": "Paris"})
        h.settle()
        record = h.saga(order.Order, "slow")
        history = [e.reason for e in h.history(record.id)]
    assert record.state == "cancelled"
    assert record.data["cancelled_because"] == "payment not received in time"
    assert order.effects == ["reserve slow", "charge slow", "release slow", "refund slow"]
    late = [r for r in history if r.startswith("late success")]
    assert len(late) == 2, history
    assert "shop.payments.authorized" in late[0]
    assert "sent shop.payments.refund" in late[0]
    assert "undone" in late[1]
