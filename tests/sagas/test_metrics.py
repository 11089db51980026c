"""Prometheus metrics and health probes (sagas._metrics, the metrics extra): the observer's counters
through the test harness, the store sampler's lease on every store, the HTTP paths, the CLI without
the extra, and a real ``sagas run --metrics-port`` of the postprocessing example on RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from examples import postprocessing
from sagas import Event, EventBus, NoReply
from sagas._cli import cli
from sagas._metrics import LEASE, Metrics
from sagas._saga_pipeline import SAGA_RETRY
from sagas._store import MemoryStore, Store
from sagas.testing import Drop, Harness
from tests.helpers import CommitFailsOnce
from transport import Subscription

ROOT = Path(__file__).resolve().parents[2]
UPLOAD = {"upload_id": "u1", "name": "a.txt", "size": 10, "user": "marie"}


def value(m: Metrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


# -- the observer ------------------------------------------------------------------------------------


def test_the_metrics_count_what_the_harness_runs() -> None:
    m = Metrics(MemoryStore(), instance="w1")
    with Harness(postprocessing.app, observer=m) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=1)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
    t = "postprocessing"
    assert value(m, "sagas_saga_transitions_total", saga_type=t, from_state="-", to_state="scanning") == 1
    assert value(m, "sagas_saga_transitions_total", saga_type=t, from_state="finishing", to_state="done") == 1
    assert value(m, "sagas_sagas_started_total", saga_type=t) == 1
    assert value(m, "sagas_sagas_finished_total", saga_type=t, state="done") == 1
    assert value(m, "sagas_deadlines_fired_total", saga_type=t) >= 1
    assert value(m, "sagas_requests_resent_total", saga_type=t, request_type="ocis.antivirus.scan") == 1
    ok = {"service": "antivirus", "handler": "scan", "event_type": "ocis.antivirus.scan", "outcome": "ok"}
    assert value(m, "sagas_messages_total", **ok) >= 1
    assert value(m, "sagas_handler_duration_seconds_count", service="antivirus", handler="scan") >= 1
    assert value(m, "sagas_published_messages_total") >= 4
    assert value(m, "sagas_publish_confirm_seconds_count") >= 1
    assert value(m, "sagas_broker_connected") == 1


def test_a_commit_that_failed_and_was_redone_counts_its_transitions_and_deadline_once(tmp_path: Path) -> None:
    """The start's group and, later, the deadline's group each fail to commit once (rolled back, then
    redone): the transitions, the start, the deadline fired and the request re-sent are counted once."""
    store = CommitFailsOnce(str(tmp_path / "s.db"))
    m = Metrics(MemoryStore(), instance="w1")
    with Harness(postprocessing.app, store=store, observer=m) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=1)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.run()
        assert store.failures == 0  # the start's group failed; the message comes back after its delay
        h.advance(SAGA_RETRY.initial + 0.5)
        assert h.saga(postprocessing.Postprocessing, "u1").state == "scanning"
        assert value(m, "sagas_deadlines_fired_total", saga_type="postprocessing") == 0
        store.failures = 1  # the next group that writes is the deadline's (the request was lost)
        h.settle()
    assert store.failures == 0
    t = "postprocessing"
    assert value(m, "sagas_saga_transitions_total", saga_type=t, from_state="-", to_state="scanning") == 1
    assert value(m, "sagas_sagas_started_total", saga_type=t) == 1
    assert value(m, "sagas_deadlines_fired_total", saga_type=t) == 1
    assert value(m, "sagas_requests_resent_total", saga_type=t, request_type="ocis.antivirus.scan") == 1
    assert value(m, "sagas_sagas_finished_total", saga_type=t, state="done") == 1


@pytest.mark.parametrize(
    ("routing_key", "labels"),
    [
        ("ocis.policies.check", {"service": "policies", "handler": "check"}),
        ("ocis.storage.bytes_received", {"service": "postprocessing", "handler": "saga"}),
    ],
    ids=["handler", "saga"],
)
def test_an_undecodable_message_is_counted_dead_lettered(routing_key: str, labels: dict[str, str]) -> None:
    m = Metrics(MemoryStore(), instance="w1")
    with Harness(postprocessing.app, observer=m) as h:
        h.client_bus().publish_encoded([(routing_key, b"not json", "garbled-1", False)])
        h.run()
        assert len(h.dead_letters()) == 1
    assert value(m, "sagas_messages_total", event_type="", outcome="dead-letter", **labels) == 1


def test_a_request_dropped_with_no_reply_is_counted_as_such_not_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    drops = [NoReply("simulated lost reply")]  # the first request handled (the scan) drops its reply

    def drop_once() -> None:
        if drops:
            raise drops.pop()

    monkeypatch.setattr(postprocessing, "_maybe_drop", drop_once)
    m = Metrics(MemoryStore(), instance="w1")
    with Harness(postprocessing.app, observer=m) as h:
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    scan = {"service": "antivirus", "handler": "scan", "event_type": "ocis.antivirus.scan"}
    assert value(m, "sagas_messages_total", outcome="no-reply", **scan) == 1
    assert value(m, "sagas_messages_total", outcome="ok", **scan) == 1  # the deadline's re-send


def test_parked_and_compensated_sagas_and_reconnects_are_counted() -> None:
    m = Metrics(MemoryStore(), instance="w1")
    m.transition("s", "undoing", "compensated", True)
    m.transition("s", "charging", "failed", True)
    m.connection("down")
    assert value(m, "sagas_broker_connected") == 0
    m.connection("up")
    m.connection("reconnected")
    assert value(m, "sagas_sagas_compensated_total", saga_type="s") == 1
    assert value(m, "sagas_sagas_parked_total", saga_type="s") == 1
    assert value(m, "sagas_broker_reconnects_total") == 1
    assert value(m, "sagas_broker_connected") == 1
    m.consuming([Subscription(queue="e.svc.h", patterns=("a.b.c",), prefetch=7)])
    m.turn(3, 2)
    assert value(m, "sagas_consumer_prefetch", queue="e.svc.h") == 7
    assert value(m, "sagas_inflight_messages") == 3
    assert value(m, "sagas_ready_messages") == 2


# -- the store sampler -------------------------------------------------------------------------------


@pytest.fixture
def shared_store(any_store: Store) -> Store:
    """One store the workers of a cluster share: memory, SQLite, PostgreSQL (its own schema)."""
    return any_store


def test_one_worker_at_a_time_samples_the_store(shared_store: Store) -> None:
    """The lease (a claim in the store) elects one sampler; the others export no store gauges; when the
    holder stops renewing, another takes over once the lease lapses."""
    now = [1_000.0]
    with Harness(postprocessing.app, store=shared_store) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=100)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.run()
        a = Metrics(shared_store, instance="a", store_interval=10, stuck_after=60, clock=lambda: now[0])
        b = Metrics(shared_store, instance="b", store_interval=10, stuck_after=60, clock=lambda: now[0])
        assert a.sample() is True
        assert b.sample() is False
        assert value(a, "sagas_sagas", saga_type="postprocessing", state="scanning") == 1
        assert value(a, "sagas_store_sampler") == 1
        assert value(b, "sagas_store_sampler") == 0
        assert b.registry.get_sample_value("sagas_sagas", {"saga_type": "postprocessing", "state": "scanning"}) is None
        assert b.registry.get_sample_value("sagas_outbox_pending") is None
        assert value(a, "sagas_outbox_pending") == 0
        assert a.registry.get_sample_value("sagas_stuck_sagas", {"saga_type": "postprocessing"}) is not None
        now[0] += 10
        assert a.sample() is True  # renewed by its holder
        assert b.sample() is False
        now[0] += 100  # a stopped (it died): its lease lapses
        assert b.sample() is True
        assert value(b, "sagas_sagas", saga_type="postprocessing", state="scanning") == 1
        assert a.sample() is False
        assert a.registry.get_sample_value("sagas_store_sampler") == 0
    assert LEASE == ("sagas:metrics", "store-sampler")


def test_stuck_sagas_are_counted() -> None:
    store = MemoryStore()
    with Harness(postprocessing.app, store=store) as h:
        h.inject(Drop(), match="ocis.antivirus.scan", times=100)
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.run()
        clock = h.clock
    later = clock() + 3600  # the deadline passed an hour ago: nothing fired it (no worker ran)
    m = Metrics(store, instance="a", stuck_after=60, clock=lambda: later)
    assert m.sample()
    assert value(m, "sagas_stuck_sagas", saga_type="postprocessing") == 1


def test_a_type_whose_sagas_all_ended_has_a_stuck_series_at_zero() -> None:
    """A dashboard shows 0 stuck sagas for a type whose sagas all ended, not "no data"."""
    store = MemoryStore()
    with Harness(postprocessing.app, store=store) as h:
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").final
    m = Metrics(store, instance="a")
    assert m.sample()
    assert m.registry.get_sample_value("sagas_stuck_sagas", {"saga_type": "postprocessing"}) == 0


# -- the HTTP server ---------------------------------------------------------------------------------


def test_the_server_answers_metrics_livez_and_readyz() -> None:
    now = [100.0]
    m = Metrics(MemoryStore(), instance="a", live_after=30, monotonic=lambda: now[0])
    port = m.serve(0, "127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        assert get(f"{base}/livez")[0] == 200  # starting
        status, body = get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["reason"] == "the broker is not connected"
        m.connection("up")
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, 10, "ready once the store answered")
        m.turn(0, 0)
        now[0] += 31
        status, body = get(f"{base}/livez")
        assert status == 503
        assert "has not turned" in json.loads(body)["reason"]
        m.turn(0, 0)
        assert get(f"{base}/livez")[0] == 200
        m.message("svc", "h", "a.b.c", "retry", 0.01)
        status, text = get(f"{base}/metrics")
        assert status == 200
        assert 'sagas_messages_total{event_type="a.b.c",handler="h",outcome="retry",service="svc"} 1.0' in text
        assert get(f"{base}/nope")[0] == 404
    finally:
        m.close()


def test_readyz_waits_for_the_store() -> None:
    """A store that does not answer (nothing listens on its port) keeps the worker not ready."""
    m = Metrics("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", instance="a")
    port = m.serve(0, "127.0.0.1")
    try:
        m.connection("up")
        time.sleep(1.5)
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "store" in json.loads(body)["reason"]
    finally:
        m.close()


# -- without the extra -------------------------------------------------------------------------------


def test_the_core_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, sagas, sagas._worker, sagas._cli, sagas.testing\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "assert 'sagas._metrics' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_metrics_port_without_the_extra_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails, as when not installed
    monkeypatch.delitem(sys.modules, "sagas._metrics", raising=False)
    result = CliRunner().invoke(cli, ["run", "examples.postprocessing:app", "--metrics-port", "9464"])
    assert result.exit_code == 2
    assert "error: --metrics-port needs prometheus_client: pip install 'kombu-sagas[metrics]'" in result.output


# -- a real worker -----------------------------------------------------------------------------------


def _free_port() -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from private_services import free_port

    return int(free_port())


def _start(url: str, exchange: str, tmp_path: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sagas",
                "run",
                "examples.postprocessing:app",
                "--broker",
                url,
                "--exchange",
                exchange,
                "--store",
                f"sqlite:///{tmp_path}/s.db",
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-store-interval",
                "2",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _delete_topology(url: str, exchange: str) -> None:
    """Delete the example's queues (its handlers', its saga's, their delay queues) and the exchange."""
    bus = EventBus(url, exchange=exchange)
    try:
        for spec in postprocessing.app.handlers:
            bus.declare(spec.subscription(exchange, "cleanup"))
        saga = postprocessing.Postprocessing.definition()
        bus.declare(
            Subscription(queue=f"{exchange}.saga.{saga.type}", patterns=saga.patterns, retry_delays=SAGA_RETRY.delays)
        )
        bus.delete_topology()
    finally:
        bus.close()


