"""The post-processing example on a three-node RabbitMQ cluster (quorum queues, a multi-host broker URL,
PostgreSQL, two worker processes), losing the node the workers are connected to in the middle of the run.

The cluster is started once for this module by ``scripts/rabbit_cluster.py`` (nodes sagas-c1..3 on
127.0.0.1:5681..5683, beside the default node) and always stopped afterwards. The tests run in file
order: the second one stops a second node, which the first one must not see.

Outside CI the module skips when RabbitMQ is not installed; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sagas import EventBus
from tests import report
from tests.conftest import IN_CI, POSTGRES_URL, require
from tests.helpers import wait_for
from transport import PublishError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbit_cluster.py"
UPLOADS = 200
#: how the test stops sagas-c1: "stop" (rabbitmqctl stop, a planned stop), "kill" (SIGKILL, a crash), or
#: "none" (a baseline run that loses no node, to compare the figures with)
STOP = os.environ.get("SAGAS_CLUSTER_TEST_STOP", "stop")
assert STOP in ("stop", "kill", "none"), f"SAGAS_CLUSTER_TEST_STOP={STOP!r}: use stop, kill or none"

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rabbit_cluster", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rabbit_cluster", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rc = _load_script()
URL = rc.broker_url()  # amqp://guest:guest@127.0.0.1:5681;...:5682;...:5683
C1, C2, C3 = rc.NODES


def _script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def _exclusive(timeout: float = 600) -> Iterator[None]:
    """One cluster test run at a time on this machine: a second run waits instead of stopping the
    first one's cluster (``start`` stops any cluster it finds)."""
    with open(rc.BASE.with_name(rc.BASE.name + ".tests.lock"), "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test run held the cluster for more than {timeout:.0f}s")
                time.sleep(1)
        yield


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A running three-node cluster; stopped (nothing left running, base directory deleted) afterwards."""
    if not rc.installed():
        if IN_CI:
            pytest.fail("rabbitmq-server is not installed; CI must provide it for the cluster tests")
        pytest.skip("rabbitmq-server is not installed (needed to start a local 3-node cluster)")
    with _exclusive():
        t0 = time.monotonic()
        started = _script("start")
        start_seconds = time.monotonic() - t0
        try:
            if started.returncode != 0:
                pytest.fail(f"the cluster did not start:\n{started.stderr[-5000:]}")
            yield {"url": URL, "start_seconds": start_seconds, "log": started.stderr}
        finally:
            stopped = _script("stop")
            assert stopped.returncode == 0, stopped.stderr
            assert not rc.node_pids(), "a cluster node still runs after stop"
            assert not rc.BASE.exists()


@pytest.fixture
def pg_schema(unique: str) -> Iterator[str]:
    require(POSTGRES_URL, "PostgreSQL")
    yield unique
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


def _upload(i: int) -> Any:
    from sagas import Event

    # every 5th is infected (delete), every 7th otherwise is 20 MiB (abort), the rest are clean (continue)
    name = f"eicar-{i}.com" if i % 5 == 0 else f"file-{i}.txt"
    size = 20 * 1024 * 1024 if i % 7 == 0 else 1000 + i
    return Event("ocis.storage.bytes_received", {"upload_id": f"up-{i}", "name": name, "size": size, "user": "marie"})


def _expected(i: int) -> str:
    return "delete" if i % 5 == 0 else "abort" if i % 7 == 0 else "continue"


def _log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in _log_lines(path) if e.get("event") == name]


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def _queues(exchange: str) -> dict[str, dict[str, Any]]:
    """The exchange's queues as the cluster reports them: type, leader and members."""
    out = rc.ctl(C3, "-q", "list_queues", "name", "type", "leader", "members", "--formatter", "json").stdout
    return {q["name"]: q for q in json.loads(out) if q["name"].startswith(f"{exchange}.")}


