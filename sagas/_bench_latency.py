"""``sagas bench latency``: latency at a steady, offered load, beside raw py-amqp at the same rates.

The throughput workloads publish as fast as they can, so their latency is mostly queueing. Here a
publisher offers a fixed rate instead, and the figures are the latency of each message at that load:

- **events** at each of ``--rates`` (events/s): the events workload's no-op handler in a worker process
  (a thread on ``memory://``); each figure is the publish-to-handle latency (the handler's clock minus the
  event's ``time``, set when its publish began);
- **raw** at the same rates, on RabbitMQ only: plain py-amqp, a quorum queue (what the framework declares
  for at-least-once) and a consumer process that decodes the JSON and acks each message; the same latency;
- **sagas** at each of ``--saga-rates`` (sagas/s): the sagas workload's 3-step sagas in one worker process;
  each figure is a saga's duration, from the publish of its start event to its final state in the store.

Pacing: every 10 ms the publisher sends what the schedule owes (``rate x elapsed`` on a monotonic clock,
minus what it sent), as one batch with pipelined confirms, waiting for the batch's confirms as
``EventBus.publish_many`` does. A publisher that falls behind sends more in its next batch, so the offered
rate holds while it can; the report gives the achieved rate (messages / time from the first publish to the
last confirm) and flags a rate the publisher could not offer (achieved below 97 % of the rate).

Each rate runs one second of warm-up and then ``--seconds``; messages published in the warm-up are not
counted. Percentiles p50, p99 and p99.9 per rate; ``--repeat`` gives medians (ours and raw alternate
which goes first); the ratio ours/raw is per percentile, of the medians.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from transport import Event, EventBus, redact_url

from . import _bench
from ._gc import tune_gc
from ._store import open_store
from ._worker import Worker

#: seconds at the start of each rate whose messages are not counted
WARMUP = 1.0
#: the publisher's tick
TICK = 0.01
#: an achieved rate below this fraction of the offered one is flagged
OFFERED_FLOOR = 0.97
#: the percentiles reported, by name
PERCENTILES = (("p50", 0.5), ("p99", 0.99), ("p99_9", 0.999))


def parse_rates(text: str, option: str, allow_empty: bool = False) -> list[int]:
    """``"500,2000"`` as ``[500, 2000]``. Raises ValueError (naming ``option``) on anything but a
    comma-separated list of distinct whole numbers from 1 to 100,000 (or an empty text, with
    ``allow_empty``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts and allow_empty:
        return []
    try:
        rates = [int(p.replace("_", "")) for p in parts]
    except ValueError:
        rates = []
    if not rates or any(not 1 <= r <= 100_000 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(
            f"{option}: a comma-separated list of distinct rates per second from 1 to 100000 "
            f"(for example 500,2000,5000), not {text!r}"
        )
    return rates


def paced(rate: int, seconds: float, send: Callable[[int], None]) -> tuple[float, float, int]:
    """Call ``send(k)`` every :data:`TICK` with what the schedule owes, for ``seconds``; ``send`` returns
    once its ``k`` messages are confirmed. Returns (first publish, last confirm) on the wall clock and the
    messages sent: ``round(rate * seconds)``."""
    total = round(rate * seconds)
    sent = 0
    t0_wall = time.time()
    start = time.monotonic()
    tick = 0
    while sent < total:
        owed = min(total, int(rate * (time.monotonic() - start)) + 1) - sent
        if owed > 0:
            send(owed)
            sent += owed
        tick += 1
        pause = start + tick * TICK - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:  # behind: the next batch catches up (no ticks are replayed)
            tick = int((time.monotonic() - start) / TICK)
    return t0_wall, time.time(), sent


def rate_figures(
    rate: int, seconds: float, t0: float, t1: float, n: int, sent: Sequence[float], values: Sequence[float]
) -> dict[str, Any]:
    """A run's figures: the rate offered and achieved, and the percentiles of the values whose message was
    published after the warm-up (``sent``: each value's publish time)."""
    kept = [v for s, v in zip(sent, values, strict=True) if s >= t0 + WARMUP]
    achieved = n / max(t1 - t0, 1e-9)
    figures: dict[str, Any] = {
        "rate": rate,
        "seconds": seconds,
        "achieved_per_s": round(achieved, 1),
        "offered": achieved >= OFFERED_FLOOR * rate,
        "counted": len(kept),
    }
    for name, q in PERCENTILES:
        figures[f"{name}_ms"] = round(_bench.pct(kept, q) * 1000, 2)
    return figures


def _wait_collected(got: dict[str, Any], n: int, what: str) -> None:
    if len(got["latencies"]) < n:
        raise RuntimeError(f"{what}: only {len(got['latencies'])} of {n} events were handled")


def events(broker: str, rate: int, seconds: float) -> dict[str, Any]:
    """The events workload at ``rate`` events/s for the warm-up and then ``seconds``."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    n = round(rate * (WARMUP + seconds))
    bus = EventBus(broker, exchange=exchange)

    def send(k: int) -> None:  # built just before they are sent: an event's time is when its publish began
        bus.publish_many([Event(_bench.EVENT, _bench.payload(i), source="bench") for i in range(k)])

    if broker.startswith("memory://"):
        collector = _bench.Collector(n)
        app = _bench.events_app(exchange, collector)
        worker = Worker(app, broker=broker, store=open_store("memory://"), prune=False)
        with worker.running():
            tune_gc()  # (this process is the worker's, as with `sagas run`)
            t0, t1, sent = paced(rate, WARMUP + seconds, send)
            collector.done.wait(600)
        got = collector.report()
        bus.close()
    else:
        child, results = _bench.spawn(_bench.events_worker, broker, exchange, n, "off", False)
        try:
            bus.connect()
            t0, t1, sent = paced(rate, WARMUP + seconds, send)
            got = results.get(timeout=600)
        finally:
            child.join(30)
            _bench.cleanup(bus, [f"{exchange}.bench.noop"])
    _wait_collected(got, n, f"events at {rate}/s")
    return rate_figures(rate, seconds, t0, t1, sent, got["sent"], got["latencies"])


def raw(broker: str, rate: int, seconds: float) -> dict[str, Any]:
    """Plain py-amqp at ``rate`` messages/s on a quorum queue, paced as :func:`events` is."""
    n = round(rate * (WARMUP + seconds))
    pub = _bench.RawPublisher(broker, "quorum")
    child, results = _bench.spawn(_bench.raw_consumer, broker, pub.name, n)
    try:
        pub.confirm()
        t0, t1, sent = paced(rate, WARMUP + seconds, pub.publish_confirmed)
        got = results.get(timeout=600)
    finally:
        child.join(30)
        pub.close()
    _wait_collected(got, n, f"raw at {rate}/s")
    return rate_figures(rate, seconds, t0, t1, sent, got["sent"], got["latencies"])


def sagas(broker: str, rate: int, seconds: float) -> dict[str, Any]:
    """The sagas workload at ``rate`` sagas/s; each saga's duration runs from its start event's publish
    (carried in its data as ``sent``) to its final state."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    n = round(rate * (WARMUP + seconds))
    memory = broker.startswith("memory://")
    bus = EventBus(broker, exchange=exchange)
    count = [0]

    def send(k: int) -> None:
        first, count[0] = count[0], count[0] + k
        now = time.time()
        bus.publish_many(
            [
                Event(
                    "bench.orders.placed",
                    {"order": f"{exchange}-{i}", "fail": i % 10 == 9, "sent": now},
                    source="bench",
                )
                for i in range(first, first + k)
            ]
        )

    if memory:
        store = open_store("memory://")
        worker = Worker(_bench.sagas_app(exchange), broker=broker, store=store, prune=False)
        with worker.running():
            tune_gc()  # (this process is the worker's, as with `sagas run`)
            t0, t1, sent = paced(rate, WARMUP + seconds, send)
            _bench.wait_final(store, 0, n)
            records = _bench.own_sagas(store, exchange)
        bus.close()
    else:
        tmp = tempfile.mkdtemp(prefix="sagas-bench-")
        store_url = f"sqlite:///{tmp}/latency.db"
        stop = mp.get_context("spawn").Event()
        child, results = _bench.spawn(_bench.run_saga_worker, broker, store_url, exchange, "off", stop)
        reader = open_store(store_url)
        try:
            bus.connect()
            t0, t1, sent = paced(rate, WARMUP + seconds, send)
            _bench.wait_final(reader, 0, n)
            records = _bench.own_sagas(reader, exchange)
        finally:
            stop.set()
            results.get(timeout=60)
            child.join(30)
            reader.close()
            _bench.cleanup(bus, [f"{exchange}.saga.bench", *(f"{exchange}.{q}" for q in _SAGA_QUEUES)])
    _bench.done_progress()
    final = [r for r in records if r.final]
    return rate_figures(
        rate, seconds, t0, t1, sent, [r.data["sent"] for r in final], [r.updated_at - r.data["sent"] for r in final]
    )


_SAGA_QUEUES = ("stock.reserve", "stock.release", "payments.charge", "payments.refund", "shipping.ship")


def run(broker: str, rates: Sequence[int], saga_rates: Sequence[int], seconds: float, repeat: int) -> dict[str, Any]:
    """Every rate ``repeat`` times: events (and raw, on RabbitMQ; the two alternate which goes first),
    then sagas. Reports every run, the medians, the ratios ours/raw per percentile, and the rates that
    could not be offered."""
    memory = broker.startswith("memory://")
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(repeat):
        for rate in rates:
            order = ("events", "raw") if r % 2 == 0 else ("raw", "events")
            for kind in order:
                if kind == "raw" and memory:
                    continue
                _bench.progress(f"latency: {kind} at {rate:,}/s, run {r + 1} of {repeat}")
                figures = events(broker, rate, seconds) if kind == "events" else raw(broker, rate, seconds)
                runs.setdefault(f"{kind}@{rate}", []).append(figures)
        for rate in saga_rates:
            _bench.progress(f"latency: sagas at {rate:,}/s, run {r + 1} of {repeat}")
            runs.setdefault(f"sagas@{rate}", []).append(sagas(broker, rate, seconds))
    _bench.done_progress()
    report: dict[str, Any] = {
        "workload": "latency",
        "broker": redact_url(broker),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "warmup_s": WARMUP,
        "runs": runs,
        "median": {},
    }
    for name, items in runs.items():
        report["median"][name] = {
            "rate": items[0]["rate"],
            **{
                k: statistics.median(i[k] for i in items)
                for k in ("achieved_per_s", *(f"{p}_ms" for p, _ in PERCENTILES))
            },
        }
    report["not_offered"] = [name for name, items in runs.items() if not all(i["offered"] for i in items)]
    if not memory:
        report["ratio_to_raw"] = {str(rate): _ratios(report["median"], rate) for rate in rates}
    return report


def _ratios(median: dict[str, Any], rate: int) -> dict[str, float | None]:
    """ours / raw per percentile at ``rate`` (None when raw's is 0)."""
    ours, theirs = median[f"events@{rate}"], median[f"raw@{rate}"]
    return {p: round(ours[f"{p}_ms"] / theirs[f"{p}_ms"], 2) if theirs[f"{p}_ms"] else None for p, _ in PERCENTILES}


def table(report: dict[str, Any]) -> str:
    """The report for the terminal: one row per workload and rate, then the ratios."""
    n_runs = len(next(iter(report["runs"].values()), []))
    lines = [
        f"latency at a steady rate on {report['broker']}: {report['seconds']:g} s per rate after "
        f"{report['warmup_s']:g} s of warm-up (median of {n_runs} run{'s' if n_runs != 1 else ''})",
        f"  {'workload':<8} {'rate/s':>8} {'achieved/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}",
    ]
    for name, med in report["median"].items():
        kind = name.split("@")[0]
        flag = "   NOT OFFERED" if name in report["not_offered"] else ""
        lines.append(
            f"  {kind:<8} {med['rate']:>8,} {med['achieved_per_s']:>11,.0f} {med['p50_ms']:>9.2f} "
            f"{med['p99_ms']:>9.2f} {med['p99_9_ms']:>9.2f}{flag}"
        )
    if report.get("ratio_to_raw"):
        lines.append(f"  events / raw  {'rate/s':>8} {'p50':>7} {'p99':>7} {'p99.9':>7}")
        for rate, ratios in report["ratio_to_raw"].items():
            cells = " ".join(f"{'-' if v is None else f'{v:.2f}':>7}" for v in ratios.values())
            lines.append(f"               {int(rate):>8,} {cells}")
    if report["not_offered"]:
        lines.append(
            f"NOT OFFERED: the publisher could not keep {OFFERED_FLOOR:.0%} of the rate for "
            + ", ".join(report["not_offered"])
        )
    return "\n".join(lines)
