"""Real-process fault tests: workers are separate ``python -m sagas run`` processes on RabbitMQ and PostgreSQL.

Each test runs post-processing sagas (examples/postprocessing.py, with transient participant failures and
dropped replies) and plain at-least-once events (the drill app's counting handler) through two worker
processes, injects one kind of fault while they run, and checks that no event is lost and that every saga
ends in a final state. The faults act on the session's private RabbitMQ node (``rabbitmqctl -n <node>``)
and private PostgreSQL cluster (``pg_ctl``), the ``private_rabbit`` and ``private_postgres`` fixtures of
tests/conftest.py; the machine's own services are never touched. Each test leaves both running and
answering, and deletes its queues and schema.

Figures: with ``SAGAS_RELIABILITY_REPORT=path``, each test appends one JSON object to that file.
The kill -9 moments are random; ``SAGAS_FAULTS_SEED`` replays a run (the seed is printed and reported).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from private_services import PostgresCluster, RabbitNode

from sagas import Event, EventBus, open_store
from tests import report
from transport import TransportError

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.faults, pytest.mark.slow]

#: sizes: a run of the module stays around 2 to 3 minutes on a 2-core machine
SAGAS = int(os.environ.get("SAGAS_FAULTS_SAGAS", "240"))
EVENTS = int(os.environ.get("SAGAS_FAULTS_EVENTS", "1200"))
WORKERS = 2
#: publishing is spread over this many seconds, and the faults fall inside it
PUBLISH_SECONDS = 8.0
#: after publishing, every event must be handled and every saga final within this many seconds
SETTLE_TIMEOUT = float(os.environ.get("SAGAS_FAULTS_SETTLE", "120"))
FAIL_RATE, DROP_RATE = 0.1, 0.05
APP = "drill_app:with_sagas"
OUTCOMES = {"continue", "abort", "delete"}


@dataclass
class Faults:
    kills: int = 0
    broker_restarts: int = 0
    connection_closes: int = 0
    database_restarts: int = 0
    #: seconds each broker or database restart took, down to answering again
    outage_seconds: list[float] = field(default_factory=list)


def _seed() -> int:
    return int(os.environ.get("SAGAS_FAULTS_SEED") or random.SystemRandom().randrange(2**32))


class Rig:
    """Two worker processes running the drill app with the post-processing saga, a paced publisher, and
    the figures of one scenario."""

    def __init__(self, tmp: Path, exchange: str, services: kit.Services) -> None:
        self.exchange = exchange
        self.schema = exchange
        self.services = services
        self.amqp_url = services.amqp_url
        self.postgres_url = services.postgres_url
        self.store_url = f"{self.postgres_url}?schema={self.schema}"
        self.out = tmp / "effects.txt"
        self.faults = Faults()
        self.workers: list[subprocess.Popen[bytes]] = []
        self.exit_codes: list[int | None] = []
        self.store: Any = None
        self.publish_retries = 0
        self.publish_errors: collections.Counter[str] = collections.Counter()
        self.published_at: float | None = None
        self._publisher: threading.Thread | None = None
        self._publish_failure: BaseException | None = None
        self._stop_publishing = threading.Event()
        self.t0 = self.t_publish = time.monotonic()

    # -- workers -----------------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        return kit.start_worker(
            APP,
            self.exchange,
            self.out,
            self.store_url,
            url=self.amqp_url,
            FAIL_RATE=str(FAIL_RATE),
            DROP_RATE=str(DROP_RATE),
        )

    def start(self) -> None:
        self.store = open_store(self.store_url)  # creates the schema before the workers race to
        self.workers = [self._spawn() for _ in range(WORKERS)]
        for queue in (f"{self.exchange}.saga.postprocessing", f"{self.exchange}.drill.record"):

            def consuming(q: str = queue) -> bool:
                return self._alive() and kit.consumers(q, self.amqp_url) == WORKERS

            kit.wait(consuming, 60, f"{WORKERS} workers consuming {queue}")

    def _alive(self) -> bool:
        """True while every worker runs; fails the test if one exited by itself."""
        for w in self.workers:
            code = w.poll()
            if code is not None:
                raise AssertionError(f"worker {w.pid} exited by itself with code {code}; log:\n{self.log_tail()}")
        return True

    def kill(self, index: int, down: float = 0.0) -> None:
        """kill -9 one worker, and start a new one after ``down`` seconds."""
        w = self.workers[index]
        w.send_signal(signal.SIGKILL)
        w.wait(30)
        self.faults.kills += 1
        time.sleep(down)
        self.workers[index] = self._spawn()

    def stop(self) -> None:
        """SIGTERM every worker and wait for it (kill -9 after 60 s)."""
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for w in self.workers:
            try:
                codes.append(w.wait(60))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(w.wait(30))
        self.exit_codes = codes

    def log_events(self) -> dict[str, int]:
        """How often the workers logged each warning or error (``worker.connection_lost``, ...)."""
        log = self.out.with_suffix(".log")
        if not log.exists():
            return {}
        found = re.findall(r"\[(?:warning|error|critical) *\] (\S+)", log.read_text(errors="replace"))
        return dict(sorted(collections.Counter(found).items()))

    def log_tail(self, lines: int = 15) -> str:
        """The workers' last log lines, without the participants' simulated failures."""
        log = self.out.with_suffix(".log")
        if not log.exists():
            return "(no log)"
        text = log.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if "simulated transient failure" not in line][-lines:])

    # -- publishing --------------------------------------------------------------------------------

    def plan(self) -> list[Event]:
        """Uploads (one saga each) and plain events, interleaved."""
        per_upload = max(1, EVENTS // SAGAS)
        events: list[Event] = []
        n = 0
        for i in range(SAGAS):
            events.append(kit.upload(i))
            for _ in range(per_upload):
                if n < EVENTS:
                    events.append(Event("drill.events.created", {"n": n}))
                    n += 1
        events += [Event("drill.events.created", {"n": k}) for k in range(n, EVENTS)]
        return events

    def publish(self, seconds: float = PUBLISH_SECONDS, batches: int = 40) -> None:
        """Publish the plan in a background thread, spread over ``seconds``. A batch the broker did not
        confirm is published again (same event ids) until it is: every event of the plan gets published."""
        events = self.plan()
        size = -(-len(events) // batches)

        def run() -> None:
            bus = EventBus(self.amqp_url, exchange=self.exchange, publish_timeout=5, connect_timeout=2)
            try:
                start = time.monotonic()
                for b in range(batches):
                    batch = events[b * size : (b + 1) * size]
                    if self._stop_publishing.wait(max(0.0, start + b * seconds / batches - time.monotonic())):
                        return
                    while batch and not self._stop_publishing.is_set():
                        try:
                            bus.publish_many(batch)
                            batch = []
                        except TransportError as exc:
                            self.publish_errors[type(exc).__name__] += 1
                            failed = getattr(exc, "failed", None)
                            if failed:
                                batch = [e for e in batch if e.id in failed]
                            self.publish_retries += 1
                            self._stop_publishing.wait(0.2)
                self.published_at = time.monotonic()
            except BaseException as exc:
                self._publish_failure = exc
                raise
            finally:
                bus.close()

        self._publisher = threading.Thread(target=run, name="fault-publisher", daemon=True)
        self._publisher.start()

    def stop_publishing(self) -> None:
        """Make the publisher thread give up (after a failed test) and wait for it."""
        self._stop_publishing.set()
        if self._publisher is not None:
            self._publisher.join(30)

    def published(self, timeout: float = 90) -> None:
        assert self._publisher is not None
        self._publisher.join(timeout)
        if self._publish_failure is not None:
            raise AssertionError(f"the publisher failed: {self._publish_failure!r}")
        assert not self._publisher.is_alive(), f"publishing did not finish in {timeout}s"

    def at(self, second: float) -> None:
        """Sleep until ``second`` seconds after publishing began."""
        time.sleep(max(0.0, self.t_publish + second - time.monotonic()))

    # -- checking ----------------------------------------------------------------------------------

    def sagas(self) -> list[Any] | None:
        """Every saga in the store, or None while the store does not answer (PostgreSQL restarting)."""
        try:
            return list(self.store.list_sagas(limit=SAGAS * 2 + 100))
        except Exception:
            return None

    def done(self) -> bool:
        self._alive()
        if not set(kit.lines(self.out, "alo")) >= set(range(EVENTS)):
            return False
        sagas = self.sagas()
        return sagas is not None and len(sagas) >= SAGAS and all(s.final for s in sagas)

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until every event was handled and every saga is final (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while not self.done() and time.monotonic() < deadline:
            time.sleep(0.5)

    def figures(self, scenario: str, seed: int | None) -> dict[str, Any]:
        handled = kit.lines(self.out, "alo")
        distinct = set(handled)
        sagas = self.sagas() or []
        now = time.time()
        keys = {s.key for s in sagas}
        dead = self._dead_letters()
        history: collections.Counter[str] = collections.Counter()
        for s in sagas:
            for h in self.store.saga_history(s.id):
                if h.reason.startswith("deadline passed"):
                    history["requests_resent_by_deadline"] += 1
        return {
            "scenario": scenario,
            "seed": seed,
            "workers": WORKERS,
            "fail_rate": FAIL_RATE,
            "drop_rate": DROP_RATE,
            "events_published": EVENTS,
            "events_handled": len(handled),
            "events_distinct_handled": len(distinct & set(range(EVENTS))),
            "events_lost": len(set(range(EVENTS)) - distinct),
            "events_duplicates": len(handled) - len(distinct),
            "sagas_published": SAGAS,
            "sagas_started": len(sagas),
            "sagas_missing": len({f"up-{i}" for i in range(SAGAS)} - keys),
            "sagas_final": sum(1 for s in sagas if s.final),
            "sagas_not_final": sum(1 for s in sagas if not s.final),
            "sagas_stuck": sum(1 for s in sagas if not s.final and (s.deadline is None or s.deadline <= now)),
            "saga_states": dict(collections.Counter(s.state for s in sagas)),
            "saga_outcomes": dict(collections.Counter(str(s.data.get("outcome")) for s in sagas)),
            "sagas_other_outcome_than_without_faults": sum(
                1 for s in sagas if s.data.get("outcome") != kit.expected(int(s.key.split("-")[1]))
            ),
            "requests_resent_by_deadline": history["requests_resent_by_deadline"],
            "dead_letters": sum(dead.values()),
            "dead_letter_reasons": dead,
            "faults": {
                "kills": self.faults.kills,
                "broker_restarts": self.faults.broker_restarts,
                "connection_closes": self.faults.connection_closes,
                "database_restarts": self.faults.database_restarts,
            },
            "outage_seconds": [round(s, 1) for s in self.faults.outage_seconds],
            "worker_log": self.log_events(),
            "publish_retries": self.publish_retries,
            "publish_errors": dict(self.publish_errors),
            "worker_exit_codes_on_sigterm": self.exit_codes,
            "wall_seconds": round(time.monotonic() - self.t0, 1),
        }

    def _dead_letters(self) -> dict[str, int]:
        """The dead letters, counted by queue and reason (they stay in the queue)."""
        try:
            bus = EventBus(self.amqp_url, exchange=self.exchange)
            try:
                found = bus.dead_letters(limit=1000)
            finally:
                bus.close()
        except Exception as exc:
            return {f"could not browse: {exc!r}": 0}
        return dict(collections.Counter(f"{d.queue}: {d.reason[:200]}" for d in found))

    def stuck_listed_by_cli(self) -> list[str]:
        """What ``sagas ls --stuck --stuck-after 0 --json`` prints for this store (one line per saga)."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sagas",
                "ls",
                "--stuck",
                "--stuck-after",
                "0",
                "--json",
                "--limit",
                "100000",
                "--store",
                self.store_url,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        return proc.stdout.splitlines()


