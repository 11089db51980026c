"""Helpers shared by the fault drills (``scripts/drills.py``) and the real-process fault tests
(``tests/faults``): worker processes, effect files, waiting, broker and database faults, and clean-up.

Workers run as separate ``python -m sagas run`` processes. The drill app (``drill_app.py``) writes one line
per handled event to the file named by ``DRILL_OUT``, which :func:`lines` reads back. Broker faults act on
one node, through ``rabbitmqctl -n <node>``, and database faults on one cluster, through ``pg_ctl``: the
private ones :func:`services` starts (``scripts/private_services.py``). Only the drills'
``--machine-services`` mode points them at the machine's own RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from blackhole import black_hole  # noqa: E402
from private_services import (  # noqa: E402
    PostgresCluster,
    RabbitNode,
    machine_rabbit_node,
    private_postgres,
    private_rabbit_node,
)

from sagas import Event, EventBus, Store, open_store  # noqa: E402

#: the machine's services, for the drills' --machine-services mode only
MACHINE_URL = os.environ.get("SAGAS_DRILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
MACHINE_PG = os.environ.get("SAGAS_DRILL_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Services:
    """The broker node and database a drill or fault test runs on."""

    node: RabbitNode
    amqp_url: str
    postgres_url: str
    #: the private cluster, or None for the machine's PostgreSQL (which nothing here restarts)
    postgres: PostgresCluster | None = None


@contextlib.contextmanager
def services(machine: bool = False) -> Iterator[Services]:
    """A private RabbitMQ node and PostgreSQL cluster for the length of the block, always stopped and deleted
    afterwards; with ``machine``, the machine's own services instead (started and stopped by nobody here)."""
    if machine:
        yield Services(machine_rabbit_node(), MACHINE_URL, MACHINE_PG)
        return
    with private_rabbit_node("sagas-drill") as node, private_postgres("sagas-drill-pg") as db:
        yield Services(node, node.url, db.url, db)


class WaitTimeout(AssertionError):
    """A condition a drill or test waited for did not come true in time."""


# -- worker processes and their effects ---------------------------------------------------------------


def start_worker(
    app: str, exchange: str, out: Path, store: Path | str, *, url: str, **env: str
) -> subprocess.Popen[bytes]:
    """Start ``python -m sagas run app`` on ``exchange``. The drill app appends its effects to ``out``;
    the worker's own output goes to ``out`` with the suffix ``.log``."""
    e = {
        **os.environ,
        "DRILL_OUT": str(out),
        "DRILL_EXCHANGE": exchange,
        "SAGAS_EXCHANGE": exchange,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}",
        **env,
    }
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sagas",
                "--log-level",
                "warning",
                "run",
                app,
                "--broker",
                url,
                "--store",
                store if isinstance(store, str) else f"sqlite:///{store}",
                "--exchange",
                exchange,
            ],
            env=e,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    finally:
        log.close()


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> list[int]:
    """SIGTERM every worker still running, then wait for each to exit (kill -9 one that takes more than
    ``timeout`` seconds); their exit codes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


@contextlib.contextmanager
def workers_on_schema(
    s: Services, exchange: str, app: str, out: Path, count: int, **env: str
) -> Iterator[tuple[Store, list[subprocess.Popen[bytes]]]]:
    """``count`` workers of ``app`` on ``exchange``, sharing the PostgreSQL schema ``exchange`` (made
    first, so they do not race to), and a store on it for the drill. Afterwards, always: the workers
    stopped (:func:`stop_workers`, also those put in the list meanwhile), the store closed, the schema
    dropped and the exchange's queues deleted."""
    store = pg_store(exchange, s.postgres_url)
    url = f"{s.postgres_url}?schema={exchange}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.extend(start_worker(app, exchange, out, url, url=s.amqp_url, **env) for _ in range(count))
        yield store, procs
    finally:
        stop_workers(procs)
        store.close()
        drop_schema(exchange, s.postgres_url)
        cleanup(exchange, s.node, s.amqp_url)


