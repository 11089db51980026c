"""Fault drills on a real RabbitMQ, with workers as separate processes. Each prints its figures.

    python scripts/drills.py kill-worker     [-n 10000]   # kill -9 a worker halfway, restart it
    python scripts/drills.py broker-restart  [-n 10000]   # rabbitmqctl stop_app / start_app while publishing
    python scripts/drills.py at-most-once                 # kill -9 during an at-most-once handler
    python scripts/drills.py notifications   [-n 1000]    # 1,000 shares, kill -9 the worker twice
    python scripts/drills.py postprocessing  [-n 500]     # 2 workers, PostgreSQL, faults, kill -9 one
    python scripts/drills.py deadlines                    # deadlines fire after a restart / on another worker
    python scripts/drills.py scale           [-n 500]     # sagas/s with 1 and with 2 worker processes
    python scripts/drills.py slow-participant [-n 200]    # step deadline < handling time, 2 and 3 workers, kill -9
    python scripts/drills.py black-hole      [-n 200]     # hostA;hostB, hostA stops answering (no close): fail-over

Each drill starts a private RabbitMQ node and PostgreSQL cluster (scripts/private_services.py: free ports,
temporary folders, always stopped and deleted), so broker-restart stops and starts that node only. With
``--machine-services`` the drills run on the machine's own RabbitMQ (127.0.0.1:5672, or
SAGAS_DRILL_AMQP_URL) and PostgreSQL (SAGAS_DRILL_POSTGRES_URL) instead, and broker-restart then stops
and starts the machine's RabbitMQ: never do that on a machine others use. Every drill uses its own
exchange and deletes its queues afterwards.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from drillkit import (
    ROOT,
    Services,
    WaitTimeout,
    black_hole_failover,
    cleanup,
    consumers,
    depth,
    drop_schema,
    expected,
    lines,
    pg_store,
    restart_broker,
    services,
    slow_participant,
    start_worker,
    upload,
    wait,
)
from private_services import private_rabbit_node

from sagas import (
    Event,
    EventBus,
    Store,
    configure_logging,
)
from sagas.testing import MailSink
from transport import PublishError

configure_logging(level="warning")


def kill_worker(s: Services, n: int) -> None:
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        out, store = Path(tmp) / "effects.txt", Path(tmp) / "s.db"
        w = start_worker("drill_app:app", exchange, out, store, url=s.amqp_url)
        bus = EventBus(s.amqp_url, exchange=exchange)
        wait(lambda: consumers(f"{exchange}.drill.record", s.amqp_url) > 0, 30, "worker")
        t0 = time.monotonic()
        bus.publish_many([Event("drill.events.created", {"n": i}) for i in range(n)])
        wait(lambda: len(lines(out, "alo")) >= n // 2, 120, "half handled")
        handled_at_kill = len(lines(out, "alo"))
        w.send_signal(signal.SIGKILL)
        w.wait()
        w = start_worker("drill_app:app", exchange, out, store, url=s.amqp_url)
        wait(lambda: set(lines(out, "alo")) >= set(range(n)), 300, "every event handled")
        elapsed = time.monotonic() - t0
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        got = lines(out, "alo")
        dupes = len(got) - len(set(got))
        print(
            f"kill-worker: published {n}, handled before kill -9 {handled_at_kill}, "
            f"distinct handled {len(set(got))}, lost {n - len(set(got) & set(range(n)))}, "
            f"redelivered duplicates {dupes} (at-least-once without inbox), {elapsed:.1f}s, "
            f"worker exit after SIGTERM {w.returncode}"
        )
        bus.close()
        cleanup(exchange, s.node, s.amqp_url)


def broker_restart(s: Services, n: int) -> None:
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        out, store = Path(tmp) / "effects.txt", Path(tmp) / "s.db"
        w = start_worker("drill_app:app", exchange, out, store, url=s.amqp_url)
        bus = EventBus(s.amqp_url, exchange=exchange, publish_timeout=5, connect_timeout=2)
        wait(lambda: consumers(f"{exchange}.drill.record", s.amqp_url) > 0, 30, "worker")
        ok: list[int] = []
        failed: collections.Counter[str] = collections.Counter()
        restarted = threading.Event()

        def restart() -> None:
            wait(lambda: len(ok) >= n // 3, 120, "a third published")
            # the broker stays down for a while: publishes must fail, not hang
            restart_broker(s.node, s.amqp_url, down=3)
            restarted.set()

        threading.Thread(target=restart, daemon=True).start()
        i = 0
        t0 = time.monotonic()
        while len(ok) < n:
            started = time.monotonic()
            try:
                bus.publish(Event("drill.events.created", {"n": i}))
                ok.append(i)
            except PublishError as exc:
                failed[type(exc).__name__] += 1
                if time.monotonic() - started > bus.publish_timeout + bus.connect_timeout + 1:
                    raise SystemExit(f"a failed publish took {time.monotonic() - started:.1f}s") from None
                time.sleep(0.05)
            i += 1
        wait(restarted.is_set, 60, "restart")
        wait(lambda: set(lines(out, "alo")) >= set(ok), 300, "every confirmed event handled")
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        got = set(lines(out, "alo"))
        print(
            f"broker-restart: publish calls {i}, returned {len(ok)}, raised {sum(failed.values())} "
            f"({dict(failed)}), confirmed and handled {len(got & set(ok))}/{len(ok)}, "
            f"failed-publish events handled anyway {len(got - set(ok))}, {time.monotonic() - t0:.1f}s, "
            f"worker exit {w.returncode}"
        )
        bus.close()
        cleanup(exchange, s.node, s.amqp_url)


def at_most_once(s: Services) -> None:
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        out, store = Path(tmp) / "effects.txt", Path(tmp) / "s.db"
        a = start_worker("drill_app:app", exchange, out, store, DRILL_AMO_SLEEP="30", url=s.amqp_url)
        b = start_worker("drill_app:app", exchange, out, store, DRILL_AMO_SLEEP="30", url=s.amqp_url)
        bus = EventBus(s.amqp_url, exchange=exchange)
        wait(lambda: consumers(f"{exchange}.drill.seen", s.amqp_url) == 2, 30, "two workers")
        bus.publish_many([Event("drill.presence.seen", {"n": i}) for i in range(2)])
        wait(lambda: len(lines(out, "amo-start")) == 2, 30, "both handlers started")
        a.send_signal(signal.SIGKILL)
        b.send_signal(signal.SIGKILL)
        a.wait()
        b.wait()
        c = start_worker("drill_app:app", exchange, out, store, DRILL_AMO_SLEEP="0", url=s.amqp_url)
        wait(lambda: consumers(f"{exchange}.drill.seen", s.amqp_url) == 1, 30, "new worker")
        bus.publish(Event("drill.presence.seen", {"n": 99}))
        wait(lambda: 99 in lines(out, "amo"), 30, "a new event")
        c.send_signal(signal.SIGTERM)
        c.wait(30)
        starts = lines(out, "amo-start")
        print(
            f"at-most-once: 2 events in flight when both workers were killed; deliveries after restart "
            f"of those 2: {len([s for s in starts if s in (0, 1)]) - 2}; new event handled: "
            f"{99 in lines(out, 'amo')}"
        )
        bus.close()
        cleanup(exchange, s.node, s.amqp_url)


def notifications(s: Services, n: int) -> None:
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, MailSink() as sink:
        out, store = Path(tmp) / "effects.txt", Path(tmp) / "s.db"
        env = {"SMTP_HOST": sink.host, "SMTP_PORT": str(sink.port)}
        w = start_worker("examples.notifications:app", exchange, out, store, **env, url=s.amqp_url)
        queue = f"{exchange}.notifications.mail_grantee"
        wait(lambda: consumers(queue, s.amqp_url) > 0, 30, "worker")
        bus = EventBus(s.amqp_url, exchange=exchange)
        from examples.notifications import share_created

        bus.publish_many([share_created(f"share-{i}", "einstein", f"u{i}", f"/f{i}") for i in range(n)])
        kills = []
        for fraction in (3, 2):  # kill at about a third, and again at about two thirds
            target = n * (4 - fraction) // 3 if fraction == 2 else n // 3

            def mailed(t: int = target) -> bool:
                return len(sink.mails) >= t

            wait(mailed, 120, "mails")
            w.send_signal(signal.SIGKILL)
            w.wait()
            kills.append(len(sink.mails))
            w = start_worker("examples.notifications:app", exchange, out, store, **env, url=s.amqp_url)
        wait(lambda: len({m["X-Share-Id"] for m in sink.mails}) >= n, 300, "every share mailed")
        wait(lambda: depth(queue, s.amqp_url) == 0, 60, "queue empty")
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        per_share = collections.Counter(m["X-Share-Id"] for m in sink.mails)
        dupes = sum(c - 1 for c in per_share.values())
        print(
            f"notifications: shares {n}, mailed {len(per_share)}, mails {len(sink.mails)}, "
            f"duplicates {dupes} (2 kills, at mails {kills}), worker exit {w.returncode}"
        )
        bus.close()
        cleanup(exchange, s.node, s.amqp_url)


def postprocessing(s: Services, n: int) -> None:
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    schema = exchange
    store_url = f"{s.postgres_url}?schema={schema}"
    env = {"FAIL_RATE": "0.2", "DROP_RATE": "0.1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.txt"
        store = pg_store(schema, s.postgres_url)
        app = "examples.postprocessing:app"
        workers = [start_worker(app, exchange, out, store_url, **env, url=s.amqp_url) for _ in range(2)]
        wait(lambda: consumers(f"{exchange}.saga.postprocessing", s.amqp_url) == 2, 60, "two workers")
        bus = EventBus(s.amqp_url, exchange=exchange)
        t0 = time.monotonic()
        bus.publish_many([upload(i) for i in range(n)])
        wait(lambda: sum(1 for s in store.list_sagas(limit=n + 10) if s.final) >= n // 2, 300, "half final")
        final_at_kill = sum(1 for s in store.list_sagas(limit=n + 10) if s.final)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        workers[0] = start_worker("examples.postprocessing:app", exchange, out, store_url, **env, url=s.amqp_url)

        def all_final() -> bool:
            sagas = store.list_sagas(limit=n + 10)
            return len(sagas) == n and all(s.final for s in sagas)

        wait(all_final, 600, "every saga final")
        elapsed = time.monotonic() - t0
        sagas = store.list_sagas(limit=n + 10)
        wrong = [s.key for s in sagas if s.data.get("outcome") != expected(int(s.key.split("-")[1]))]
        outcomes = collections.Counter(s.data.get("outcome") for s in sagas)
        states = collections.Counter(s.state for s in sagas)
        stuck = store.list_sagas(stuck_before=time.time() - 60)
        ls_stuck = subprocess.run(
            [sys.executable, "-m", "sagas", "ls", "--stuck", "--json", "--store", store_url],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
        resends = sum(1 for s in sagas for h in store.saga_history(s.id) if h.reason.startswith("deadline passed"))
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(60) for w in workers]
        print(
            f"postprocessing: {n} uploads, 2 workers (RabbitMQ + PostgreSQL), FAIL_RATE=0.2 DROP_RATE=0.1, "
            f"kill -9 one worker at {final_at_kill} final; all {len(sagas)} final after {elapsed:.1f}s; "
            f"states {dict(states)}; outcomes {dict(outcomes)}; wrong outcomes {len(wrong)}; "
            f"stuck {len(stuck)}; `sagas ls --stuck --json` printed {len(ls_stuck.splitlines())} line(s); "
            f"requests re-sent by deadlines {resends}; worker exits {codes}"
        )
        bus.close()
        store.close()
        drop_schema(schema, s.postgres_url)
        cleanup(exchange, s.node, s.amqp_url)


def deadlines(s: Services) -> None:
    """Sagas wait on a request nobody answers (DROP_RATE=1). Kill the only worker, let deadlines pass,
    start another: it fires them. Then kill that one and restart the first: it fires them too."""
    exchange = f"drill{uuid.uuid4().hex[:8]}"
    schema = exchange
    store_url = f"{s.postgres_url}?schema={schema}"
    env = {"DROP_RATE": "1.0"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.txt"
        store = pg_store(schema, s.postgres_url)
        a = start_worker("examples.postprocessing:app", exchange, out, store_url, **env, url=s.amqp_url)
        wait(lambda: consumers(f"{exchange}.saga.postprocessing", s.amqp_url) == 1, 60, "worker A")
        bus = EventBus(s.amqp_url, exchange=exchange)
        bus.publish_many([upload(i) for i in range(1, 21) if i % 5 and i % 7])  # clean uploads
        count = len([i for i in range(1, 21) if i % 5 and i % 7])
        wait(lambda: len(store.list_sagas()) == count, 60, "sagas started")
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed_at = time.time()
        wait(
            lambda: all(s.deadline is not None and s.deadline < time.time() - 1 for s in store.list_sagas()),
            60,
            "deadlines to pass while no worker runs",
        )

        def resent_after(t: float) -> int:
            return sum(
                1
                for s in store.list_sagas()
                for h in store.saga_history(s.id)
                if h.reason.startswith("deadline passed") and h.at > t
            )

        assert resent_after(killed_at) == 0
        b = start_worker("examples.postprocessing:app", exchange, out, store_url, **env, url=s.amqp_url)
        started_b = time.time()
        wait(lambda: resent_after(started_b) >= count, 60, "worker B to fire the deadlines")
        fired_by_b = resent_after(started_b)
        b.send_signal(signal.SIGKILL)
        b.wait()
        killed_b = time.time()
        wait(
            lambda: all(
                s.final or (s.deadline is not None and s.deadline < time.time() - 0.5) for s in store.list_sagas()
            ),
            60,
            "deadlines to pass again",
        )
        a = start_worker("examples.postprocessing:app", exchange, out, store_url, **env, url=s.amqp_url)
        restarted = time.time()
        wait(
            lambda: resent_after(restarted) + sum(1 for s in store.list_sagas() if s.final) > 0,
            60,
            "restarted worker A to fire deadlines",
        )
        wait(lambda: all(s.final for s in store.list_sagas()), 600, "every saga final")
        fired_by_a = sum(
            1
            for s in store.list_sagas()
            for h in store.saga_history(s.id)
            if h.at > restarted and h.message_id.startswith("deadline:")
        )
        outcomes = collections.Counter((s.state, s.data.get("outcome")) for s in store.list_sagas())
        a.send_signal(signal.SIGTERM)
        a.wait(60)
        print(
            f"deadlines: {count} sagas waiting on unanswered requests; worker A killed; no deadline fired while "
            f"no worker ran; worker B (started {started_b - killed_at:.1f}s after) re-sent {fired_by_b} requests; "
            f"B killed {killed_b - started_b:.1f}s later; restarted A fired {fired_by_a} deadline transitions; "
            f"final: {dict(outcomes)}"
        )
        bus.close()
        store.close()
        drop_schema(schema, s.postgres_url)
        cleanup(exchange, s.node, s.amqp_url)


def scale(s: Services, n: int) -> None:
    """Time N post-processing sagas (no faults) with 1 worker process, then with 2, on RabbitMQ + PostgreSQL."""
    results: dict[int, list[float]] = {}
    for count in (1, 2, 1, 2):
        exchange = f"drill{uuid.uuid4().hex[:8]}"
        store_url = f"{s.postgres_url}?schema={exchange}"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "w.txt"
            store = pg_store(exchange, s.postgres_url)
            app = "examples.postprocessing:app"
            workers = [start_worker(app, exchange, out, store_url, url=s.amqp_url) for _ in range(count)]

            def consuming(c: int = count, q: str = f"{exchange}.saga.postprocessing") -> bool:
                return consumers(q, s.amqp_url) == c

            wait(consuming, 60, "workers")
            bus = EventBus(s.amqp_url, exchange=exchange)
            t0 = time.monotonic()
            bus.publish_many([upload(i) for i in range(n)])

            def all_final(st: Store = store) -> bool:
                return sum(1 for saga in st.list_sagas(limit=n + 10) if saga.final) >= n

            wait(all_final, 600, "all final")
            elapsed = time.monotonic() - t0
            results.setdefault(count, []).append(n / elapsed)
            for w in workers:
                w.send_signal(signal.SIGTERM)
                w.wait(60)
            bus.close()
            store.close()
            drop_schema(exchange, s.postgres_url)
            cleanup(exchange, s.node, s.amqp_url)
    one, two = (sorted(results[c])[len(results[c]) // 2] for c in (1, 2))
    print(
        f"scale: {n} post-processing sagas on RabbitMQ + PostgreSQL; sagas/s with 1 worker {results[1]}, "
        f"with 2 workers {results[2]}; best-of ratio {max(results[2]) / max(results[1]):.2f}; "
        f"upper-median ratio {two / one:.2f}"
    )


def slow(s: Services, n: int) -> None:
    """A participant that takes 1 s behind a step deadline of 0.4 s: every request is re-sent while it
    is being handled. Two workers, then two with a kill -9 of one mid-handler (claim lease 10 s), then
    three; the participant's effects are counted per saga."""
    with tempfile.TemporaryDirectory() as tmp:
        for workers, kill in ((2, False), (2, True), (3, False)):
            exchange = f"drill{uuid.uuid4().hex[:8]}"
            run = slow_participant(
                s, Path(tmp), exchange, sagas=n, workers=workers, kill=kill, lease=10.0 if kill else 30.0
            )
            restarted = collections.Counter(run.restarted.values())
            print(
                f"slow-participant: {run.sagas} sagas, {run.workers} workers (RabbitMQ + PostgreSQL), "
                f"kills {run.kills}; effects counted {run.effects}, duplicates {run.duplicates} "
                f"(made by the killed worker and not recorded: {run.unrecorded}; other: {run.other_duplicates}); "
                f"states {run.states}; requests re-sent by deadlines {run.resends}, "
                f"deadlines that waited on a request being handled {run.waits}; "
                f"unfinished by the killed worker: {len(run.restarted)} (started twice: {restarted.get(2, 0)}); "
                f"all final after {run.seconds}s"
            )


