"""``sagas bench publish``: confirmed publishes per second, the sync bus beside the asyncio publisher.

Both publish N events of the events workload (about 100 bytes of payload, persistent, with publisher
confirms) to a fresh exchange with one durable classic queue bound (as the peer benchmarks do), and
nothing consuming it:

- **sync**: :meth:`EventBus.publish_many` in batches of ``--in-flight`` events (pipelined confirms), one
  batch after the other, on the calling thread;
- **async**: an :class:`~sagas.aio.AsyncPublisher` with ``--in-flight`` awaited publishes outstanding at
  any time: a task per publish, a new one started as soon as one returns (its event built and encoded
  on the loop, as an application's would be).

Each figure is N divided by the time from the first publish to the last confirm. The runs alternate
(sync first in odd rounds, async first in even ones); the report gives every run, the medians and the
ratio async/sync. On ``memory://`` there are no confirms: the figures measure the framework alone.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from contextlib import suppress
from typing import Any

from transport import AsyncPublisher, Event, EventBus, redact_url

EVENT = "bench.events.created"


def _payload(i: int) -> dict[str, Any]:
    return {"file": "/home/a.txt", "grantee": "marie", "n": i}  # ~100 bytes once in the envelope


def _declare_queue(bus: EventBus, queue: str) -> None:
    """A durable classic queue bound to every event of the bench (declared on a channel of its own)."""
    bus.connect()
    if bus.memory:
        from transport import Subscription

        bus.declare(Subscription(queue, (EVENT,)))
        return
    ch = bus.channel()
    try:
        ch.queue_declare(queue=queue, durable=True, auto_delete=False)
        ch.queue_bind(queue=queue, exchange=bus.exchange, routing_key=EVENT)
    finally:
        ch.close()
    bus.declared_queues.add(queue)


def _sync(broker: str, exchange: str, n: int, in_flight: int) -> float:
    bus = EventBus(broker, exchange=exchange)
    try:
        bus.connect()
        t0 = time.perf_counter()
        for start in range(0, n, in_flight):
            bus.publish_many([Event(EVENT, _payload(i)) for i in range(start, min(n, start + in_flight))])
        return n / (time.perf_counter() - t0)
    finally:
        bus.close()


async def _async(broker: str, exchange: str, n: int, in_flight: int) -> tuple[float, int]:
    async with AsyncPublisher(broker, exchange=exchange) as pub:
        window = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            try:
                await pub.publish(EVENT, _payload(i))
            finally:
                window.release()

        tasks = []
        t0 = time.perf_counter()
        for i in range(n):
            await window.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        rate = n / (time.perf_counter() - t0)
        return rate, pub.batches


def _purge(bus: EventBus, queue: str) -> None:
    if bus.memory:
        bus.delete_queue(queue)
        return
    ch = bus.channel()
    try:
        ch.queue_purge(queue=queue)
    finally:
        ch.close()


def bench_publish(broker: str, n: int, in_flight: int = 500, repeat: int = 3) -> dict[str, Any]:
    """Run the sync and the async publisher ``repeat`` times each, alternating; report every run, the
    medians and the ratio of the async median to the sync one."""
    exchange = f"bench-pub-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.held"
    admin = EventBus(broker, exchange=exchange)
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    try:
        _declare_queue(admin, queue)
        for r in range(repeat):
            order = ("sync", "async") if r % 2 == 0 else ("async", "sync")
            for kind in order:
                print(f"\rpublish: round {r + 1} of {repeat}, {kind:<5}", end="", file=sys.stderr, flush=True)
                if kind == "sync":
                    runs["sync"].append({"publish_per_s": round(_sync(broker, exchange, n, in_flight))})
                else:
                    rate, batches = asyncio.run(_async(broker, exchange, n, in_flight))
                    runs["async"].append({"publish_per_s": round(rate), "batches": batches})
                _purge(admin, queue)
                if admin.memory:
                    _declare_queue(admin, queue)
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
    finally:
        with suppress(Exception):
            admin.delete_topology()
        admin.close()
    medians = {kind: statistics.median(r["publish_per_s"] for r in rows) for kind, rows in runs.items()}
    return {
        "workload": "publish",
        "broker": redact_url(broker),
        "n": n,
        "in_flight": in_flight,
        "queue": "classic, durable, not consumed",
        "python": sys.version.split()[0],
        "runs": runs,
        "median": medians,
        "ratio_async_to_sync": round(medians["async"] / medians["sync"], 2) if medians["sync"] else None,
    }


def table(report: dict[str, Any]) -> str:
    rounds = len(report["runs"]["sync"])
    lines = [
        f"publish: {report['n']:,} events, {report['in_flight']} in flight, {report['broker']} "
        f"(median of {rounds} run{'s' if rounds > 1 else ''} each, alternating)",
        f"  sync  EventBus.publish_many      {report['median']['sync']:>10,.0f}/s",
        f"  async AsyncPublisher.publish     {report['median']['async']:>10,.0f}/s",
        f"  async / sync                     {report['ratio_async_to_sync']:>10.2f}",
    ]
    return "\n".join(lines)
