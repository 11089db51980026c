"""One saga whose own code raises, in worker processes (``python -m sagas run drill_app:unpaid``) on
RabbitMQ and PostgreSQL: an order placed without a customer makes its saga's timeout action raise
``KeyError``, and its deadline is the earliest. It is parked in ``failed`` with the error and its
traceback, and every other order's deadline fires on time. Uses the session's private RabbitMQ node
and PostgreSQL cluster (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from private_services import PostgresCluster, RabbitNode

pytestmark = [pytest.mark.faults]


@pytest.fixture(scope="module")
def services(private_rabbit: RabbitNode, private_postgres: PostgresCluster) -> kit.Services:
    return kit.Services(private_rabbit, private_rabbit.url, private_postgres.url, private_postgres)


def test_a_saga_whose_timeout_action_raises_stops_no_other_deadline(
    services: kit.Services, tmp_path: Path, unique: str
) -> None:
    run = kit.bad_timeout(services, tmp_path, unique, orders=11, workers=2)
    assert run.states == {"cancelled": 10, "failed": 1}
    assert run.good_final_after is not None
    assert run.good_final_after < 15  # a 1 s payment timeout: nothing waits on the bad saga
    assert "on_timeout" in run.parked_reason or "timeout" in run.parked_reason
    assert "KeyError: 'customer'" in run.parked_reason
    assert "Traceback (most recent call last)" in run.parked_reason
    assert "_greet_on_cancel" in run.parked_reason  # the traceback names the saga's own function