def _restore_services(services: kit.Services) -> None:
    """Start the private node's app and the private cluster if a failed test left them down; wait until they
    answer."""
    if not kit.broker_answers(services.amqp_url):
        services.node.ctl("start_app", check=False)
    kit.await_broker(services.node, services.amqp_url)
    db = services.postgres
    assert db is not None
    if not kit.postgres_answers(services.postgres_url) and not db.running():
        db.start()
    kit.await_postgres(services.postgres_url)


@pytest.fixture(scope="module")
def services(private_rabbit: RabbitNode, private_postgres: PostgresCluster) -> kit.Services:
    """The session's private RabbitMQ node and PostgreSQL cluster: the only services these tests disturb."""
    return kit.Services(private_rabbit, private_rabbit.url, private_postgres.url, private_postgres)


@pytest.fixture
def rig(tmp_path: Path, unique: str, services: kit.Services) -> Iterator[Rig]:
    """A rig on its own exchange and schema; afterwards the workers are gone, the private RabbitMQ and
    PostgreSQL answer, and the queues, exchange and schema are deleted."""
    amqp_url, postgres_url = services.amqp_url, services.postgres_url
    r = Rig(tmp_path, unique, services)
    try:
        yield r
    finally:
        r.stop_publishing()
        for w in r.workers:
            if w.poll() is None:
                w.kill()
                w.wait(30)
        _restore_services(services)
        if r.store is not None:
            r.store.close()
        deleted = kit.cleanup(unique, services.node, amqp_url)
        kit.drop_schema(unique, postgres_url)
        assert f"{unique}.saga.postprocessing" in deleted or not r.workers, deleted
        assert not [q for q in deleted if kit.queue_exists(q, amqp_url)], "queues left after the clean-up"
        assert not kit.exchange_exists(unique, amqp_url)
        assert not kit.schema_exists(unique, postgres_url)


