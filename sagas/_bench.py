"""``sagas bench``: the framework's speed on your broker and store, beside the raw client's ceiling.

- **events**: N at-least-once events published with confirms (pipelined, in batches) by one publisher,
  handled by a no-op handler in a worker process. Confirmed publish/s, handled/s, end-to-end/s
  (first publish to last handled), p50/p99 publish-to-handle latency, the worker's peak RSS.
- **raw**: the events workload on plain py-amqp: a publisher with pipelined confirms (256 in flight) and a
  consumer that decodes the JSON and acks each message. The ceiling for a Python client, run with
  events and sagas on RabbitMQ: their reports carry the ratio to it (for sagas, of the saga messages
  moved per second to the raw end-to-end rate).
- **sagas**: N step-style sagas of 3 request/reply steps (the last fails for 10 % of them, which then
  compensate the two before), run by ``--workers`` worker processes that also host the participants.
  Sagas/s, saga messages/s, p50/p99 saga duration, messages and store writes per saga, peak RSS.

On ``memory://`` everything runs in this process (the memory broker lives in one process).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transport import Event, EventBus, redact_url

from ._gc import tune_gc
from ._logging import configure_logging
from ._saga import SagaContext, Start, Step, StepSaga
from ._service import App, Service
from ._store import HistoryEntry, SagaRecord, Store, open_store
from ._worker import Worker
from .operations import MAX_PAGE, Operations

EVENT = "bench.events.created"
PUBLISH_BATCH = 500


def progress(text: str) -> None:
    print(f"\r{text:<70}", end="", file=sys.stderr, flush=True)


def done_progress() -> None:
    print("\r" + " " * 72 + "\r", end="", file=sys.stderr, flush=True)


def _rss_mib() -> float:
    """This process's peak RSS. On Linux from /proc (VmHWM): ``ru_maxrss`` of a spawned process starts at
    the RSS of the process that forked it, which made every worker look as big as the bench."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def payload(i: int) -> dict[str, Any]:
    return {"file": "/home/a.txt", "grantee": "marie", "n": i}  # ~100 bytes once in the envelope


# -- observability variants ---------------------------------------------------------------------------

#: the variants ``--variants`` may name: tracing and metrics off, metrics on, tracing on, both on, the
#: console on; ``tracing`` and ``both`` take a head-sampling ratio, ``tracing@0.1`` (default: every trace
#: recorded)
VARIANTS = ("off", "metrics", "tracing", "both", "console")
#: how often the console variant's operator asks for the overview and the list of sagas (seconds)
CONSOLE_REFRESH = 1.0


