"""Credentials are never logged or printed (docs/security.md, "Credentials").

A worker in this process and the CLI in subprocesses run with broker and PostgreSQL URLs that carry a
password, succeeding and failing (no broker listening, a wrong password on the real broker, no database
there). Everything they write is captured: structlog's output (console and JSON), stdout, stderr, and the
standard library's logging at DEBUG (kombu's and py-amqp's own loggers). The password appears nowhere,
and the URLs that are shown show ``***`` instead. tests/security/test_tls.py repeats the check for a
successful, authenticated connection to a broker whose user has a password of its own.
"""

from __future__ import annotations

import logging
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sagas import App, Event, EventBus, Service, Worker, configure_logging
from tests.conftest import AMQP_URL, require
from tests.security._proc import Cli
from transport import BrokerUnavailable

BROKER_PASSWORD = "s3cr3t-pw"
PG_PASSWORD = "s3cr3t-pg-pw"
DEAD_BROKER = f"amqp://sagas:{BROKER_PASSWORD}@127.0.0.1:1//"
MEMORY_WITH_PASSWORD = f"memory://sagas:{BROKER_PASSWORD}@localhost/"
ROOT = Path(__file__).resolve().parents[2]


def with_password(postgres_url: str, password: str = PG_PASSWORD) -> str:
    """``postgres_url`` with a password (the test server trusts local connections, so any password works)."""
    scheme, rest = postgres_url.split("://", 1)
    user, host = rest.split("@", 1) if "@" in rest else ("postgres", rest)
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


@pytest.fixture
def pg_schema(postgres_url: str, unique: str) -> Iterator[str]:
    """A PostgreSQL store URL with a password and a schema of its own, dropped afterwards."""
    yield f"{with_password(postgres_url)}?schema={unique}"
    import psycopg
    from psycopg import sql

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in output, f"{secret!r} appears in:\n{output}"


