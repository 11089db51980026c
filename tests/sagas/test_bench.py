"""`sagas bench`: each workload runs, and reports figures that add up (small N; speed is not tested)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import sagas.console
from sagas import _bench, _bench_latency
from sagas._cli import cli
from sagas._store import HistoryEntry, SagaRecord, open_store
from sagas.console import _bench as console_bench
from sagas.operations import Operations


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


# -- sagas bench console -------------------------------------------------------------------------------


def _fill(url: str, n: int) -> None:
    """``n`` sagas of two types in several states, created a second apart, each with one history row."""
    store = open_store(url)
    try:
        with store.group():
            for i in range(n):
                saga_type, state = ("share", "waiting") if i % 3 else ("upload", "done" if i % 2 else "failed")
                record = SagaRecord(
                    id=f"s{i:05d}",
                    type=saga_type,
                    key=f"{saga_type}-{i:05d}",
                    state=state,
                    data={"n": i},
                    version=1,
                    final=state != "waiting",
                    created_at=1_700_000_000.0 + i,
                    updated_at=1_700_000_000.0 + i,
                )
                history = HistoryEntry(record.created_at, f"m{i}", "started", state, "test")
                store.save_saga(record, expected_version=None, history=history, inbox=None, outbox=[])
    finally:
        store.close()


def test_console_measures_every_page_over_http(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/console.db"
    _fill(store, 300)
    result = CliRunner().invoke(
        cli, ["bench", "console", "--store", store, "--requests", "5", "--repeat", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    kinds = [k for k, _ in console_bench.KINDS]
    assert report["sagas"] == 300
    assert report["requests"] == 5
    assert len(report["runs"]) == 2
    assert list(report["median"]) == kinds, "every page kind, and no dead letters without --broker"
    for run in report["runs"]:
        assert list(run) == kinds
    for kind, figures in report["median"].items():
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"] <= figures["max_ms"], kind
    assert report["over_budget"] == [k for k in kinds if report["median"][k]["p95_ms"] > 200]
    table = console_bench.table(report)
    assert "300 sagas, 5 requests per page (median of 2 runs)" in table
    assert all(f"  {kind} " in table for kind in kinds)


def test_console_samples_sagas_from_the_whole_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/console.db"
    _fill(store, 300)
    with Operations(store) as ops:
        picked = console_bench.sample(ops, 50, random.Random(3))
    assert len(picked) == 50
    assert len({r.id for r in picked}) > 30, "random, not one saga again and again"
    created = sorted(r.created_at - 1_700_000_000 for r in picked)
    assert created[0] < 100, "from the whole store, not one end of it"
    assert created[-1] >= 200, "from the whole store, not one end of it"


def test_console_on_a_bad_store_url_is_an_error_without_traceback() -> None:
    result = CliRunner().invoke(cli, ["bench", "console", "--store", "nosuch://x", "--requests", "1"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert isinstance(result.exception, SystemExit), "a clean exit, not an exception"
    assert "Traceback" not in result.output


def test_console_on_an_empty_store_is_an_error(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/empty.db"
    open_store(store).close()
    result = CliRunner().invoke(cli, ["bench", "console", "--store", store])
    assert result.exit_code == 1
    assert "error: the store holds no saga" in result.output


def test_console_without_the_console_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # (a None entry in sys.modules makes an import fail, as it does when uvicorn is not installed; the
    # bench module is imported afresh)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "sagas.console._bench")
    monkeypatch.delattr(sagas.console, "_bench")
    result = CliRunner().invoke(cli, ["bench", "console", "--store", "sqlite:///x.db"])
    assert result.exit_code == 2
    assert result.output == "error: sagas bench console needs the console: pip install 'kombu-sagas[console]'\n"


def test_console_needs_a_store() -> None:
    result = CliRunner().invoke(cli, ["bench", "console"], env={"SAGAS_BENCH_STORE_URL": ""})
    assert result.exit_code == 2
    assert "error: sagas bench console needs --store" in result.output


@pytest.mark.parametrize("workload", ["events", "sagas"])
def test_variants_report_each_ratio_to_off_and_export_spans_when_traced(workload: str) -> None:
    args = ["bench", workload, "-n", "60", "--variants", "off,metrics,tracing,both", "--repeat", "2", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    key = {"events": "end_to_end_per_s", "sagas": "sagas_per_s"}[workload]
    variants = report["variants"][workload]
    assert list(variants) == ["off", "metrics", "tracing", "both"]
    for name, row in variants.items():
        assert set(row) == {key, "ratio_to_off", "spans", "console_pages"}
        assert row["console_pages"] == 0
        assert row[key] > 0
        assert len(report["runs"][f"{workload}[{name}]"]) == 2
    assert variants["off"]["ratio_to_off"] == 1.0
    assert variants["off"]["spans"] == variants["metrics"]["spans"] == 0
    assert variants["tracing"]["spans"] > 0
    assert variants["both"]["spans"] > 0


@pytest.mark.parametrize("workload", ["events", "sagas"])
def test_the_console_variant_serves_the_console_while_the_workload_runs(
    workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagas import _bench

    monkeypatch.setattr(_bench, "CONSOLE_REFRESH", 0.01)  # (the memory workloads run in this process)
    args = ["bench", workload, "-n", "300", "--variants", "off,console", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    variants = report["variants"][workload]
    assert list(variants) == ["off", "console"]
    assert variants["off"]["console_pages"] == 0
    assert variants["console"]["console_pages"] >= 2  # (the overview and the list, at least once)
    assert variants["console"]["console_pages"] % 2 == 0


def test_variants_are_checked() -> None:
    result = CliRunner().invoke(cli, ["bench", "events", "-n", "10", "--variants", "off,loud"])
    assert result.exit_code == 2
    assert "error: --variants" in result.output


def test_variants_without_the_extras_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    result = CliRunner().invoke(cli, ["bench", "sagas", "-n", "10", "--variants", "off,both"])
    assert result.exit_code == 2
    assert "error: --variants off,both needs" in result.output
    assert "opentelemetry-sdk" in result.output
    assert "kombu-sagas[metrics]" in result.output


def test_a_sampled_variant_records_a_share_of_the_traces() -> None:
    args = ["bench", "sagas", "-n", "60", "--variants", "tracing,tracing@0.1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    variants = json.loads(result.output.strip().splitlines()[-1])["variants"]["sagas"]
    assert list(variants) == ["tracing", "tracing@0.1"]
    assert "ratio_to_tracing" in variants["tracing@0.1"]
    # every saga makes the same spans; at 0.1 about one saga in ten is recorded
    assert 0 <= variants["tracing@0.1"]["spans"] < variants["tracing"]["spans"] / 2


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("metrics@0.1", "does not trace"),
        ("both@0", "not in (0, 1]"),
        ("both@1.5", "not in (0, 1]"),
        ("tracing@half", "not a number"),
        ("loud@0.1", "unknown variant"),
    ],
)
def test_sampling_ratios_are_checked(variant: str, reason: str) -> None:
    result = CliRunner().invoke(cli, ["bench", "sagas", "-n", "10", "--variants", f"off,{variant}"])
    assert result.exit_code == 2
    assert "error: --variants" in result.output
    assert reason in result.output


def test_retention_runs_segments_with_the_pruner_off_and_on_and_samples_the_tables() -> None:
    """``sagas bench retention``: segments alternate the pruner off and on, each handles its share, and
    the samples count the rows of every pruned table (none pruned yet: all inside their windows)."""
    result = CliRunner().invoke(cli, ["bench", "retention", "-n", "40", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert [s["pruner"] for s in report["segments"]] == ["off", "on"]
    assert all(s["sagas"] == 20 and s["events"] == 80 and s["sagas_per_s"] > 0 for s in report["segments"])
    last = report["last"]
    assert last["sagas"] == 40
    assert last["inbox"] >= 160
    assert last["reply_cache"] == 80
    assert last["file_mib"] > 0
    assert report["ratio_on_to_off"] > 0


@pytest.mark.rabbitmq
def test_async_handlers_run_beside_sync_ones_and_carry_their_ratio(amqp_url: str) -> None:
    """``--async-handlers``: each round runs the events workload with a plain and with an ``async def``
    handler, in the same invocation, and the report gives the async one's ratio to the sync one."""
    args = ["bench", "events", "--broker", amqp_url, "-n", "200", "--repeat", "2", "--async-handlers", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert len(report["runs"]["events"]) == len(report["runs"]["events-async"]) == 2
    sync, aio = report["median"]["events"], report["median"]["events-async"]
    assert report["ratio_async_to_sync"]["end_to_end_per_s"] == round(
        aio["end_to_end_per_s"] / sync["end_to_end_per_s"], 3
    )
    assert "raw-classic" in report["runs"]


@pytest.mark.parametrize("args", [["sagas"], ["events", "--variants", "off,both"]])
def test_async_handlers_apply_to_the_events_workload_alone(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["bench", *args, "-n", "10", "--async-handlers"])
    assert result.exit_code == 2
    assert "error: --async-handlers applies to the events workload" in result.output


def _scaled(report: dict[str, Any], faster: float) -> dict[str, Any]:
    """``report`` as if everything had been ``faster`` times as fast (throughputs times it, times divided)."""
    scaled: dict[str, Any] = json.loads(json.dumps(report))
    for medians in scaled["median"].values():
        for figure, value in medians.items():
            if figure.endswith("_per_s"):
                medians[figure] = value * faster
            elif figure.endswith(("_ms", "_mib")):
                medians[figure] = value / faster
    return scaled


def test_a_baseline_comparison_prints_the_regressions_and_exits_1(tmp_path: Path) -> None:
    """``--baseline FILE``: every figure of the saved report is compared; one worse by more than the
    tolerance is a REGRESSION and the command exits 1; a baseline that was slower everywhere gives none."""
    first = CliRunner().invoke(cli, ["bench", "events", "-n", "300", "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output.strip().splitlines()[-1])
    faster, slower = tmp_path / "faster.json", tmp_path / "slower.json"
    faster.write_text(json.dumps(_scaled(report, 10.0)))
    slower.write_text(json.dumps(_scaled(report, 0.1)))

    regressed = CliRunner().invoke(cli, ["bench", "events", "-n", "300", "--baseline", str(faster)])
    assert regressed.exit_code == 1, regressed.output
    assert f"against the baseline {faster}" in regressed.output
    assert "events end_to_end_per_s" in regressed.output
    assert "REGRESSION" in regressed.output

    fine = CliRunner().invoke(cli, ["bench", "events", "-n", "300", "--baseline", str(slower), "--json"])
    assert fine.exit_code == 0, fine.output
    compared = json.loads(fine.output.strip().splitlines()[-1])["baseline"]
    assert compared["regressions"] == 0
    assert {f["figure"] for f in compared["figures"]} >= {"end_to_end_per_s", "latency_p99_ms"}
    assert all(not f["regression"] for f in compared["figures"])


def test_a_regression_is_worse_than_the_tolerance_in_the_figures_direction() -> None:
    from sagas._bench_baseline import compare

    base = {"median": {"events": {"end_to_end_per_s": 1000, "latency_p99_ms": 100.0, "n": 5}}}
    now = {"median": {"events": {"end_to_end_per_s": 905, "latency_p99_ms": 111.0, "n": 9}, "sagas": {"x_per_s": 1}}}
    rows = {r.figure: r for r in compare(now, base)}
    assert set(rows) == {"end_to_end_per_s", "latency_p99_ms"}  # (n has no direction; sagas not in the baseline)
    assert not rows["end_to_end_per_s"].regressed(0.1)
    assert rows["end_to_end_per_s"].regressed(0.05)
    assert rows["latency_p99_ms"].regressed(0.1)
    assert not rows["latency_p99_ms"].regressed(0.2)


@pytest.mark.parametrize(
    ("content", "says"),
    [("not json", "is not a report of `sagas bench ... --json`"), ('{"runs": {}}', "no 'median' section")],
)
def test_a_baseline_that_is_not_a_report_is_an_error(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "base.json"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["bench", "events", "-n", "10", "--baseline", str(path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: --baseline: ")
    assert says in result.output
    missing = CliRunner().invoke(cli, ["bench", "events", "--baseline", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2
    assert "cannot read" in missing.output


# -- sagas bench latency -------------------------------------------------------------------------------


def test_latency_on_memory_reports_every_rate_with_its_percentiles() -> None:
    """Each offered rate, events and sagas, has its achieved rate and p50/p99/p99.9; no raw on memory."""
    result = CliRunner().invoke(
        cli, ["bench", "latency", "--rates", "200,400", "--saga-rates", "50", "--seconds", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert list(report["median"]) == ["events@200", "events@400", "sagas@50"]
    for name, med in report["median"].items():
        assert med["rate"] == int(name.split("@")[1])
        assert med["achieved_per_s"] == pytest.approx(med["rate"], rel=0.1)
        assert 0 < med["p50_ms"] <= med["p99_ms"] <= med["p99_9_ms"]
    # the warm-up second is not counted: about one second's worth of each rate is
    assert [r["counted"] for r in report["runs"]["events@400"]] == [pytest.approx(400, rel=0.1)]
    assert report["not_offered"] == []
    assert "ratio_to_raw" not in report, "the raw ceiling needs RabbitMQ"


def test_latency_paces_to_the_offered_rate_in_small_batches() -> None:
    """The publisher sends what the schedule owes every tick: the rate holds, in batches of a few."""
    batches: list[tuple[float, int]] = []
    t0, t1, sent = _bench_latency.paced(1000, 0.5, lambda k: batches.append((time.monotonic(), k)))
    assert sent == sum(k for _, k in batches) == 500
    assert sent / (t1 - t0) == pytest.approx(1000, rel=0.05)
    assert max(k for _, k in batches) <= 30, "no burst: a tick owes about 10 events at 1,000/s"
    assert len(batches) >= 40


def test_latency_flags_a_rate_the_publisher_cannot_offer() -> None:
    """A publisher that takes 2 ms per message cannot offer 1,000/s: its run says so."""
    t0, t1, sent = _bench_latency.paced(1000, 0.2, lambda k: time.sleep(0.002 * k))
    figures = _bench_latency.rate_figures(1000, 0.2, t0, t1, sent, [t0], [0.001])
    assert figures["achieved_per_s"] < 700
    assert figures["offered"] is False


@pytest.mark.parametrize("option", ["--rates", "--saga-rates"])
@pytest.mark.parametrize("value", ["500,fast", "0", "500,500"])
def test_latency_refuses_bad_rates(option: str, value: str) -> None:
    """A rate that is not a whole number from 1 to 100,000, or one given twice, is a usage error."""
    result = CliRunner().invoke(cli, ["bench", "latency", option, value])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {option}: a comma-separated list of distinct rates")


@pytest.mark.rabbitmq
def test_latency_on_rabbitmq_runs_raw_at_the_same_rate_and_gives_the_ratios(amqp_url: str) -> None:
    """Events and raw py-amqp at one rate, sagas at another: ratios are ours/raw per percentile."""
    report = _bench_latency.run(amqp_url, [200], [50], 1, 1)
    assert list(report["median"]) == ["events@200", "raw@200", "sagas@50"]
    for med in report["median"].values():
        assert med["achieved_per_s"] == pytest.approx(med["rate"], rel=0.1)
        assert 0 < med["p50_ms"] <= med["p99_ms"] <= med["p99_9_ms"]
    ours, raw = report["median"]["events@200"], report["median"]["raw@200"]
    assert report["ratio_to_raw"]["200"] == {
        p: round(ours[f"{p}_ms"] / raw[f"{p}_ms"], 2) for p in ("p50", "p99", "p99_9")
    }
    assert "events / raw" in _bench_latency.table(report)