def parse_variant(variant: str) -> tuple[str, float]:
    """``(kind, sampling ratio)`` of a variant: ``both@0.1`` is ``("both", 0.1)``, ``tracing`` is
    ``("tracing", 1.0)``. Raises ValueError on a name not in :data:`VARIANTS`, a ratio outside
    ``(0, 1]``, or a ratio on a variant that does not trace."""
    kind, at, ratio = variant.partition("@")
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {kind!r}")
    if not at:
        return kind, 1.0
    if kind not in ("tracing", "both"):
        raise ValueError(f"{kind!r} does not trace: it takes no sampling ratio")
    try:
        value = float(ratio)
    except ValueError:
        raise ValueError(f"the sampling ratio of {variant!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"the sampling ratio of {variant!r} is not in (0, 1]")
    return kind, value


def missing_extras(variants: Sequence[str]) -> str | None:
    """What the variants need that is not installed (an install hint), or None."""
    needs = []
    kinds = [parse_variant(v)[0] for v in variants]
    if any(v in ("tracing", "both") for v in kinds):
        try:
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            needs.append("the OpenTelemetry SDK (pip install 'kombu-sagas[otel]' opentelemetry-sdk)")
    if any(v in ("metrics", "both") for v in kinds):
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            needs.append("prometheus_client (pip install 'kombu-sagas[metrics]')")
    if "console" in kinds:
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            needs.append("the console (pip install 'kombu-sagas[console]')")
    return " and ".join(needs) or None


class _CountingExporter:
    """A span exporter that counts the spans it is given (and keeps none)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@contextlib.contextmanager
def _observed(variant: str, worker: Worker, store: str | Store) -> Iterator[dict[str, Any]]:
    """Run ``worker`` with the variant's tracing and metrics: tracing, an SDK TracerProvider with a
    BatchSpanProcessor and a counting exporter (with a ratio, ``both@0.1``, sampled at the root by
    ``ParentBased(TraceIdRatioBased(ratio))``, the SDK's head sampling); metrics, the Prometheus
    observer serving on an ephemeral port of 127.0.0.1 (as ``sagas run --metrics-port`` does; nothing
    scrapes it); console, the console over the worker's store, served on an ephemeral port, with an
    operator asking for its overview and its list of sagas every :data:`CONSOLE_REFRESH` seconds.
    Yields a dict that holds ``spans``, the spans exported, and ``console_pages``, the console's pages
    served, once the block ends."""
    from . import _tracing

    out: dict[str, Any] = {"spans": 0}
    provider = exporter = metrics = None
    kind, ratio = parse_variant(variant)
    console = contextlib.ExitStack()
    if kind == "console":
        console.enter_context(_operator(worker, store, out))
    if kind in ("tracing", "both"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        exporter = _CountingExporter()
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]
        _tracing.set_tracer_provider(provider)
    if kind in ("metrics", "both"):
        from ._metrics import Metrics

        metrics = Metrics(store, instance=worker.instance)
        worker.observer = metrics
        metrics.serve(0, "127.0.0.1")
    try:
        yield out
    finally:
        console.close()
        if metrics is not None:
            metrics.close()
        if provider is not None and exporter is not None:
            provider.force_flush()
            provider.shutdown()
            _tracing.set_tracer_provider(None)
            out["spans"] = exporter.count


@contextlib.contextmanager
def _operator(worker: Worker, store: str | Store, out: dict[str, Any]) -> Iterator[None]:
    """The console over ``store`` (its own connection for a URL), and an operator who reloads its
    overview and its list of sagas every :data:`CONSOLE_REFRESH` seconds; ``out["console_pages"]``."""
    from .console._bench import Client, serving
    from .operations import Operations

    stop = threading.Event()
    out["console_pages"] = 0
    with Operations(store, sagas=worker.app.sagas) as ops, serving(ops) as port:

        def reload() -> None:
            client = Client(port)
            try:
                while not stop.wait(CONSOLE_REFRESH):
                    client.get("/")
                    client.get("/sagas?order=newest")
                    out["console_pages"] += 2
            finally:
                client.close()

        thread = threading.Thread(target=reload, name="bench-operator", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(60)


# -- events ---------------------------------------------------------------------------------------


@dataclass
class Collector:
    n: int
    latencies: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # each event's time (when its publish began)
    first: float = 0.0
    last: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, event: Event) -> None:
        now = time.time()
        sent = event.time.timestamp()
        with self.lock:
            if not self.latencies:
                self.first = now
            self.sent.append(sent)
            self.latencies.append(now - sent)
            if len(self.latencies) >= self.n:
                self.last = now
                self.done.set()

    def report(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "latencies": self.latencies,
            "sent": self.sent,
            "rss_mib": _rss_mib(),
        }


def events_app(exchange: str, collector: Collector, async_handlers: bool = False) -> App:
    """One handler that counts the events: a plain function, or an ``async def`` one (on the worker's
    event loop) with ``async_handlers``."""
    svc = Service("bench")
    if async_handlers:

        async def noop(event: Event) -> None:
            collector.hit(event)

        svc.on(EVENT, name="noop")(noop)
    else:
        svc.on(EVENT, name="noop")(collector.hit)
    return App(svc, exchange=exchange)


def events_worker(
    broker: str, exchange: str, n: int, variant: str, async_handlers: bool, ready: Any, results: Any
) -> None:
    configure_logging(level="warning")
    collector = Collector(n)
    store = open_store("memory://")
    worker = Worker(events_app(exchange, collector, async_handlers), broker=broker, store=store, prune=False)
    with _observed(variant, worker, store) as seen, worker.running():
        tune_gc()  # (as `sagas run` does)
        ready.set()
        collector.done.wait(600)
    results.put({**collector.report(), "spans": seen["spans"], "console_pages": seen.get("console_pages", 0)})


def _publish_events(bus: EventBus, n: int) -> tuple[float, float]:
    t0 = time.time()
    for start in range(0, n, PUBLISH_BATCH):
        # built just before they are sent: an event's time is when its publish began
        bus.publish_many(
            [Event(EVENT, payload(i), source="bench") for i in range(start, min(n, start + PUBLISH_BATCH))]
        )
        if start % 5000 == 0:
            progress(f"events: published {start + PUBLISH_BATCH:,} of {n:,}")
    return t0, time.time()


def bench_events(broker: str, n: int, variant: str | None = None, async_handlers: bool = False) -> dict[str, Any]:
    """``variant`` (one of :data:`VARIANTS`): run with that tracing and metrics, and report ``spans``.
    ``async_handlers``: the handler is an ``async def`` one."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    bus = EventBus(broker, exchange=exchange)
    if broker.startswith("memory://"):
        collector = Collector(n)
        store = open_store("memory://")
        worker = Worker(events_app(exchange, collector, async_handlers), broker=broker, store=store, prune=False)
        with _observed(variant or "off", worker, store) as seen, worker.running():
            tune_gc()  # (this process is the worker's, as with `sagas run`)
            t0, t1 = _publish_events(bus, n)
            collector.done.wait(600)
        got = {**collector.report(), "spans": seen["spans"], "console_pages": seen.get("console_pages", 0)}
    else:
        child, results = spawn(events_worker, broker, exchange, n, variant or "off", async_handlers)
        try:
            t0, t1 = _publish_events(bus, n)
            got = results.get(timeout=600)
        finally:
            child.join(30)
            cleanup(bus, [f"{exchange}.bench.noop"])
    done_progress()
    figures = _figures("events", broker, n, t0, t1, got)
    if variant is not None:
        figures["spans"] = got["spans"]
        figures["console_pages"] = got["console_pages"]
    return figures


def spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args, ready, results)`` in a fresh process; wait until it is ready."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=target, args=(*args, ready, results), daemon=True)
    child.start()
    if not ready.wait(60):
        child.kill()
        raise RuntimeError(f"the bench process {target.__name__} did not start")
    return child, results


def _figures(workload: str, broker: str, n: int, t0: float, t1: float, got: dict[str, Any]) -> dict[str, Any]:
    lat = got["latencies"]
    if len(lat) < n:
        raise RuntimeError(f"only {len(lat)} of {n} events were handled")
    return {
        "workload": workload,
        "broker": redact_url(broker),
        "n": n,
        "publish_per_s": round(n / (t1 - t0)),
        "handled_per_s": round(n / max(got["last"] - got["first"], 1e-9)),
        "end_to_end_per_s": round(n / (got["last"] - t0)),
        "latency_p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "latency_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "worker_peak_rss_mib": got["rss_mib"],
    }


def cleanup(bus: EventBus, queues: list[str]) -> None:
    bus.declared_queues.update(queues)
    bus.declared_queues.update(f"{q}.delay.{ms}" for q in queues for ms in (1000, 2000, 4000, 8000, 16000))
    with contextlib.suppress(Exception):
        bus.delete_topology()
    bus.close()


# -- raw py-amqp -------------------------------------------------------------------------------------


def _amqp_params(url: str) -> dict[str, Any]:
    from urllib.parse import unquote, urlsplit

    u = urlsplit(url.split(";")[0])
    vhost = unquote(u.path[1:]) if u.path not in ("", "/") else "/"
    return {
        "host": f"{u.hostname or '127.0.0.1'}:{u.port or 5672}",
        "userid": unquote(u.username or "guest"),
        "password": unquote(u.password or "guest"),
        "virtual_host": vhost,
    }


def raw_consumer(url: str, queue: str, n: int, ready: Any, results: Any) -> None:
    import socket

    import amqp

    conn = amqp.Connection(**_amqp_params(url))
    conn.connect()
    ch = conn.channel()
    ch.basic_qos(0, 256, False)
    stamps: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0, "lat": [], "sent": []}

    def on(msg: Any) -> None:
        body = json.loads(msg.body)
        now = time.time()
        ch.basic_ack(msg.delivery_tag)
        if stamps["count"] == 0:
            stamps["first"] = now
        stamps["count"] += 1
        stamps["lat"].append(now - body["t"])
        stamps["sent"].append(body["t"])
        if stamps["count"] == n:
            stamps["last"] = now

    ch.basic_consume(queue, callback=on)
    ready.set()
    while stamps["count"] < n:
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=1)
    conn.close()
    results.put(
        {
            "first": stamps["first"],
            "last": stamps["last"],
            "latencies": stamps["lat"],
            "sent": stamps["sent"],
            "rss_mib": _rss_mib(),
        }
    )