@pytest.mark.parametrize("json_logs", [False, True], ids=["console", "json"])
def test_worker_never_logs_passwords(
    pg_schema: str, unique: str, json_logs: bool, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that starts, handles an event and stops, with a broker URL and a PostgreSQL store URL that
    carry passwords, then a worker whose broker is unreachable, log no password anywhere: not in
    structlog's output, not in kombu's or py-amqp's debug logging, not in the errors they raise."""
    caplog.set_level(logging.DEBUG)
    configure_logging(json=json_logs, level="debug")
    try:
        handled: list[str] = []
        svc = Service("creds")
        svc.on("ocis.creds.work", name="work")(lambda e: handled.append(e.id))
        app = App(svc, exchange=unique)
        worker = Worker(app, broker=MEMORY_WITH_PASSWORD, store=pg_schema)
        with worker.running():
            event = Event("ocis.creds.work")
            EventBus(MEMORY_WITH_PASSWORD, exchange=unique).publish(event)
            deadline = time.monotonic() + 10
            while event.id not in handled:
                assert time.monotonic() < deadline, "the event was not handled"
                time.sleep(0.01)
        failing = Worker(app, broker=DEAD_BROKER, store="memory://", grace_period=1.0)
        assert failing.run() == 3
        errors = []
        for broker in (DEAD_BROKER, f"{DEAD_BROKER};amqp://other:{BROKER_PASSWORD}@127.0.0.1:2//"):
            bus = EventBus(broker, exchange=unique, connect_timeout=0.5)
            with pytest.raises(BrokerUnavailable) as info:
                bus.connect()
            errors += [str(info.value), repr(info.value), repr(bus)]
    finally:
        structlog.reset_defaults()
    out, err = capfd.readouterr()
    everything = "\n".join([out, err, caplog.text, *errors])
    assert_no_secret(everything, BROKER_PASSWORD, PG_PASSWORD)
    assert "sagas:***@" in everything  # the URLs were shown, redacted
    assert "worker.started" in everything
    assert "worker.broker_unavailable" in everything


APP = """
from sagas import App, Service
svc = Service("creds")
@svc.on("ocis.creds.work")
def work(event):
    pass
app = App(svc, exchange="{exchange}")
"""


def _sagas(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Cli:
    return Cli(*args, cwd=cwd, env=env)


def _finish(proc: Cli) -> tuple[int, str]:
    return proc.finish()


def _start_up_and_stop(proc: Cli) -> tuple[int, str]:
    """Wait for a `sagas run` to log worker.started, then SIGTERM it; its exit code and all it wrote."""
    proc.wait_for("worker.started")
    return proc.stop()


def test_cli_never_prints_passwords(tmp_path: Path, unique: str, pg_schema: str, postgres_url: str) -> None:
    """`sagas publish`, `health`, `run` (start-up, and a broker that stays away), `ls` and `show`, given
    broker and store URLs with passwords as flags or environment variables, succeeding or failing, print
    no password in any output or log line (debug level, console and JSON)."""
    (tmp_path / "credsapp.py").write_text(textwrap.dedent(APP.format(exchange=unique)))
    dead_pg = f"{with_password(postgres_url)}".replace("@127.0.0.1:5432", "@127.0.0.1:1")
    runs = {
        "publish-unreachable": (
            _sagas("publish", "ocis.creds.work", "{}", "--broker", DEAD_BROKER, "--timeout", "1", cwd=tmp_path),
            2,
        ),
        "publish-memory": (
            _sagas("publish", "ocis.creds.work", "{}", cwd=tmp_path, env={"SAGAS_BROKER_URL": MEMORY_WITH_PASSWORD}),
            2,
        ),
        "health-unreachable": (_sagas("health", "--broker", DEAD_BROKER, "--timeout", "1", cwd=tmp_path), 1),
        "run-unreachable": (
            _sagas(
                "--log-json",
                "run",
                "credsapp:app",
                "--grace-period",
                "1",
                cwd=tmp_path,
                env={"SAGAS_BROKER_URL": DEAD_BROKER, "SAGAS_STORE_URL": "memory://"},
            ),
            3,
        ),
        "ls-unreachable-store": (_sagas("ls", "--store", dead_pg, cwd=tmp_path), 2),
    }
    started = _sagas(
        "run",
        "credsapp:app",
        cwd=tmp_path,
        env={"SAGAS_BROKER_URL": MEMORY_WITH_PASSWORD, "SAGAS_STORE_URL": pg_schema},
    )
    outputs = {name: (_finish(proc), code) for name, (proc, code) in runs.items()}
    outputs["run-start-up"] = (_start_up_and_stop(started), 0)
    # After the start-up, which created the store's tables: two processes creating them at once can clash.
    outputs["show-missing-saga"] = (_finish(_sagas("show", "nosuchsaga", "--store", pg_schema, cwd=tmp_path)), 1)
    for name, ((code, output), expected) in outputs.items():
        assert code == expected, f"{name} exited {code}:\n{output}"
        assert_no_secret(output, BROKER_PASSWORD, PG_PASSWORD)
    assert "sagas:***@127.0.0.1:1//" in outputs["publish-unreachable"][0][1]
    assert "unreachable: amqp://sagas:***@127.0.0.1:1//" in outputs["health-unreachable"][0][1]
    assert "postgres:***@" in outputs["show-missing-saga"][0][1]
    assert "worker.started" in outputs["run-start-up"][0][1]


@pytest.mark.rabbitmq
def test_a_wrong_password_on_the_real_broker_is_not_printed(tmp_path: Path, unique: str, pg_schema: str) -> None:
    """With the real broker: a wrong password is refused at once, not retried as if the broker were
    down. `sagas health`, `publish` and `dead ls` say so (the user, what to check, exit 2), `sagas run`
    exits 5 (its own code: 4 is stranded sagas) long before its grace period, all without a traceback
    and without the password; `sagas run` with the right password and a PostgreSQL store with a
    password starts up and stops without printing
    either. (A refused login used to escape as a traceback, then was retried for the grace period.)"""
    require(AMQP_URL, "RabbitMQ")
    wrong = AMQP_URL.replace(":guest@", f":{BROKER_PASSWORD}@")
    assert wrong != AMQP_URL
    (tmp_path / "credsapp.py").write_text(textwrap.dedent(APP.format(exchange=unique)))
    started = time.monotonic()
    procs = {
        "health": (_sagas("health", "--broker", wrong, "--timeout", "2", cwd=tmp_path), 2),
        "publish": (_sagas("publish", "ocis.creds.work", "{}", "--broker", wrong, "--timeout", "1", cwd=tmp_path), 2),
        "dead-ls": (_sagas("dead", "ls", "--broker", wrong, cwd=tmp_path), 2),
        "run": (
            _sagas(
                "run",
                "credsapp:app",
                "--grace-period",
                "60",
                cwd=tmp_path,
                env={"SAGAS_BROKER_URL": wrong, "SAGAS_STORE_URL": "memory://"},
            ),
            5,
        ),
    }
    for name, (proc, expected) in procs.items():
        code, output = _finish(proc)
        assert code == expected, f"{name} exited {code}:\n{output}"
        assert "refused the login for user 'guest': check the user and password" in output, output
        assert_no_secret(output, BROKER_PASSWORD, "Traceback")
    assert time.monotonic() - started < 30, "a refused login was retried"
    svc = Service("creds")
    svc.on("ocis.creds.work", name="work")(lambda e: None)
    assert Worker(App(svc, exchange=unique), broker=wrong, store="memory://", grace_period=60.0).run() == 5
    assert time.monotonic() - started < 40, "a refused login was retried"
    proc = _sagas("run", "credsapp:app", cwd=tmp_path, env={"SAGAS_BROKER_URL": AMQP_URL, "SAGAS_STORE_URL": pg_schema})
    try:
        code, output = _start_up_and_stop(proc)
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
        bus = EventBus(AMQP_URL, exchange=unique)
        queue = f"{unique}.creds.work"
        bus.declared_queues |= {queue, *(f"{queue}.delay.{ms}" for ms in (1000, 2000, 4000, 8000))}
        bus.delete_topology()
        bus.close()
    assert code == 0, output
    assert_no_secret(output, PG_PASSWORD, ":guest@")
    assert "guest:***@" in output
