"""Prometheus metrics and health probes of a worker (the ``metrics`` extra: ``prometheus_client``).

:class:`Metrics` is an :class:`~sagas._observe.Observer`: the worker and its pipelines tell it what
they do, and it counts that in its own Prometheus registry. :meth:`Metrics.serve` starts an HTTP
server (a thread) with three paths:

- ``/metrics``: the Prometheus text format;
- ``/livez``: 200 while the worker's I/O loop turned (or tried to connect) within ``live_after`` seconds;
- ``/readyz``: 200 while the broker is connected and the store answered a cheap query within the last
  few seconds (the store is asked about once a second, by a thread of its own).

Gauges read from the store (sagas by type and state, stuck sagas, the outbox backlog) are sampled
every ``store_interval`` seconds by one worker of the cluster at a time: the one holding a lease, a
claim in the store's claims table (``sagas:metrics``/``store-sampler``) that it renews while it
samples and that another worker takes over once it lapses. The other workers export no store gauges,
so ``sum`` or ``max`` across workers gives the cluster's figures.

This module is imported only when ``--metrics-port`` is given: without the extra, nothing imports
``prometheus_client``.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Gauge, Histogram, make_wsgi_app
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from transport import Subscription

from ._observe import DOWN, RECONNECTED, UP
from ._saga import FAILED
from ._store import OutboxBacklog, Store, open_store

log = structlog.get_logger("sagas.metrics")

#: the claim (consumer, message id) that elects the worker sampling the store
LEASE = ("sagas:metrics", "store-sampler")
#: at most this many stuck sagas are counted per sample (the gauge then reads "at least")
STUCK_LIMIT = 1000
#: a saga entering this state counts as compensated
COMPENSATED = "compensated"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """A worker's Prometheus metrics, and the state its probes report (see the module's docstring).

    ``store`` is the store's URL (the sampler opens its own connection) or a :class:`Store` shared
    with the worker (a memory store). ``instance`` names this worker in the sampling lease.
    """

    def __init__(
        self,
        store: str | Store,
        *,
        instance: str,
        store_interval: float = 30.0,
        stuck_after: float = 60.0,
        live_after: float = 30.0,
        ready_after: float = 3.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.instance = instance
        self.store_interval = store_interval
        self.stuck_after = stuck_after
        self.live_after = live_after
        self.ready_after = ready_after
        self.clock = clock
        self.monotonic = monotonic
        self._store_arg = store
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: WSGIServer | None = None
        #: monotonic time of the last loop turn (or connection attempt), and of the last good store answer
        self.last_turn: float | None = None
        self.last_store_answer: float | None = None
        self.connected = False
        #: whether this worker holds the sampling lease
        self.sampling = False
        r = self.registry
        self.messages = PromCounter(
            "sagas_messages",
            "Messages settled, by service (saga type for sagas), handler ('saga' for sagas), event type and "
            "outcome (ok, no-reply, failure-reply, retry, dead-letter, kept-unacked; for sagas moved, duplicate, "
            "late-reply, refused...; event type '' for an undecodable message).",
            ["service", "handler", "event_type", "outcome"],
            registry=r,
        )
        self.handler_duration = Histogram(
            "sagas_handler_duration_seconds",
            "Time a handler ran, by service and handler.",
            ["service", "handler"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "sagas_publish_confirm_seconds",
            "Time from a publish to the broker's confirms, per pipelined batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published_messages = PromCounter(
            "sagas_published_messages", "Messages published and confirmed.", registry=r
        )
        self.transitions = PromCounter(
            "sagas_saga_transitions",
            "Saga transitions, by saga type, state left ('-' for a start) and state entered.",
            ["saga_type", "from_state", "to_state"],
            registry=r,
        )
        self.started = PromCounter("sagas_sagas_started", "Sagas started.", ["saga_type"], registry=r)
        self.finished = PromCounter(
            "sagas_sagas_finished", "Sagas that ended, by final state.", ["saga_type", "state"], registry=r
        )
        self.compensated = PromCounter(
            "sagas_sagas_compensated", "Sagas that ended compensated.", ["saga_type"], registry=r
        )
        self.parked = PromCounter("sagas_sagas_parked", "Sagas parked in 'failed'.", ["saga_type"], registry=r)
        self.deadlines = PromCounter("sagas_deadlines_fired", "Saga deadlines fired.", ["saga_type"], registry=r)
        self.resent = PromCounter(
            "sagas_requests_resent", "Saga requests re-sent by a deadline.", ["saga_type", "request_type"], registry=r
        )
        self.broker_connected = Gauge("sagas_broker_connected", "1 while the broker is connected.", registry=r)
        self.reconnects = PromCounter("sagas_broker_reconnects", "Reconnections after a lost connection.", registry=r)
        self.prefetch = Gauge("sagas_consumer_prefetch", "Prefetch of each queue consumed.", ["queue"], registry=r)
        self.inflight = Gauge("sagas_inflight_messages", "Messages being handled.", registry=r)
        self.ready = Gauge("sagas_ready_messages", "Messages received and waiting to start.", registry=r)
        self.sampler = Gauge(
            "sagas_store_sampler",
            "1 on the worker that samples the store's gauges (holds the lease), 0 on the others.",
            registry=r,
        )
        #: the last sample of the store (exported only while this worker holds the lease)
        self.last_sample: _Sample | None = None
        r.register(_StoreCollector(self))

    # -- the observer ----------------------------------------------------------------------------------

    def consuming(self, subscriptions: Sequence[Subscription]) -> None:
        for sub in subscriptions:
            self.prefetch.labels(sub.queue).set(sub.prefetch)

    def message(self, service: str, handler: str, event_type: str, outcome: str, duration: float | None) -> None:
        self.messages.labels(service, handler, event_type, outcome).inc()
        if duration is not None:
            self.handler_duration.labels(service, handler).observe(duration)

    def transition(self, saga_type: str, from_state: str, to_state: str, final: bool) -> None:
        self.transitions.labels(saga_type, from_state, to_state).inc()
        if from_state == "-":
            self.started.labels(saga_type).inc()
        if final:
            self.finished.labels(saga_type, to_state).inc()
            if to_state == COMPENSATED:
                self.compensated.labels(saga_type).inc()
        if to_state == FAILED:
            self.parked.labels(saga_type).inc()

    def deadline_fired(self, saga_type: str) -> None:
        self.deadlines.labels(saga_type).inc()

    def request_resent(self, saga_type: str, request_type: str) -> None:
        self.resent.labels(saga_type, request_type).inc()

    def published(self, count: int, seconds: float) -> None:
        self.published_messages.inc(count)
        self.publish_latency.observe(seconds)

    def connection(self, state: str) -> None:
        self.last_turn = self.monotonic()  # reconnecting is the loop's work too: not a hung worker
        if state == UP:
            self.connected = True
        elif state == DOWN:
            self.connected = False
        elif state == RECONNECTED:
            self.reconnects.inc()
        self.broker_connected.set(1 if self.connected else 0)

    def turn(self, inflight: int, ready: int) -> None:
        self.last_turn = self.monotonic()
        self.inflight.set(inflight)
        self.ready.set(ready)

    # -- probes ----------------------------------------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        """Whether the I/O loop turned within ``live_after`` seconds, and why not."""
        if self.last_turn is None:
            return True, "starting"
        age = self.monotonic() - self.last_turn
        if age > self.live_after:
            return False, f"the I/O loop has not turned for {age:.1f}s (limit {self.live_after:g}s)"
        return True, f"the I/O loop turned {age:.2f}s ago"

    def ready_now(self) -> tuple[bool, str]:
        """Whether the broker is connected and the store answered lately, and why not."""
        if not self.connected:
            return False, "the broker is not connected"
        if self.last_store_answer is None:
            return False, "the store has not answered yet"
        age = self.monotonic() - self.last_store_answer
        if age > self.ready_after:
            return False, f"the store has not answered for {age:.1f}s"
        return True, "broker connected, store answering"

    # -- the store thread ----------------------------------------------------------------------------

    def _open_store(self) -> Store:
        if self._store is None:
            # (create=False: the worker creates the store; until it has, the store is not ready)
            self._store = open_store(self._store_arg, create=False)
        return self._store

    def _ping(self) -> None:
        """One cheap query (a primary-key lookup) to see that the store answers."""
        self._open_store().get_saga("sagas-readyz-probe")
        self.last_store_answer = self.monotonic()

    def sample(self) -> bool:
        """Sample the store's gauges if this worker holds (or takes) the lease. Returns whether it did."""
        store = self._open_store()
        now = self.clock()
        holds = store.claim(*LEASE, self.instance, now + 2 * self.store_interval + 5, now)
        self.sampling = holds
        self.sampler.set(1 if holds else 0)
        if not holds:
            self.last_sample = None
            return False
        counts = store.count_by_state()
        stuck = Counter(r.type for r in store.list_sagas(stuck_before=now - self.stuck_after, limit=STUCK_LIMIT))
        backlog = store.outbox_backlog()
        for c in counts:
            stuck.setdefault(c.type, 0)  # (0 for every type in the store: a dashboard shows 0, not "no data")
        self.last_sample = _Sample(now, [(c.type, c.state, c.count) for c in counts], dict(stuck), backlog)
        return True

    def _store_loop(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            try:
                self._ping()
                if self.monotonic() >= next_sample:
                    next_sample = self.monotonic() + self.store_interval
                    self.sample()
            except Exception as exc:  # noqa: BLE001 - the store is down: not ready; try again
                # (until the store first answered, the worker may still be creating it: debug, not warning)
                level = log.warning if self.last_store_answer is not None else log.debug
                level("metrics.store_unavailable", error=repr(exc)[:300])
                self._close_store()
            self._stop.wait(1.0)
        self._close_store()

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None and store is not self._store_arg:
            with contextlib.suppress(Exception):
                store.close()

    # -- the HTTP server -------------------------------------------------------------------------------

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI app of ``/metrics``, ``/livez`` and ``/readyz``."""
        path = environ.get("PATH_INFO", "/")
        if path in ("/livez", "/readyz"):
            ok, why = self.live() if path == "/livez" else self.ready_now()
            body = json.dumps({"ok": ok, "reason": why}).encode() + b"\n"
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        body = b"not found: try /metrics, /livez or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def serve(self, port: int, host: str = "0.0.0.0") -> int:  # noqa: S104 - a scrape target and probes
        """Start the HTTP server and the store thread; return the port (useful with port 0)."""
        self._metrics_app = make_wsgi_app(self.registry)
        self._server = make_server(host, port, self.app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        for target, name in ((self._server.serve_forever, "sagas-metrics-http"), (self._store_loop, "sagas-metrics")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        bound = int(self._server.server_address[1])
        log.info("metrics.serving", port=bound, paths=["/metrics", "/livez", "/readyz"])
        return bound

    def close(self) -> None:
        """Stop the server and the store thread."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)


@dataclass(frozen=True, slots=True)
class _Sample:
    """What the store said at ``at``: sagas by (type, state), stuck sagas by type, the outbox backlog."""

    at: float
    sagas: list[tuple[str, str, int]]
    stuck: dict[str, int]
    outbox: OutboxBacklog


class _StoreCollector(Collector):
    """The gauges read from the store: exported only by the worker holding the sampling lease, so that
    the cluster's figures are the ``max`` (or ``sum``) across workers."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        sample = self.metrics.last_sample
        if sample is None:
            return
        sagas = GaugeMetricFamily(
            "sagas_sagas", "Sagas by type and state (sampled from the store).", labels=["saga_type", "state"]
        )
        for saga_type, state, count in sample.sagas:
            sagas.add_metric([saga_type, state], count)
        yield sagas
        stuck = GaugeMetricFamily(
            "sagas_stuck_sagas",
            f"Sagas not ended whose deadline is missing or passed stuck_after ago (sampled; at most {STUCK_LIMIT}).",
            labels=["saga_type"],
        )
        for saga_type, count in sorted(sample.stuck.items()):
            stuck.add_metric([saga_type], count)
        yield stuck
        yield GaugeMetricFamily(
            "sagas_outbox_pending", "Outbox rows not yet confirmed (sampled).", sample.outbox.unsent
        )
        oldest = sample.outbox.oldest_created_at
        age = 0.0 if oldest is None else max(0.0, self.metrics.clock() - oldest)
        yield GaugeMetricFamily(
            "sagas_outbox_oldest_age_seconds", "Age of the oldest unsent outbox row as last sampled, 0 if none.", age
        )
        yield GaugeMetricFamily(
            "sagas_store_sampled_timestamp_seconds", "When the store's gauges were last sampled.", sample.at
        )


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


__all__ = ["LEASE", "Metrics"]