def lines(out: Path, tag: str) -> list[int]:
    """The numbers the drill app wrote after ``tag`` in ``out``, one per handled event, in order."""
    if not out.exists():
        return []
    result = []
    # A line still being written (no newline yet) is not counted: it is complete on the next read.
    for line in out.read_text().split("\n")[:-1]:
        parts = line.split()
        if len(parts) == 2 and parts[0] == tag:
            result.append(int(parts[1]))
    return result


def lines_by_worker(out: Path, tag: str) -> dict[int, list[int]]:
    """The numbers the drill app wrote after ``tag@<pid>`` in ``out``, by worker process id: one line
    per event, which a kill -9 writes whole or not at all (each line is one write)."""
    if not out.exists():
        return {}
    result: dict[int, list[int]] = {}
    for line in out.read_text().split("\n")[:-1]:  # (a line still being written is not counted)
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(f"{tag}@"):
            result.setdefault(int(parts[0].removeprefix(f"{tag}@")), []).append(int(parts[1]))
    return result


def wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``pred`` until it is truthy; raise :class:`WaitTimeout` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- events of the post-processing example ------------------------------------------------------------


def upload(i: int) -> Event:
    """Upload number ``i``: every 5th is infected (delete), every 7th otherwise is 20 MiB (abort), the rest
    are clean (continue)."""
    name = f"eicar-{i}.com" if i % 5 == 0 else f"file-{i}.txt"
    size = 20 * 1024 * 1024 if i % 7 == 0 else 1000 + i
    return Event("ocis.storage.bytes_received", {"upload_id": f"up-{i}", "name": name, "size": size, "user": "marie"})


def expected(i: int) -> str:
    """The outcome upload ``i`` gets when no participant fails for good."""
    return "delete" if i % 5 == 0 else "abort" if i % 7 == 0 else "continue"


# -- RabbitMQ -----------------------------------------------------------------------------------------


def _amqp(url: str) -> Any:  # an amqp.Connection: py-amqp ships no type information
    import amqp

    u = urlsplit(url.split(";")[0])
    vhost = u.path[1:] if len(u.path) > 1 else "/"
    c = amqp.Connection(
        f"{u.hostname or '127.0.0.1'}:{u.port or 5672}",
        userid=u.username or "guest",
        password=u.password or "guest",
        virtual_host=vhost or "/",
        connect_timeout=5,
    )
    c.connect()
    return c


def consumers(queue: str, url: str) -> int:
    """Consumers on ``queue`` (0 if it does not exist)."""
    import amqp

    c = _amqp(url)
    try:
        return int(c.channel().queue_declare(queue, passive=True).consumer_count)
    except amqp.exceptions.NotFound:
        return 0
    finally:
        c.close()


def depth(queue: str, url: str) -> int:
    """Ready messages in ``queue``."""
    c = _amqp(url)
    try:
        return int(c.channel().queue_declare(queue, passive=True).message_count)
    finally:
        c.close()


def broker_answers(url: str) -> bool:
    """Whether the broker completes an AMQP handshake and opens a channel."""
    try:
        c = _amqp(url)
    except Exception:  # noqa: BLE001 - any failure means: not (yet) answering
        return False
    try:
        c.channel().close()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        with contextlib.suppress(Exception):  # closing a connection that broke
            c.close()


def await_broker(node: RabbitNode, url: str, timeout: float = 120) -> None:
    """Wait until the node answers AMQP (after ``rabbitmqctl await_startup`` if it does not yet)."""
    if broker_answers(url):
        return
    node.ctl("-q", "await_startup", "--timeout", str(int(timeout)), timeout=timeout + 30, check=False)
    wait(lambda: broker_answers(url), timeout, "RabbitMQ to answer AMQP", interval=0.2)


def restart_broker(node: RabbitNode, url: str, down: float = 2.0) -> float:
    """``rabbitmqctl -n <node> stop_app``, stay down ``down`` seconds, ``start_app``, and wait until the node
    answers AMQP. Always starts the app again, even if stopping failed. Returns the seconds from the stop
    command to answering again (each rabbitmqctl call adds a second or so of its own)."""
    t0 = time.monotonic()
    try:
        node.ctl("stop_app")
        time.sleep(down)
    finally:
        node.ctl("start_app")
        await_broker(node, url)
    return time.monotonic() - t0


