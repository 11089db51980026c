"""The saga examples run on memory:// (and the share example on RabbitMQ too)."""

from __future__ import annotations

from types import ModuleType

import pytest

from examples import order, postprocessing, share
from sagas import App, Event, EventBus, Worker
from sagas.operations import Operations
from sagas.testing import Delay, Drop, Harness
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


@pytest.mark.parametrize("waiting_in", ["scanning", "checking"])
def test_an_operator_compensates_an_upload_that_waits_and_it_is_reverted(waiting_in: str) -> None:
    """An upload whose scan or policy check gets no answer can be compensated by an operator (``sagas
    compensate``, the console's Compensate): it is aborted, storage reverts it, and it ends done."""
    request = "ocis.antivirus.scan" if waiting_in == "scanning" else "ocis.policies.check"
    with Harness(postprocessing.app) as h:
        h.inject(Drop(), match=request, times=100)
        h.publish("ocis.storage.bytes_received", {"upload_id": "u1", "name": "a.txt", "size": 10, "user": "marie"})
        h.run()
        record = h.saga(postprocessing.Postprocessing, "u1")
        assert record.state == waiting_in
        ops = Operations(h.store, sagas=h.app.sagas, bus=h.client_bus(), clock=h.clock)
        result = ops.compensate(record.id, actor="marie")
        assert (result.from_state, result.to_state) == (waiting_in, "reverting")
        assert [t for t, _ in result.published] == ["ocis.storage.revert"]
        h.settle()
        done = h.saga(postprocessing.Postprocessing, "u1")
        assert (done.state, done.data["outcome"]) == ("done", "abort")
        assert [e.actor for e in h.history(record.id) if e.actor] == ["marie"]