class RawPublisher:
    """Plain py-amqp: a fresh topic exchange with one durable queue (``quorum``, what the framework
    declares for at-least-once, or ``classic``) bound to the bench's event, and a channel in confirm
    mode with up to 256 confirms in flight. Each message carries its publish time (``t``)."""

    IN_FLIGHT = 256

    def __init__(self, broker: str, queue_type: str = "quorum") -> None:
        import amqp

        self._amqp = amqp
        self.name = f"bench-raw-{uuid.uuid4().hex[:8]}"
        self._conn = amqp.Connection(**_amqp_params(broker))
        self._conn.connect()
        self._ch = ch = self._conn.channel()
        ch.exchange_declare(self.name, "topic", durable=True, auto_delete=False)
        ch.queue_declare(self.name, durable=True, auto_delete=False, arguments={"x-queue-type": queue_type})
        ch.queue_bind(self.name, self.name, EVENT)
        self.sent = 0
        self._acked = 0

    def confirm(self) -> None:
        """Put the channel in confirm mode (once the consumer is ready)."""

        def on_ack(tag: int, multiple: bool) -> None:
            self._acked = max(self._acked, tag)

        self._ch.confirm_select()
        self._ch.events["basic_ack"].add(on_ack)
        self._ch.events["basic_nack"].add(on_ack)

    def publish(self, count: int) -> None:
        """Publish ``count`` messages, keeping at most 256 unconfirmed."""
        for _ in range(count):
            self.sent += 1
            body = json.dumps({"id": uuid.uuid4().hex, "t": time.time(), **payload(self.sent)})
            self._ch.basic_publish(
                self._amqp.Message(body, delivery_mode=2, content_type="application/json"), self.name, EVENT
            )
            while self.sent - self._acked >= self.IN_FLIGHT:
                self._conn.drain_events(timeout=10)

    def wait_confirms(self) -> None:
        """Return once every message published so far is confirmed."""
        while self._acked < self.sent:
            self._conn.drain_events(timeout=10)

    def publish_confirmed(self, count: int) -> None:
        """Publish ``count`` messages and wait for their confirms (as ``EventBus.publish_many`` does)."""
        self.publish(count)
        self.wait_confirms()

    def close(self) -> None:
        """Delete the queue and exchange; close the connection."""
        with contextlib.suppress(Exception):
            self._ch.queue_delete(self.name)
            self._ch.exchange_delete(self.name)
        self._conn.close()


