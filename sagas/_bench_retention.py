"""``sagas bench retention``: the store's size over time with short retention windows, and the
throughput with and without the pruner.

One worker (on this process's thread; memory:// broker by default, or RabbitMQ with a fresh
exchange) runs three-step sagas and an idempotent event handler over a fresh SQLite file, with
windows of seconds. The load comes in segments of equal size, alternating with and without a pruner
(a :class:`Pruner` on its own thread and connection, every second, with the default batches and
pauses, as the elected worker runs it);
each round starts with the other one, so neither is always first. Every two seconds (a thread), and at the end
of each segment, it samples the tables' row counts and the file's size (with its WAL).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

from transport import Event, EventBus

from ._observe import NullObserver
from ._retention import Pruner, Retention
from ._saga import SagaContext, Start, Step, StepSaga
from ._service import App, Service
from ._store import RETAINED_TABLES, SQLiteStore, open_store
from ._worker import Worker

#: short windows that pass the floors for the saga below (its requests re-send for at most 31.5 s)
SHORT = Retention(finished=32, inbox=16, outbox_sent=2, replies=32)
#: sagas in flight at most (and four times as many events)
WINDOW = 200
TABLES = RETAINED_TABLES


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


class RetainedSaga(StepSaga):
    type = "retained"
    start = Start("bench.retained.placed", key="order", do=_keep)
    steps = [  # noqa: RUF012 - saga types declare their steps as a class-level list
        Step("reserve", request="bench.retained.reserve", compensation="bench.retained.release", timeout=5, retries=1),
        Step("charge", request="bench.retained.charge", timeout=5, retries=1),
    ]


class _Ends(NullObserver):
    def __init__(self) -> None:
        self.ended = 0

    def transition(self, saga_type: str, from_state: str, to_state: str, final: bool) -> None:
        if final:
            self.ended += 1


def _app(exchange: str, handled: list[int]) -> App:
    stock, payments, events = Service("stock"), Service("payments"), Service("audit")
    stock.handles("bench.retained.reserve", name="reserve")(lambda e: {"ok": 1})
    stock.handles("bench.retained.release", name="release")(lambda e: None)
    payments.handles("bench.retained.charge", name="charge")(lambda e: {"ok": 1})

    def record(event: Event) -> None:
        handled[0] += 1

    events.on("bench.retained.happened", idempotent=True)(record)
    return App(stock, payments, events, sagas=[RetainedSaga], exchange=exchange, retention=SHORT)


def _sample(path: str, t0: float) -> dict[str, Any]:
    store = open_store(f"sqlite:///{path}", create=False)  # (a connection of its own, on the caller's thread)
    assert isinstance(store, SQLiteStore)
    try:
        rows = store.row_counts()
    finally:
        store.close()
    size = sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))
    return {"t": round(time.monotonic() - t0, 1), **rows, "file_mib": round(size / 2**20, 2)}


def bench_retention(broker: str, sagas: int, events: int, rounds: int = 3) -> dict[str, Any]:
    """Run ``sagas`` sagas and ``events`` events in ``2 * rounds`` segments, alternating pruner off and
    on; report each segment's throughput, the medians per mode, and the samples of rows and bytes."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    path = os.path.join(tempfile.mkdtemp(prefix="sagas-bench-retention-"), "retention.db")
    url = f"sqlite:///{path}"
    handled = [0]
    ends = _Ends()
    worker = Worker(_app(exchange, handled), broker=broker, store=url, prune=False, observer=ends)
    bus = EventBus(broker, exchange=exchange)
    segments = 2 * rounds
    per_sagas, per_events = sagas // segments, events // segments
    samples: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    current = ["off"]
    done = threading.Event()

    def sample_every_2s() -> None:
        while not done.wait(2.0):
            samples.append({**_sample(path, t_start), "mode": current[0]})

    sampler = threading.Thread(target=sample_every_2s, name="bench-sampler", daemon=True)
    with worker.running():
        sampler.start()
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                seg = len(runs)
                pruner = None
                if mode == "on":
                    pruner = Pruner(url, SHORT, instance="bench", interval=1.0, first_after=0.0)
                    pruner.start()
                target_sagas, target_events = ends.ended + per_sagas, handled[0] + per_events
                starts = [
                    Event("bench.retained.placed", {"order": f"{exchange}-{seg}-{i}"}, source="bench")
                    for i in range(per_sagas)
                ]
                happened = [Event("bench.retained.happened", {"i": i}, source="bench") for i in range(per_events)]
                current[0] = mode
                t0 = time.monotonic()
                step = max(1, per_events // max(1, per_sagas))
                base_sagas, base_events = ends.ended, handled[0]
                for i in range(0, max(per_sagas, 1)):
                    # (a steady load, not a backlog: at most WINDOW sagas in flight, so no request outwaits
                    # its 5 s deadline in a queue)
                    while i - (ends.ended - base_sagas) > WINDOW or i * step - (handled[0] - base_events) > 4 * WINDOW:
                        time.sleep(0.001)
                    batch = starts[i : i + 1] + happened[i * step : (i + 1) * step]
                    if batch:
                        bus.publish_many(batch)
                if per_sagas * step < per_events:
                    bus.publish_many(happened[per_sagas * step :])
                deadline = time.monotonic() + max(600.0, (per_sagas + per_events) / 20)
                while ends.ended < target_sagas or handled[0] < target_events:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"segment {seg} did not finish in time")
                    time.sleep(0.02)
                seconds = time.monotonic() - t0
                if pruner is not None:
                    pruner.stop()
                samples.append({**_sample(path, t_start), "mode": mode})
                runs.append(
                    {
                        "segment": seg,
                        "pruner": mode,
                        "sagas": per_sagas,
                        "events": per_events,
                        "seconds": round(seconds, 2),
                        "sagas_per_s": round(per_sagas / seconds, 1),
                        "events_per_s": round(per_events / seconds, 1),
                    }
                )
        done.set()
        sampler.join()
    bus.close()
    median = {
        mode: {k: statistics.median(x[k] for x in runs if x["pruner"] == mode) for k in ("sagas_per_s", "events_per_s")}
        for mode in ("off", "on")
    }
    ratio = (
        round(median["on"]["sagas_per_s"] / median["off"]["sagas_per_s"], 3) if median["off"]["sagas_per_s"] else None
    )
    return {
        "broker": broker.split("@")[-1],
        "store": "sqlite (fresh file)",
        "retention": {
            "finished": SHORT.finished,
            "inbox": SHORT.inbox,
            "outbox_sent": SHORT.outbox_sent,
            "replies": SHORT.replies,
        },
        "sagas": sagas,
        "events": events,
        "segments": runs,
        "median": median,
        "ratio_on_to_off": ratio,
        "samples": samples,
        "peak": {k: max(s[k] for s in samples) for k in (*TABLES, "file_mib")},
        "last": samples[-1],
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"retention bench: {report['sagas']:,} sagas, {report['events']:,} events, windows {report['retention']}"]
    lines.append("segment  pruner  seconds  sagas/s  events/s")
    for s in report["segments"]:
        lines.append(
            f"{s['segment']:>7}  {s['pruner']:>6}  {s['seconds']:>7.1f}  {s['sagas_per_s']:>7.1f}"
            f"  {s['events_per_s']:>8.1f}"
        )
    for mode, m in report["median"].items():
        lines.append(f"median pruner {mode}: {m['sagas_per_s']:.1f} sagas/s, {m['events_per_s']:.1f} events/s")
    lines.append(f"ratio on/off (sagas/s): {report['ratio_on_to_off']}")
    lines.append("   t(s)  mode    sagas  history  outbox   inbox  replies  file MiB")
    for s in report["samples"]:
        lines.append(
            f"{s['t']:>7.1f}  {s['mode']:>4}  {s['sagas']:>7}  {s['saga_history']:>7}  {s['outbox']:>6}"
            f"  {s['inbox']:>6}  {s['reply_cache']:>7}  {s['file_mib']:>8.2f}"
        )
    return "\n".join(lines)