def _start_worker(schema: str, exchange: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAGAS_BROKER_URL": URL,
        "SAGAS_STORE_URL": f"{POSTGRES_URL}?schema={schema}",
        "SAGAS_EXCHANGE": exchange,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sagas", "--log-json", "--log-level", "debug", "run", "examples.postprocessing:app"],
            env=env,
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> list[int | None]:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for w in workers:
        try:
            codes.append(w.wait(60))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
            codes.append(None)
    return codes


def test_postprocessing_survives_losing_the_node_the_workers_use(
    cluster: dict[str, Any], pg_schema: str, unique: str, tmp_path: Path
) -> None:
    """200 uploads on the cluster; sagas-c1, which both workers are connected to and which leads every
    quorum queue they declared, is stopped (``rabbitmqctl stop``, or SIGKILL with
    SAGAS_CLUSTER_TEST_STOP=kill) while sagas are in flight. The workers fail over to sagas-c2, the
    queues elect new leaders, and every saga ends final with the outcome its upload calls for."""
    from sagas import EventBus, open_store

    exchange = unique
    # The dead-letter queue is a classic queue, which lives on one node only: declare it on sagas-c3,
    # which stays up, so that dead-lettering keeps working (a worker connects while the dead-letter
    # queue's node is down too, see the test below).
    publisher = EventBus(";".join(n.url for n in reversed(rc.NODES)), exchange=exchange)
    publisher.connect()
    store = open_store(f"{POSTGRES_URL}?schema={pg_schema}")
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [_start_worker(pg_schema, exchange, log) for log in logs]
    try:
        wait_for(lambda: all(_events(log, "worker.started") for log in logs), 60, "both workers to start")
        queues = _queues(exchange)
        durable = {name: q for name, q in queues.items() if name != f"{exchange}.dead"}
        assert f"{exchange}.saga.postprocessing" in durable
        assert {q["type"] for q in durable.values()} == {"quorum"}
        assert all(len(q["members"]) == 3 for q in durable.values()), "each quorum queue has a replica on each node"
        led_by_c1 = sum(1 for q in durable.values() if q["leader"] == C1.name)
        assert queues[f"{exchange}.dead"]["type"] == "classic"
        t0 = time.monotonic()
        # Publish at a steady pace, so that sagas are in flight whenever the stop takes effect (stopping a
        # node takes seconds, more on a busy machine). The publisher is connected to sagas-c3.
        pacer = threading.Thread(target=_publish_paced, args=(publisher, UPLOADS), daemon=True)
        pacer.start()
        # Stop sagas-c1 once a quarter of the sagas have started: they move in step, so most are in flight.
        wait_for(lambda: len(store.list_sagas(limit=UPLOADS + 10)) >= UPLOADS // 4, 60, "sagas to start")
        stop_began = stop_ended = time.time()
        if STOP != "none":
            stopped = _script("stop-node", C1.name, *(["--kill"] if STOP == "kill" else []), timeout=120)
            assert stopped.returncode == 0, stopped.stderr
            stop_ended = time.time()
        pacer.join(120)
        wait_for(
            lambda: sum(1 for s in store.list_sagas(limit=UPLOADS + 10) if s.final) >= UPLOADS,
            150,
            "every saga to end final",
        )
        elapsed = time.monotonic() - t0

        leaders_after = collections.Counter(q["leader"] for q in _queues(exchange).values())
        sagas = store.list_sagas(limit=UPLOADS + 10)
        history = {s.id: store.saga_history(s.id) for s in sagas}
        states = collections.Counter(s.state for s in sagas)
        outcomes = collections.Counter(s.data.get("outcome") for s in sagas)
        wrong = [s.key for s in sagas if s.data.get("outcome") != _expected(int(s.key.split("-")[1]))]
        resent = [e.at for h in history.values() for e in h if e.reason.startswith("deadline passed")]
        dead = publisher.dead_letters()
        alive = [w.poll() is None for w in workers]
        lost = [_events(log, "worker.connection_lost") for log in logs]
        back = [_events(log, "worker.reconnected") for log in logs]
        assert all(alive), f"a worker exited: {[w.returncode for w in workers]}; logs in {tmp_path}"
        if STOP != "none":
            assert all(lost), "a worker did not lose its connection: was it connected to sagas-c1?"
            assert all(back), f"a worker did not reconnect; logs in {tmp_path}"
        # when sagas-c1 dropped the connections (without a stop: when the stop would have begun)
        lost_at = min(_ts(lo[0]) for lo in lost) if STOP != "none" else stop_began
        final_at = [max((e.at for e in history[s.id] if e.to_state == s.state), default=0.0) for s in sagas]
        in_flight = sum(1 for t in final_at if t > lost_at)
        # When messages flowed again: the first message each worker handled after it reconnected.
        resumed = []
        for log, b in zip(logs, back, strict=True):
            after = [_ts(e) for e in _events(log, "message.handled") if b and _ts(e) >= _ts(b[0])]
            resumed.append(round(min(after) - lost_at, 2) if after else None)
        # The longest pause in the saga queue's traffic (both workers) from the stop on: a quorum queue whose
        # leader was on sagas-c1 delivers nothing until it has a new leader and a consumer again.
        saga_msgs = sorted(
            _ts(e) for log in logs for e in _events(log, "message.handled") if "saga_type" in e and _ts(e) >= stop_began
        )
        saga_pause = max((b - a for a, b in itertools.pairwise([stop_began, *saga_msgs])), default=0.0)
        figures = {
            "cluster_start_s": round(cluster["start_seconds"], 1),
            "stop": STOP,
            "quorum_queues": len(durable),
            "quorum_leaders_on_c1_before": led_by_c1,
            "queue_leaders_after": dict(leaders_after),
            "uploads": UPLOADS,
            "sagas": len(sagas),
            "states": dict(states),
            "outcomes": dict(outcomes),
            "wrong_outcomes": len(wrong),
            "dead_letters": len(dead),
            "not_final_when_c1_dropped_the_connections": in_flight,
            "stop_node_s": round(stop_ended - stop_began, 1),
            "connections_dropped_after_stop_began_s": round(lost_at - stop_began, 2),
            "reconnected_after_s": [
                round(_ts(b[0]) - _ts(lo[0]), 2) if lo and b else None for lo, b in zip(lost, back, strict=True)
            ],
            "first_message_handled_after_s": resumed,
            "longest_saga_queue_pause_s": round(saga_pause, 2),
            # The example's steps time out after 5 s: a longer pause makes every waiting saga re-send its
            # request (answered from the participants' reply cache). Without a stop there are none.
            "requests_resent_by_deadlines_before_loss": sum(1 for t in resent if t < lost_at),
            "requests_resent_by_deadlines_after_loss": sum(1 for t in resent if t >= lost_at),
            "run_s": round(elapsed, 1),
        }
        print("\ncluster figures:", json.dumps(figures))
        report.write(
            {
                "kind": "cluster",
                "scenario": "3-node cluster, a node stopped",
                **{
                    k: figures[k]
                    for k in (
                        "stop",
                        "uploads",
                        "sagas",
                        "states",
                        "wrong_outcomes",
                        "dead_letters",
                        "not_final_when_c1_dropped_the_connections",
                        "reconnected_after_s",
                        "longest_saga_queue_pause_s",
                        "run_s",
                    )
                },
            }
        )
        for log in logs:
            for e in _events(log, "worker.connection_lost") + _events(log, "worker.reconnected"):
                print(f"  {log.name}: {e['timestamp']} {e['event']} {e.get('error', '')}")

        assert in_flight > 0, "every saga had ended before sagas-c1 went away: nothing was tested"
        assert len(sagas) == UPLOADS, "sagas were lost"
        assert {s.key for s in sagas} == {f"up-{i}" for i in range(UPLOADS)}
        assert states == {"done": UPLOADS}
        assert wrong == []
        assert dead == []
        assert C1.name not in leaders_after or STOP == "none"
    finally:
        codes = _stop_workers(workers)
        store.close()
        publisher.close()
    assert codes == [0, 0]


def _publish_paced(publisher: EventBus, n: int, per_second: float = 25.0) -> None:
    for i in range(n):
        for _attempt in range(50):
            try:
                publisher.publish(_upload(i))
                break
            except PublishError:
                time.sleep(0.2)  # the same event again (same id): a duplicate start is harmless
        time.sleep(1 / per_second)


def test_a_worker_connects_while_the_dead_letter_queues_node_is_down(cluster: dict[str, Any], unique: str) -> None:
    """The exchange's dead-letter queue was declared on sagas-c2, which then crashed (SIGKILL). A worker
    started now, with the whole multi-host URL, should still connect and consume on sagas-c3 (dead
    letters can wait, as docs/deployment.md says) instead of failing."""
    from sagas import App, EventBus, Service, Worker

    # The test above stopped sagas-c1; quorum queues need two of the three nodes, so bring it back.
    if not rc.node_pids(C1):
        started = _script("start-node", C1.name, timeout=180)
        assert started.returncode == 0, started.stderr
    first = EventBus(C2.url, exchange=unique)
    first.connect()  # declares unique.dead on sagas-c2
    first.close()
    killed = _script("stop-node", C2.name, "--kill", timeout=60)
    assert killed.returncode == 0, killed.stderr
    svc = Service("cluster")
    svc.on("ocis.files.uploaded", name="count")(lambda event: None)
    worker = Worker(App(svc, exchange=unique), broker=URL, store="memory://", grace_period=5)
    try:
        worker.start()
        assert worker.bus.connected
    finally:
        worker.close()