def _series(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_worker_under_fail_rate_serves_retry_transition_and_deadline_series(
    amqp_url: str, unique: str, tmp_path: Path
) -> None:
    """``sagas run examples.postprocessing:app --metrics-port`` with FAIL_RATE (and lost replies, so that
    deadlines fire): /metrics shows retries, transitions and deadlines; /livez and /readyz are 200."""
    port = _free_port()
    proc = _start(amqp_url, unique, tmp_path, port, FAIL_RATE="0.5", DROP_RATE="0.3")
    base = f"http://127.0.0.1:{port}"
    bus = EventBus(amqp_url, exchange=unique)
    try:
        wait_for(lambda: _ok(f"{base}/readyz"), 30, "the worker to be ready")
        for i in range(20):
            bus.publish(Event("ocis.storage.bytes_received", {"upload_id": f"u{i}", "name": "a.txt", "size": 10}))

        def scraped() -> bool:
            text = get(f"{base}/metrics")[1]
            retries = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("sagas_messages_total{") and 'outcome="retry"' in line
            )
            return (
                retries > 0
                and _series(text, "sagas_saga_transitions_total") > 0
                and _series(text, "sagas_deadlines_fired_total") > 0
                and _series(text, "sagas_requests_resent_total") > 0
            )

        try:
            wait_for(scraped, 90, "non-zero retry, transition, deadline and re-sent request series")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last scrape:\n{get(f'{base}/metrics')[1][-4000:]}") from None
        assert _series(get(f"{base}/metrics")[1], "sagas_broker_connected") == 1
        wait_for(lambda: "sagas_sagas{" in get(f"{base}/metrics")[1], 20, "the store gauges (sampled every 2 s)")
        assert get(f"{base}/livez")[0] == 200
    finally:
        _stop(proc)
        bus.close()
        _delete_topology(amqp_url, unique)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def _ok(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def test_the_dashboard_and_the_alert_rules_name_only_metrics_a_worker_exports() -> None:
    """docs/observability: every sagas_* series the Grafana dashboard and the alert rules query exists."""
    import re

    import yaml  # type: ignore[import-untyped]

    store = MemoryStore()
    with Harness(postprocessing.app, store=store) as h:
        h.publish("ocis.storage.bytes_received", UPLOAD)
        h.run()
        m = Metrics(store, instance="a")
        m.sample()
    families = {f.name: f.type for f in m.registry.collect()}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exported = {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}
    docs = ROOT / "docs" / "observability"
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((docs / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    named = {n for e in exprs for n in re.findall(r"\bsagas_[a-z_]+", e)}
    assert named
    assert named <= exported, named - exported
    table = (ROOT / "docs" / "observability.md").read_text()
    assert all(f"`{f}_total`" in table or f"`{f}`" in table for f in families), families