def close_all_connections(node: RabbitNode, reason: str = "test") -> None:
    """Close every client connection of the node from its side (clients see a connection-forced close)."""
    node.ctl("close_all_connections", reason)


def cleanup(exchange: str, node: RabbitNode, url: str, queues: list[str] | None = None) -> list[str]:
    """Delete the drill's exchange and every queue whose name starts with it (workers ran in other
    processes, so the queues they declared are found on the node, with rabbitmqctl). Returns the queues
    it deleted."""
    listed = node.ctl("-q", "list_queues", "name", check=False).stdout.split()
    bus = EventBus(url, exchange=exchange)
    bus.declared_queues.update(queues or [])
    bus.declared_queues.update(q for q in listed if q.startswith(f"{exchange}."))
    deleted = sorted(bus.declared_queues)
    bus.delete_topology()
    bus.close()
    return deleted


def _declares(url: str, declare: Callable[[Any], object]) -> bool:
    """Whether a passive declare on a fresh channel finds the thing (False on 404)."""
    import amqp

    c = _amqp(url)
    try:
        declare(c.channel())
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        with contextlib.suppress(Exception):
            c.close()


def queue_exists(queue: str, url: str) -> bool:
    return _declares(url, lambda ch: ch.queue_declare(queue, passive=True))


def exchange_exists(exchange: str, url: str) -> bool:
    return _declares(url, lambda ch: ch.exchange_declare(exchange, "topic", passive=True))


# -- PostgreSQL ---------------------------------------------------------------------------------------


def pg_store(schema: str, pg: str) -> Store:
    from sagas import open_store

    return open_store(f"{pg}?schema={schema}")


def drop_schema(schema: str, pg: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def schema_exists(schema: str, pg: str) -> bool:
    import psycopg

    with psycopg.connect(pg, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,)).fetchone()
        return row is not None


