"""`sagas bench publish`: the sync bus and the asyncio publisher, alternating, in one invocation (small N;
speed is not tested)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sagas import _bench_aio
from sagas._cli import cli


def test_publish_on_memory_reports_both_publishers_and_their_ratio() -> None:
    """Two rounds of each publisher, their medians, and the ratio of the medians."""
    result = CliRunner().invoke(cli, ["bench", "publish", "-n", "300", "--in-flight", "50", "--repeat", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert (report["n"], report["in_flight"]) == (300, 50)
    assert len(report["runs"]["sync"]) == len(report["runs"]["async"]) == 2
    assert all(r["publish_per_s"] > 0 for r in report["runs"]["sync"] + report["runs"]["async"])
    assert all(1 <= r["batches"] <= 300 for r in report["runs"]["async"])
    medians = report["median"]
    assert report["ratio_async_to_sync"] == round(medians["async"] / medians["sync"], 2)


@pytest.mark.rabbitmq
def test_publish_on_rabbitmq_reports_both_rates_and_the_ratio(amqp_url: str) -> None:
    """On RabbitMQ (with confirms) both publishers report a rate, and the table prints their ratio."""
    report = _bench_aio.bench_publish(amqp_url, 400, in_flight=100, repeat=1)
    assert report["median"]["async"] > 0
    assert report["median"]["sync"] > 0
    assert "async / sync" in _bench_aio.table(report)