def _scenario(
    rig: Rig,
    name: str,
    inject: Callable[[Rig], None],
    seed: int | None = None,
    hit: Callable[[dict[str, int]], bool] | None = None,
) -> None:
    """Start the workers, publish while ``inject`` makes faults, wait for the end, check and report.
    ``hit`` tells from the counts of the workers' logged warnings that the fault reached them."""
    figures: dict[str, Any] = {}
    error: str | None = None
    try:
        rig.start()
        rig.t_publish = time.monotonic()
        rig.publish()
        inject(rig)
        rig.published()
        rig.settle()
        rig.stop()
        figures = rig.figures(name, seed)
        context = f"seed {seed}; figures {json.dumps(figures)}; worker log tail:\n{rig.log_tail()}"
        assert figures["events_lost"] == 0, f"at-least-once events lost: {context}"
        assert figures["sagas_missing"] == 0, f"sagas never started: {context}"
        assert figures["sagas_not_final"] == 0, f"sagas not final: {context}"
        assert figures["sagas_final"] == SAGAS, context
        assert set(figures["saga_outcomes"]) <= OUTCOMES, context
        assert rig.stuck_listed_by_cli() == [], context
        assert hit is None or hit(figures["worker_log"]), f"the workers did not notice the fault: {context}"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        raise
    finally:
        if not figures:
            try:
                figures = rig.figures(name, seed)
            except Exception as exc:
                figures = {"scenario": name, "seed": seed, "figures_error": repr(exc)}
        figures["passed"] = error is None
        figures["error"] = error
        print(json.dumps(figures, sort_keys=True))
        report.write({"kind": "process", **figures})