def bench_raw(broker: str, n: int, queue_type: str = "quorum") -> dict[str, Any]:
    """The ceiling: plain py-amqp, on a ``quorum`` queue (what the framework declares for
    at-least-once) or a ``classic`` one (what most peer benchmarks use)."""
    pub = RawPublisher(broker, queue_type)
    child, results = spawn(raw_consumer, broker, pub.name, n)
    try:
        pub.confirm()
        t0 = time.time()
        pub.publish(n)
        pub.wait_confirms()
        t1 = time.time()
        got = results.get(timeout=600)
    finally:
        child.join(30)
        pub.close()
    return _figures(f"raw-{queue_type}", broker, n, t0, t1, got)


# -- sagas -------------------------------------------------------------------------------------------


def _keep(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


class BenchSaga(StepSaga):
    type = "bench"
    start = Start("bench.orders.placed", key="order", do=_keep)
    steps = [  # noqa: RUF012 - saga types declare their steps as a class-level list
        Step("reserve", request="bench.stock.reserve", compensation="bench.stock.release", timeout=30),
        Step("charge", request="bench.payments.charge", compensation="bench.payments.refund", timeout=30),
        Step("ship", request="bench.shipping.ship", timeout=30),
    ]


def sagas_app(exchange: str) -> App:
    from ._errors import Failure

    stock, payments, shipping = Service("stock"), Service("payments"), Service("shipping")
    stock.handles("bench.stock.reserve", name="reserve")(lambda e: {"ok": 1})
    stock.handles("bench.stock.release", name="release")(lambda e: None)
    payments.handles("bench.payments.charge", name="charge")(lambda e: {"ok": 1})
    payments.handles("bench.payments.refund", name="refund")(lambda e: None)

    def ship(event: Event) -> dict[str, Any]:
        if event.payload.get("fail"):
            raise Failure("no carrier")
        return {"ok": 1}

    shipping.handles("bench.shipping.ship")(ship)
    return App(stock, payments, shipping, sagas=[BenchSaga], exchange=exchange)


class _CountingStore:
    """Counts the store's writes and commits (a group is one commit)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.writes = 0
        self.commits = 0
        self._depth = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        setattr(self, name, value)  # found here from now on, without this call
        return value

    def report(self, worker: Worker) -> dict[str, Any]:
        return {"handled": worker.handled, "writes": self.writes, "commits": self.commits, "rss_mib": _rss_mib()}

    def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.writes += 1
        if not self._depth:
            self.commits += 1
        return fn(*args, **kwargs)

    def save_saga(self, *args: Any, **kwargs: Any) -> Any:
        return self._write(self._store.save_saga, *args, **kwargs)

    def remember(self, *args: Any) -> None:
        self._write(self._store.remember, *args)

    def cache_reply(self, *args: Any) -> None:
        self._write(self._store.cache_reply, *args)

    def mark_sent(self, *args: Any) -> None:
        self._write(self._store.mark_sent, *args)

    def claim(self, *args: Any) -> bool:
        return bool(self._write(self._store.claim, *args))

    def claim_many(self, claims: Sequence[tuple[str, str]], *args: Any) -> set[tuple[str, str]]:
        won: set[tuple[str, str]] = self._write(self._store.claim_many, claims, *args)
        self.writes += len(claims) - 1  # (one write per claim, one commit)
        return won

    def renew_claims(self, *args: Any) -> None:
        self._write(self._store.renew_claims, *args)

    def release(self, *args: Any) -> None:
        self._write(self._store.release, *args)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if not self._depth:
            self.commits += 1
        self._depth += 1
        try:
            with self._store.group():
                yield
        finally:
            self._depth -= 1


def run_saga_worker(
    broker: str, store_url: str, exchange: str, variant: str, stop: Any, ready: Any, results: Any
) -> None:
    configure_logging(level="warning")
    store = _CountingStore(open_store(store_url))
    # (no pruner: the workloads measure the hot path; `sagas bench retention` measures the pruner)
    worker = Worker(sagas_app(exchange), broker=broker, store=store, prune=False)
    # the sampler opens its own connection, as with ``sagas run --metrics-port``
    with _observed(variant, worker, store_url) as seen, worker.running():
        tune_gc()  # (as `sagas run` does)
        ready.set()
        stop.wait(3600)
    results.put({**store.report(worker), "spans": seen["spans"], "console_pages": seen.get("console_pages", 0)})


def bench_sagas(
    broker: str, store_url: str | None, n: int, workers: int = 1, variant: str | None = None
) -> dict[str, Any]:
    """``variant`` (one of :data:`VARIANTS`): run with that tracing and metrics, and report ``spans``."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    memory = broker.startswith("memory://")
    tmp = tempfile.mkdtemp(prefix="sagas-bench-")
    store_url = store_url or ("memory://" if memory else f"sqlite:///{tmp}/bench.db")
    if memory and workers != 1:
        raise ValueError("on memory:// the bench runs one worker (the memory broker lives in one process)")
    bus = EventBus(broker, exchange=exchange)
    # Keys of this run's own (a store given with --store may hold the sagas of earlier runs).
    starts = [
        Event("bench.orders.placed", {"order": f"{exchange}-{i}", "fail": i % 10 == 9}, source="bench")
        for i in range(n)
    ]
    if memory:
        inner = open_store(store_url)  # shared by the worker and the metrics' sampler
        store = _CountingStore(inner)
        worker = Worker(sagas_app(exchange), broker=broker, store=store, prune=False)
        with _observed(variant or "off", worker, inner) as seen, worker.running():
            tune_gc()  # (this process is the worker's, as with `sagas run`)
            t0 = _publish_and_wait(bus, starts, store, n)
            t1 = time.time()
            records = own_sagas(store, exchange)  # (the worker closes the store it was given)
        stats = [{**store.report(worker), "spans": seen["spans"], "console_pages": seen.get("console_pages", 0)}]
    else:
        ctx = mp.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        readies = [ctx.Event() for _ in range(workers)]
        children = [
            ctx.Process(
                target=run_saga_worker,
                args=(broker, store_url, exchange, variant or "off", stop, r, results),
                daemon=True,
            )
            for r in readies
        ]
        for c in children:
            c.start()
        reader = open_store(store_url)
        try:
            for r in readies:
                if not r.wait(120):
                    raise RuntimeError("a bench worker did not start")
            t0 = _publish_and_wait(bus, starts, reader, n)
            t1 = time.time()
            records = own_sagas(reader, exchange)
        finally:
            stop.set()
            stats = [results.get(timeout=60) for _ in children]
            for c in children:
                c.join(30)
            reader.close()
            cleanup(
                bus,
                [
                    f"{exchange}.saga.bench",
                    *(
                        f"{exchange}.{s}.{h}"
                        for s, h in (
                            ("stock", "reserve"),
                            ("stock", "release"),
                            ("payments", "charge"),
                            ("payments", "refund"),
                            ("shipping", "ship"),
                        )
                    ),
                ],
            )
    done_progress()
    durations = [r.updated_at - r.created_at for r in records if r.final]
    states = {s: sum(1 for r in records if r.state == s) for s in {r.state for r in records}}
    handled = sum(s["handled"] for s in stats)
    result = {
        "workload": "sagas",
        "broker": redact_url(broker),
        "store": redact_url(store_url),
        "n": n,
        "workers": workers,
        "sagas_per_s": round(n / (t1 - t0)),
        "states": states,
        "duration_p50_ms": round(pct(durations, 0.5) * 1000, 1),
        "duration_p99_ms": round(pct(durations, 0.99) * 1000, 1),
        "messages_per_saga": round(handled / n, 2),
        "messages_per_s": round(handled / (t1 - t0)),
        "store_writes_per_saga": round(sum(s["writes"] for s in stats) / n, 2),
        "store_commits_per_saga": round(sum(s["commits"] for s in stats) / n, 2),
        "worker_peak_rss_mib": max(s["rss_mib"] for s in stats),
    }
    if variant is not None:
        result["spans"] = sum(s["spans"] for s in stats)
        result["console_pages"] = sum(s["console_pages"] for s in stats)
    return result


def own_sagas(store: Store, run: str) -> list[SagaRecord]:
    page = Operations(store).sagas(type="bench", limit=min(MAX_PAGE, store.count_sagas() + 10))
    return [r for r in page.items if r.key.startswith(f"{run}-")]


def _publish_and_wait(bus: EventBus, starts: list[Event], store: Any, n: int) -> float:
    before = store.count_sagas(final=True)  # of earlier runs, in a store given with --store
    t0 = time.time()
    for i in range(0, n, PUBLISH_BATCH):
        bus.publish_many(starts[i : i + PUBLISH_BATCH])
    wait_final(store, before, n)
    return t0


def wait_final(store: Any, before: int, n: int) -> None:
    """Wait until ``n`` more sagas than ``before`` are final in ``store``."""
    deadline = time.monotonic() + max(600.0, n / 10)
    shown = -1
    while (final := store.count_sagas(final=True) - before) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {final} of {n} sagas ended in time")
        if final != shown:
            progress(f"sagas: {final:,} of {n:,} final")
            shown = final
        time.sleep(0.05)


# -- deadlines and memory ----------------------------------------------------------------------------


def bench_deadlines(store_url: str | None, due: int = 1000, idle: Sequence[int] = (1000, 100_000)) -> dict[str, Any]:
    """Finding due sagas costs O(due): ``due`` sagas whose deadline has passed fire as fast with few or
    many idle sagas (deadline in an hour) in the store. Also: memory per in-flight saga in a MemoryStore."""
    import tracemalloc

    from ._saga_engine import SagaEngine
    from .testing import VirtualClock

    result: dict[str, Any] = {"workload": "deadlines", "due": due}
    for n_idle in idle:
        tmp = tempfile.mkdtemp(prefix="sagas-bench-")
        store = open_store(store_url or f"sqlite:///{tmp}/deadlines.db")
        clock = VirtualClock()

        # A saga type of this run's own: a store given with --store may hold other runs' sagas.
        class RunSaga(BenchSaga):
            type = f"bench_{uuid.uuid4().hex[:8]}"

        saga = RunSaga
        engine = SagaEngine([saga], store, clock=clock)
        with store.group():
            for i in range(n_idle + due):
                engine.handle(saga.type, Event("bench.orders.placed", {"order": f"o{i}"}, source="bench"))
                if i % 5000 == 0:
                    progress(f"deadlines: {i + 1:,} of {n_idle + due:,} sagas started")
        # The first `due` sagas' deadlines pass; the others stay an hour away.
        with store.group():
            for record in store.list_sagas(saga.type, limit=due):
                record.deadline = clock() + 1
                record.version += 1
                store.save_saga(
                    record,
                    expected_version=record.version - 1,
                    history=HistoryEntry(
                        clock(), f"bench-{record.id}", record.state, record.state, "bench: deadline moved"
                    ),
                    inbox=None,
                    outbox=[],
                )
        clock.advance(2)  # past the due ones' deadlines; the idle ones wait 30 s
        t0 = time.perf_counter()
        found = len(store.due_sagas(clock(), due, types=(saga.type,)))  # finding them alone
        result[f"find_{due}_due_with_{n_idle}_idle_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if found != due:
            raise RuntimeError(f"the due query found {found} sagas, not {due}")
        t0 = time.perf_counter()
        fired = 0
        while True:
            rows = engine.fire_due()
            if not rows:
                break
            fired += len(rows)
        elapsed = time.perf_counter() - t0
        result[f"fire_{due}_due_with_{n_idle}_idle_ms"] = round(elapsed * 1000, 1)
        result[f"fired_with_{n_idle}_idle"] = fired
        store.close()
    done_progress()
    # memory per in-flight saga, in a MemoryStore (the SQL stores keep it on disk)
    tracemalloc.start()
    store = open_store("memory://")
    engine = SagaEngine([BenchSaga], store)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(10_000):
        engine.handle("bench", Event("bench.orders.placed", {"order": f"m{i}"}, source="bench"))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    result["memory_store_bytes_per_in_flight_saga"] = round((after - before) / 10_000)
    return result


# -- the command -------------------------------------------------------------------------------------


#: the throughput a variant is compared by, per workload
_THROUGHPUT = {"events": "end_to_end_per_s", "sagas": "sagas_per_s"}


def run_variants(
    what: str, broker: str, store: str | None, n: int, workers: int, repeat: int, variants: Sequence[str]
) -> dict[str, Any]:
    """Run events and/or sagas once per variant, ``repeat`` times, alternating the variants (each
    round starts one variant later, so none is always first); report each variant's median throughput
    and its ratio to ``off`` (or to the first variant, without ``off``)."""
    workloads = [w for w in ("events", "sagas") if what in (w, "all")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(repeat):
        order = [variants[(i + r) % len(variants)] for i in range(len(variants))]
        for workload in workloads:
            for variant in order:
                progress(f"{workload} [{variant}] run {r + 1} of {repeat}")
                if workload == "events":
                    figures = bench_events(broker, n, variant)
                else:
                    figures = bench_sagas(broker, store, n, workers, variant)
                runs.setdefault(f"{workload}[{variant}]", []).append(figures)
    done_progress()
    report = _medians(runs)
    base = "off" if "off" in variants else variants[0]
    report["variants"] = {}
    for workload in workloads:
        key = _THROUGHPUT[workload]
        base_rate = report["median"][f"{workload}[{base}]"][key]
        report["variants"][workload] = {
            v: {
                key: report["median"][f"{workload}[{v}]"][key],
                f"ratio_to_{base}": round(report["median"][f"{workload}[{v}]"][key] / base_rate, 3)
                if base_rate
                else None,
                "spans": report["median"][f"{workload}[{v}]"]["spans"],
                "console_pages": report["median"][f"{workload}[{v}]"].get("console_pages", 0),
            }
            for v in variants
        }
    return report


def _medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    report: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "runs": runs, "median": {}}
    for name, items in runs.items():
        numeric = {k for k, v in items[0].items() if isinstance(v, int | float) and k not in ("n", "workers")}
        report["median"][name] = {k: statistics.median(i[k] for i in items) for k in sorted(numeric)}
    return report


def run(
    what: str, broker: str, store: str | None, n: int, workers: int, repeat: int, async_handlers: bool = False
) -> dict[str, Any]:
    """Run the workloads ``repeat`` times; report each run and the medians (with ratios to raw). With
    ``async_handlers``, the events workload runs a second time in each round with an ``async def``
    handler (the two alternate which goes first), and the report gives its ratio to the sync one."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(repeat):
        if what in ("events", "sagas", "all", "raw") and not broker.startswith("memory://"):
            runs.setdefault("raw-quorum", []).append(bench_raw(broker, n, "quorum"))
            runs.setdefault("raw-classic", []).append(bench_raw(broker, n, "classic"))
        if what in ("events", "all"):
            for flavour in (("sync", "async") if r % 2 == 0 else ("async", "sync")) if async_handlers else ("sync",):
                name = "events" if flavour == "sync" else "events-async"
                runs.setdefault(name, []).append(bench_events(broker, n, async_handlers=flavour == "async"))
        if what in ("sagas", "all"):
            runs.setdefault("sagas", []).append(bench_sagas(broker, store, n, workers))
        if what in ("deadlines", "all"):
            runs.setdefault("deadlines", []).append(bench_deadlines(store))
    report = _medians(runs)
    if "events-async" in report["median"]:
        sync, aio = report["median"]["events"], report["median"]["events-async"]
        report["ratio_async_to_sync"] = {
            k: round(aio[k] / sync[k], 3) for k in ("handled_per_s", "end_to_end_per_s") if sync.get(k)
        }
    for kind in ("quorum", "classic"):
        raw = report["median"].get(f"raw-{kind}")
        ratios = {
            f"{workload}.{ours}": round(report["median"][workload][ours] / raw[theirs], 2)
            for workload, ours, theirs in _RATIOS
            if raw and workload in report["median"] and raw.get(theirs)
        }
        if ratios:
            report[f"ratio_to_raw_{kind}"] = ratios
    return report


#: (workload, figure, raw figure) compared in a report: the events figures with their raw twins, and
#: the saga messages moved per second with the raw end-to-end rate (what the broker and client allow)
_RATIOS = [
    ("events", "publish_per_s", "publish_per_s"),
    ("events", "handled_per_s", "handled_per_s"),
    ("events", "end_to_end_per_s", "end_to_end_per_s"),
    ("sagas", "messages_per_s", "end_to_end_per_s"),
]


def table(report: dict[str, Any]) -> str:
    lines = []
    for name, med in report["median"].items():
        n_runs = len(report["runs"][name])
        lines.append(f"{name} (median of {n_runs} run{'s' if n_runs > 1 else ''})")
        for k, v in med.items():
            lines.append(f"  {k:<26} {v:>12,.1f}" if isinstance(v, float) else f"  {k:<26} {v:>12,}")
    for kind in ("quorum", "classic"):
        for k, v in report.get(f"ratio_to_raw_{kind}", {}).items():
            workload, figure = k.split(".")
            lines.append(f"{workload} / raw-{kind:<8} {figure:<18} {v:>8.2f}")
    for k, v in report.get("ratio_async_to_sync", {}).items():
        lines.append(f"events-async / events   {k:<18} {v:>8.3f}")
    for workload, by_variant in report.get("variants", {}).items():
        key = _THROUGHPUT[workload]
        lines.append(f"{workload}: {key} by variant (tracing, metrics, console)")
        for variant, row in by_variant.items():
            ratio_key = next(k for k in row if k.startswith("ratio_to_"))
            ratio = row[ratio_key]
            lines.append(
                f"  {variant:<10} {row[key]:>10,.0f}/s   {ratio_key} {'-' if ratio is None else f'{ratio:.3f}':>6}"
                f"   spans {row['spans']:>10,.0f}"
                + (f"   console pages {row['console_pages']:,.0f}" if row.get("console_pages") else "")
                + (
                    f"   (no page was served: the runs were shorter than the console's {CONSOLE_REFRESH:g} s"
                    " refresh; give a larger -n)"
                    if variant == "console" and not row.get("console_pages")
                    else ""
                )
            )
    return "\n".join(lines)
