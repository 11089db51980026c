"""`sagas bench`: each workload runs, and reports figures that add up (small N; speed is not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sagas import _bench
from sagas._cli import cli


def test_events_on_memory_report_every_figure() -> None:
    result = CliRunner().invoke(cli, ["bench", "events", "-n", "300", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    events = report["median"]["events"]
    assert set(events) == {
        "publish_per_s",
        "handled_per_s",
        "end_to_end_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "worker_peak_rss_mib",
    }
    assert events["end_to_end_per_s"] > 0
    assert 0 <= events["latency_p50_ms"] <= events["latency_p99_ms"]
    assert "raw-quorum" not in report["median"], "the raw ceiling needs RabbitMQ"


def test_sagas_on_memory_end_every_saga_and_compensate_one_in_ten() -> None:
    r = _bench.bench_sagas("memory://", None, 100)
    assert r["states"] == {"completed": 90, "compensated": 10}
    # 7 messages for a completed saga (start, 3 requests, 3 replies), 2 requests and replies more to
    # compensate two steps
    assert r["messages_per_saga"] == pytest.approx((90 * 7 + 10 * 11) / 100)
    assert r["store_commits_per_saga"] <= r["store_writes_per_saga"]


def test_deadlines_fire_only_the_due_sagas() -> None:
    r = _bench.bench_deadlines(None, due=20, idle=(20, 200))
    assert r["fired_with_20_idle"] == 20
    assert r["fired_with_200_idle"] == 20
    assert r["memory_store_bytes_per_in_flight_saga"] > 0


@pytest.mark.rabbitmq
def test_events_and_raw_on_rabbitmq_carry_the_ratio(amqp_url: str) -> None:
    report = _bench.run("events", amqp_url, None, 400, 1, 1)
    assert {"raw-quorum", "raw-classic", "events"} <= set(report["median"])
    assert report["ratio_to_raw_quorum"]["events.end_to_end_per_s"] > 0
    assert "events / raw-quorum   end_to_end_per_s" in _bench.table(report)


@pytest.mark.rabbitmq
def test_sagas_on_rabbitmq_carry_the_ratio_of_their_messages_to_raw(amqp_url: str) -> None:
    report = _bench.run("sagas", amqp_url, None, 50, 1, 1)
    sagas = report["median"]["sagas"]
    assert sagas["messages_per_s"] > sagas["sagas_per_s"] > 0
    assert set(report["ratio_to_raw_classic"]) == {"sagas.messages_per_s"}
    assert "sagas / raw-classic  messages_per_s" in _bench.table(report)


def test_sagas_runs_sharing_a_store_each_count_only_their_own(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bench.db"
    first = _bench.bench_sagas("memory://", store, 30)
    second = _bench.bench_sagas("memory://", store, 30)
    # the second run waits for its own 30 sagas (not the 30 already final) and reports only them
    assert first["states"] == second["states"] == {"completed": 27, "compensated": 3}