def test_kill_9_workers_at_random_moments(rig: Rig) -> None:
    """Workers killed with -9 at random (seeded) moments and restarted lose no event and strand no saga."""
    seed = _seed()
    print(f"SAGAS_FAULTS_SEED={seed}")
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.5, PUBLISH_SECONDS + 4.0) for _ in range(3))

    def inject(r: Rig) -> None:
        for moment in moments:
            r.at(moment)
            r.kill(rng.randrange(WORKERS), down=rng.uniform(0.0, 1.0))

    _scenario(rig, "kill -9 workers", inject, seed)


def test_broker_restart(rig: Rig) -> None:
    """rabbitmqctl stop_app, a few seconds down, start_app (on the private node), while sagas and events are in
    flight: nothing is lost and every saga ends final."""

    def inject(r: Rig) -> None:
        r.at(PUBLISH_SECONDS * 0.4)
        r.faults.outage_seconds.append(kit.restart_broker(r.services.node, r.amqp_url, down=1.0))
        r.faults.broker_restarts += 1

    _scenario(rig, "broker restart", inject, hit=lambda log: log.get("worker.connection_lost", 0) >= WORKERS)


def test_broker_closes_all_connections(rig: Rig) -> None:
    """rabbitmqctl close_all_connections on the private node, twice: workers and publisher reconnect, and nothing
    is lost."""

    def inject(r: Rig) -> None:
        for fraction in (0.3, 0.7):
            r.at(PUBLISH_SECONDS * fraction)
            kit.close_all_connections(r.services.node, "test")
            r.faults.connection_closes += 1

    _scenario(
        rig, "broker closes all connections", inject, hit=lambda log: log.get("worker.connection_lost", 0) >= WORKERS
    )


def test_database_restart(rig: Rig) -> None:
    """pg_ctl restart -m fast of the private cluster while sagas run: messages wait and are retried, sagas resume
    and end final."""

    def inject(r: Rig) -> None:
        r.at(PUBLISH_SECONDS * 0.4)
        assert r.services.postgres is not None
        r.faults.outage_seconds.append(kit.restart_postgres(r.services.postgres, r.postgres_url))
        r.faults.database_restarts += 1

    _scenario(
        rig,
        "database restart",
        inject,
        hit=lambda log: (
            sum(log.get(e, 0) for e in ("message.not_processed", "worker.timers_failed", "saga.message_failed")) > 0
        ),
    )
