"""A slow participant across worker processes (``python -m sagas run drill_app:slow``) on RabbitMQ and
PostgreSQL: a step's deadline (0.4 s) shorter than its participant's handling time (1 s) re-sends every
request while it is being handled, and the claim in the shared store keeps the work to one run per
request id, with two and with three workers; a worker killed (-9) mid-handler leaves its claims to
expire, and the work runs again exactly once. Uses the session's private RabbitMQ node and PostgreSQL
cluster (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from private_services import PostgresCluster, RabbitNode

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SAGAS = 200


@pytest.fixture(scope="module")
def services(private_rabbit: RabbitNode, private_postgres: PostgresCluster) -> kit.Services:
    """The private broker node and database cluster."""
    return kit.Services(private_rabbit, private_rabbit.url, private_postgres.url, private_postgres)


@pytest.mark.parametrize("workers", [2, 3])
def test_a_slow_participant_runs_once_per_request(
    services: kit.Services, tmp_path: Path, unique: str, workers: int
) -> None:
    """Every saga completes and the participant's effect happens exactly once per saga."""
    run = kit.slow_participant(services, tmp_path, unique, sagas=SAGAS, workers=workers, kill=False)
    assert run.states == {"completed": SAGAS}
    assert run.duplicates == 0
    assert run.effects == SAGAS
    assert run.resends + run.waits > 0  # deadlines passed while requests were queued or being handled


def test_work_of_a_killed_claimant_runs_again_once_after_its_lease(
    services: kit.Services, tmp_path: Path, unique: str
) -> None:
    """kill -9 of a worker in the middle of its handlers: the requests it held are taken over when their
    claims expire (lease 10 s) and run exactly once more; every other request once. (A request whose
    effect the killed worker had made, and not yet recorded, is made again: the window no claim closes.)"""
    run = kit.slow_participant(services, tmp_path, unique, sagas=SAGAS, workers=2, kill=True, lease=10.0)
    assert run.kills == 1
    assert run.states == {"completed": SAGAS}
    # The only repeats: effects the killed worker made and had not recorded yet (the window that no
    # claim closes, docs/delivery.md), at most one per pool thread.
    assert run.other_duplicates == 0
    assert run.unrecorded <= 4
    assert run.effects == SAGAS + run.unrecorded
    # The killed worker's unfinished requests (killed in the handler, or after the effect and before the
    # claim recorded it): there were some, and each started again exactly once.
    assert run.restarted
    assert set(run.restarted.values()) == {2}, run.restarted