def postgres_answers(pg: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(pg, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def await_postgres(pg: str, timeout: float = 120) -> None:
    """Wait until PostgreSQL accepts a connection and runs a query."""
    wait(lambda: postgres_answers(pg), timeout, "PostgreSQL to answer", interval=0.2)


def restart_postgres(db: PostgresCluster, pg: str) -> float:
    """``pg_ctl restart -m fast`` the cluster and wait until it answers; if the restart failed, start it.
    Returns the seconds it took."""
    t0 = time.monotonic()
    try:
        db.restart()
    finally:
        if not postgres_answers(pg) and not db.running():
            db.start()
        await_postgres(pg)
    return time.monotonic() - t0


# -- a slow participant across worker processes -------------------------------------------------------


@dataclass
class SlowRun:
    """Figures of one slow-participant run (:func:`slow_participant`)."""

    sagas: int
    workers: int
    kills: int
    #: the participant's effects (``book@<pid> n`` lines), and how many sagas have more than one
    effects: int
    duplicates: int
    #: the requests the killed worker started and did not finish (killed in its handler, or after its
    #: effect and before the claim recorded it), and how many times their work started in all (each
    #: must be 2: once on the killed worker, once more after its claim expired)
    restarted: dict[int, int]
    #: sagas whose effect the killed worker had made without recording it (the window no claim closes:
    #: the effect is made again), and the other duplicates (must be 0)
    unrecorded: int
    other_duplicates: int
    #: states of the sagas, requests re-sent by deadlines, deadlines that found their request being
    #: handled (and waited), seconds from the first publish to all final
    states: dict[str, int]
    resends: int
    waits: int
    seconds: float


def slow_participant(
    s: Services, tmp: Path, exchange: str, *, sagas: int, workers: int, kill: bool, lease: float = 30.0
) -> SlowRun:
    """Run ``sagas`` slow-trip sagas (drill_app.slow: a 1 s participant, a 0.4 s step deadline) on
    ``workers`` worker processes sharing a PostgreSQL store; with ``kill``, kill -9 one worker while it
    is handling requests, and start another. The participant's effects are counted in ``tmp``."""
    store_url = f"{s.postgres_url}?schema={exchange}"
    out = tmp / f"{exchange}.txt"
    env = {
        "DRILL_SLOW_SECONDS": "1.0",
        "DRILL_SLOW_TIMEOUT": "0.4",
        "SAGAS_CLAIM_LEASE": str(lease),
    }
    with workers_on_schema(s, exchange, "drill_app:slow", out, workers, **env) as (store, procs):
        for queue in (f"{exchange}.saga.slow_trip", f"{exchange}.slow_hotels.book"):

            def consuming(q: str = queue) -> bool:
                return consumers(q, s.amqp_url) == workers

            wait(consuming, 60, f"{workers} workers consuming {queue}")
        bus = EventBus(s.amqp_url, exchange=exchange)
        t0 = time.monotonic()
        bus.publish_many([Event("drill.slow.requested", {"trip": f"t{i}", "n": i}) for i in range(sagas)])
        bus.close()
        kills = 0
        killed: int | None = None
        if kill:
            wait(lambda: sum(map(len, lines_by_worker(out, "book").values())) >= sagas // 4, 120, "a quarter done")
            pid = killed = procs[0].pid

            def in_handler() -> bool:  # a request it started and has not made the effect of yet
                started = lines_by_worker(out, "book-start").get(pid, [])
                return bool(set(started) - set(lines_by_worker(out, "book").get(pid, [])))

            wait(in_handler, 30, "the worker to kill to be in a handler")
            procs[0].kill()  # kill -9, in the middle of its handlers (each takes 1 s, and they keep coming)
            procs[0].wait(30)
            kills += 1
            procs[0] = start_worker("drill_app:slow", exchange, out, store_url, url=s.amqp_url, **env)

        def all_final() -> bool:
            listed = store.list_sagas(limit=sagas + 10)
            return len(listed) == sagas and all(r.final for r in listed)

        wait(all_final, 240, "every saga final")
        seconds = time.monotonic() - t0
        time.sleep((lease if kill else 2.0) + 1.5)  # a copy still bouncing would have run the work by now
        listed = store.list_sagas(limit=sagas + 10)
        effects_by = lines_by_worker(out, "book")
        starts_by = lines_by_worker(out, "book-start")
        effects = collections.Counter(n for ns in effects_by.values() for n in ns)
        starts = collections.Counter(n for ns in starts_by.values() for n in ns)
        reasons = [h.reason for r in listed for h in store.saga_history(r.id)]
        resends = sum(1 for reason in reasons if reason.startswith("deadline passed: re-sent"))
        waits = sum(1 for reason in reasons if "is being handled" in reason)
        doubled = {n for n, count in effects.items() if count > 1}
        # The killed worker's work: what it made the effect of, and what it started and did not finish
        # (no effect, or an effect the claim did not record, so made again).
        killed_effects = set(effects_by.get(killed, ())) if killed is not None else set()
        killed_starts = set(starts_by.get(killed, ())) if killed is not None else set()
        unfinished = (killed_starts - killed_effects) | (killed_effects & doubled)
        return SlowRun(
            sagas=sagas,
            workers=workers,
            kills=kills,
            effects=sum(effects.values()),
            duplicates=sum(1 for n in effects.values() if n > 1),
            restarted={n: starts[n] for n in sorted(unfinished)},
            unrecorded=len(doubled & killed_effects),
            other_duplicates=len(doubled - killed_effects),
            states=dict(collections.Counter(r.state for r in listed)),
            resends=resends,
            waits=waits,
            seconds=round(seconds, 1),
        )


# -- one saga's own code raises on timeout ------------------------------------------------------------


@dataclass
class BadTimeoutRun:
    """Figures of one bad-timeout run (:func:`bad_timeout`)."""

    orders: int
    workers: int
    #: states of the sagas when every one was final (or when the wait gave up)
    states: dict[str, int]
    #: seconds from the publish until every good order was final (None: they were not, within the wait)
    good_final_after: float | None
    #: the history reason that parked the bad saga ("" if it was not parked)
    parked_reason: str


def bad_timeout(s: Services, tmp: Path, exchange: str, *, orders: int = 11, workers: int = 2) -> BadTimeoutRun:
    """Place ``orders`` orders (drill_app.unpaid: a 1 s payment timeout whose action reads the
    customer's name) on ``workers`` worker processes sharing a PostgreSQL store; the first is placed
    without a customer, so its saga's timeout action raises ``KeyError``, and it has the earliest
    deadline. Nobody pays, so every good order is cancelled at its deadline."""
    out = tmp / f"{exchange}.txt"
    with workers_on_schema(s, exchange, "drill_app:unpaid", out, workers) as (store, _procs):
        queue = f"{exchange}.saga.unpaid_order"
        wait(lambda: consumers(queue, s.amqp_url) == workers, 60, f"{workers} workers consuming {queue}")
        bus = EventBus(s.amqp_url, exchange=exchange)
        bus.publish(Event("drill.orders.placed", {"order_id": "o0"}))  # no customer
        # (the others are placed once it waits: its deadline is the earliest)
        wait(lambda: store.find_saga("unpaid_order", "o0") is not None, 30, "o0 started")
        bus.publish_many(
            [
                Event("drill.orders.placed", {"order_id": f"o{i}", "customer": {"name": f"c{i}"}})
                for i in range(1, orders)
            ]
        )
        bus.close()
        t0 = time.monotonic()

        def good_final() -> bool:
            listed = [r for r in store.list_sagas(limit=orders + 10) if r.key != "o0"]
            return len(listed) == orders - 1 and all(r.final for r in listed)

        good_final_after: float | None = None
        try:
            wait(good_final, 30, "every good order final")
            good_final_after = round(time.monotonic() - t0, 1)
            wait(lambda: (bad := store.find_saga("unpaid_order", "o0")) is not None and bad.final, 30, "o0 final")
        except WaitTimeout:
            pass
        listed = store.list_sagas(limit=orders + 10)
        bad = store.find_saga("unpaid_order", "o0")
        history = store.saga_history(bad.id) if bad is not None else []
        parked = [h.reason for h in history if h.to_state == "failed"]
        return BadTimeoutRun(
            orders=orders,
            workers=workers,
            states=dict(collections.Counter(r.state for r in listed)),
            good_final_after=good_final_after,
            parked_reason=parked[-1] if parked else "",
        )


# -- a broker that stops answering (a black hole) in front of the first host of a fail-over URL ---------


@dataclass
class BlackHoleRun:
    """Figures of one black-hole fail-over run (:func:`black_hole_failover`)."""

    heartbeat: float
    #: seconds from the start of the partition to the worker logging ``worker.connection_lost``, and to it
    #: consuming on the second host
    detect_seconds: float
    failover_seconds: float
    #: sagas started before the partition and not final when it began (their requests and replies were on
    #: the first host: deadlines re-send them on the second), and sagas started during it (on the second host)
    in_flight_at_partition: int
    started_during: int
    #: sagas that reached a final state during the partition, and sagas that did not end with the outcome
    #: they should have (must be 0)
    moved: int
    lost: int
    #: plain at-least-once events published to the second host during the partition, and how many of them
    #: the worker handled there
    events_during: int
    events_handled: int
    #: requests re-sent by deadlines, the worker's exit code after SIGTERM, and its warnings by event name
    resends: int
    exit_code: int | None
    warnings: dict[str, int]


def _log_has(out: Path, event: str) -> bool:
    log = out.with_suffix(".log")
    return log.exists() and event in log.read_text(errors="replace")


def black_hole_failover(
    node_a: RabbitNode,
    node_b: RabbitNode,
    tmp: Path,
    exchange: str,
    *,
    store: Path | str,
    heartbeat: float = 2.0,
    sagas_before: int = 20,
    sagas_during: int = 40,
    events_during: int = 200,
    settle: float = 90.0,
    patience: float = 30.0,
) -> BlackHoleRun:
    """One worker process (``drill_app:with_sagas``, no simulated failures) with the fail-over URL
    ``hostA;hostB`` (two separate nodes; ``heartbeat`` seconds on both), where hostA is reached through a
    :class:`~blackhole.BlackHoleProxy`. ``sagas_before`` uploads are published to hostA; once they all
    started the proxy goes black (nothing forwarded, nothing closed). Measured: when the worker notices and
    when it consumes on hostB; then ``sagas_during`` uploads and ``events_during`` plain events are published
    to hostB, and every saga must end final with its expected outcome while hostA stays black. A worker that
    does not notice, or does not move, within ``patience`` seconds fails the run (:class:`WaitTimeout`)."""
    out = tmp / f"{exchange}.txt"
    hb = f"heartbeat={heartbeat:g}"
    saga_store = open_store(store if isinstance(store, str) else f"sqlite:///{store}")
    with black_hole(node_a.port) as proxy:
        url = f"{proxy.url(node_a.url)}?{hb};{node_b.url}?{hb}"
        proc = start_worker("drill_app:with_sagas", exchange, out, store, url=url, FAIL_RATE="0", DROP_RATE="0")
        try:
            queues = (f"{exchange}.saga.postprocessing", f"{exchange}.drill.record")
            for queue in queues:

                def on_a(q: str = queue) -> bool:
                    return proc.poll() is None and consumers(q, node_a.url) == 1

                wait(on_a, 60, f"the worker consuming {queue} on A")
            bus_a = EventBus(node_a.url, exchange=exchange)
            bus_a.publish_many([upload(i) for i in range(sagas_before)])
            bus_a.close()
            wait(lambda: len(saga_store.list_sagas(limit=10_000)) >= sagas_before, 60, "the first sagas started")
            in_flight = sum(1 for r in saga_store.list_sagas(limit=10_000) if not r.final)
            proxy.freeze()
            t0 = time.monotonic()
            final_at_freeze = sum(1 for r in saga_store.list_sagas(limit=10_000) if r.final)
            wait(lambda: _log_has(out, "worker.connection_lost"), patience, "the worker to notice the partition")
            detect = time.monotonic() - t0
            wait(lambda: all(consumers(q, node_b.url) == 1 for q in queues), patience, "the worker consuming on B")
            failover = time.monotonic() - t0
            total = sagas_before + sagas_during
            bus_b = EventBus(node_b.url, exchange=exchange)
            bus_b.publish_many(
                [upload(i) for i in range(sagas_before, total)]
                + [Event("drill.events.created", {"n": k}) for k in range(events_during)],
                mandatory=True,
            )
            bus_b.close()

            def settled() -> bool:
                listed = saga_store.list_sagas(limit=10_000)
                handled = set(lines(out, "alo"))
                return len(listed) == total and all(r.final for r in listed) and handled >= set(range(events_during))

            with contextlib.suppress(WaitTimeout):  # what did not settle is counted as lost below
                wait(settled, settle, "every saga final and every event handled", interval=0.2)
            if not proxy.frozen:
                raise AssertionError("the partition ended before the run did")
            listed = saga_store.list_sagas(limit=10_000)
            right = sum(1 for r in listed if r.final and r.data.get("outcome") == expected(int(r.key.split("-")[1])))
            resends = sum(
                1 for r in listed for h in saga_store.saga_history(r.id) if h.reason.startswith("deadline passed")
            )
            handled = set(lines(out, "alo")) & set(range(events_during))
            moved = sum(1 for r in listed if r.final) - final_at_freeze
        finally:
            code: int | None = stop_workers([proc])[0]
            saga_store.close()
    log = out.with_suffix(".log")
    text = log.read_text(errors="replace") if log.exists() else ""
    warnings = dict(collections.Counter(re.findall(r"\[(?:warning|error|critical) *\] (\S+)", text)))
    return BlackHoleRun(
        heartbeat=heartbeat,
        detect_seconds=round(detect, 2),
        failover_seconds=round(failover, 2),
        in_flight_at_partition=in_flight,
        started_during=sagas_during,
        moved=moved,
        lost=total - right,
        events_during=events_during,
        events_handled=len(handled),
        resends=resends,
        exit_code=code,
        warnings=warnings,
    )