def black_hole(s: Services, n: int) -> None:
    """A worker with the fail-over URL hostA;hostB (heartbeat 2 s), hostA behind a proxy that stops
    forwarding without closing anything (scripts/blackhole.py); hostB a second private node. n/4 sagas
    start on hostA before the partition, 3n/4 sagas and n plain events are published to hostB during it."""
    with tempfile.TemporaryDirectory() as tmp, private_rabbit_node("sagas-drill-b") as node_b:
        exchange = f"drill{uuid.uuid4().hex[:8]}"
        store = pg_store(exchange, s.postgres_url)  # creates the schema
        store.close()
        try:
            run = black_hole_failover(
                s.node,
                node_b,
                Path(tmp),
                exchange,
                store=f"{s.postgres_url}?schema={exchange}",
                heartbeat=2.0,
                sagas_before=max(1, n // 4),
                sagas_during=max(1, n - n // 4),
                events_during=n,
                settle=180.0,
            )
        finally:
            drop_schema(exchange, s.postgres_url)
            cleanup(exchange, s.node, s.amqp_url)
            cleanup(exchange, node_b, node_b.url)
        print(
            f"black-hole: heartbeat {run.heartbeat:g}s; partition noticed after {run.detect_seconds}s "
            f"(2 heartbeats = {2 * run.heartbeat:g}s), consuming on hostB after {run.failover_seconds}s; "
            f"sagas in flight on hostA at the partition {run.in_flight_at_partition}, started on hostB during it "
            f"{run.started_during}; sagas moved to a final state during the partition {run.moved}; sagas lost "
            f"{run.lost}; events published to hostB during it {run.events_during}, handled "
            f"{run.events_handled}; requests re-sent by deadlines {run.resends}; worker warnings {run.warnings}; "
            f"worker exit after SIGTERM {run.exit_code}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "drill",
        choices=[
            "kill-worker",
            "broker-restart",
            "at-most-once",
            "notifications",
            "postprocessing",
            "deadlines",
            "scale",
            "slow-participant",
            "black-hole",
        ],
    )
    p.add_argument("-n", type=int, default=None)
    p.add_argument(
        "--machine-services",
        action="store_true",
        help="run on the machine's own RabbitMQ and PostgreSQL instead of private ones (broker-restart then "
        "restarts the machine's RabbitMQ)",
    )
    a = p.parse_args()
    try:
        with services(machine=a.machine_services) as s:
            run(s, a.drill, a.n)
    except WaitTimeout as exc:
        raise SystemExit(str(exc)) from None


def run(s: Services, drill: str, n: int | None) -> None:
    if drill == "kill-worker":
        kill_worker(s, n or 10_000)
    elif drill == "broker-restart":
        broker_restart(s, n or 10_000)
    elif drill == "at-most-once":
        at_most_once(s)
    elif drill == "postprocessing":
        postprocessing(s, n or 500)
    elif drill == "deadlines":
        deadlines(s)
    elif drill == "scale":
        scale(s, n or 500)
    elif drill == "slow-participant":
        slow(s, n or 200)
    elif drill == "black-hole":
        black_hole(s, n or 200)
    else:
        notifications(s, n or 1000)


if __name__ == "__main__":
    main()
