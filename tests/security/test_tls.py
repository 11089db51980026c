"""TLS for real, against the security tests' own RabbitMQ node (tests/security/_node.py: a TLS listener
on 127.0.0.1:5691 with a certificate from a throw-away CA, client certificates verified when sent).

It checks that:

* a worker, ``sagas publish``, ``sagas health`` and ``sagas run`` over ``amqps://`` with the CA (flags
  or environment variables) verify the broker and work, and never print the password;
* a client without the CA, with another host name, or with plain AMQP on the TLS port fails with a
  clear error; a client certificate from another CA is refused by the broker;
* a ``;``-separated URL fails over to the next host with that host's name verified.

The node is always stopped and its directory removed. It needs ``rabbitmq-server`` and ``openssl``:
without them these tests fail in CI (``CI`` set) and skip elsewhere. The module takes about 15 s, most
of it the node's start.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sagas import App, Event, EventBus, Service, Worker, configure_logging
from sagas._cli import tls_options
from tests.security._node import AMQPS_PORT, PASSWORD, PLAIN_URL, URL, USER, TlsBroker
from tests.security._proc import Cli
from transport import BrokerUnavailable

pytestmark = pytest.mark.tls


def app_for(exchange: str, handled: list[str]) -> App:
    svc = Service("secure")
    svc.on("ocis.secure.work", name="work")(lambda e: handled.append(e.id))
    return App(svc, exchange=exchange)


@contextlib.contextmanager
def cleanup(exchange: str, tls_broker: TlsBroker) -> Iterator[EventBus]:
    """A bus on the TLS node (plain AMQP) that deletes the exchange's queues afterwards."""
    bus = EventBus(PLAIN_URL, exchange=exchange)
    try:
        yield bus
    finally:
        queue = f"{exchange}.secure.work"
        bus.declared_queues |= {queue, *(f"{queue}.delay.{ms}" for ms in (1000, 2000, 4000, 8000))}
        bus.delete_topology()
        bus.close()


def sagas_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Cli:
    return Cli(*args, cwd=cwd, env=env)


def finish(proc: Cli) -> tuple[int, str]:
    code, output = proc.finish()
    assert PASSWORD not in output, output
    return code, output


def wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- tests ----------------------------------------------------------------------------------------------


def test_worker_and_publish_over_amqps_verify_the_broker_and_work(
    tls_broker: TlsBroker, unique: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A Worker(ssl=...) and an EventBus(ssl=...) with the CA connect over amqps://, verify the broker's
    certificate and host name, and deliver an event; nothing they log shows the password."""
    caplog.set_level(logging.DEBUG)
    configure_logging(level="debug")
    handled: list[str] = []
    try:
        with cleanup(unique, tls_broker):
            worker = Worker(app_for(unique, handled), broker=URL, store="memory://", ssl=tls_broker.ssl())
            publisher = EventBus(URL, exchange=unique, ssl=tls_broker.ssl())
            with worker.running():
                event = Event("ocis.secure.work")
                publisher.publish(event)
                wait_for(lambda: event.id in handled, "the event sent over TLS")
                conn = publisher.connection
                assert conn is not None
                sock = conn.connection.sock
                assert isinstance(sock, ssl.SSLSocket)
                cert = sock.getpeercert()
                assert cert is not None
                assert cert["subject"] == ((("commonName", "localhost"),),)
            publisher.close()
    finally:
        structlog.reset_defaults()
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err + caplog.text
    assert f"{USER}:***@localhost:{AMQPS_PORT}" in out + err


def test_cli_over_amqps_with_the_ca_from_flags_or_environment(
    tls_broker: TlsBroker, unique: str, tmp_path: Path
) -> None:
    """`sagas run`, `publish` and `health` take --ssl-ca/--ssl-cert/--ssl-key or SAGAS_SSL_CA/_CERT/_KEY:
    the worker started by `sagas run` handles an event published by `sagas publish` over TLS, with and
    without a client certificate; no output shows the password."""
    (tmp_path / "secureapp.py").write_text(
        textwrap.dedent(f"""
        from sagas import App, Service
        svc = Service("secure")
        @svc.on("ocis.secure.work")
        def work(event):
            print("handled", event.payload["n"], flush=True)
        app = App(svc, exchange="{unique}")
        """)
    )
    env = {"SAGAS_BROKER_URL": URL, "SAGAS_SSL_CA": tls_broker.ca, "SAGAS_STORE_URL": "memory://"}
    with cleanup(unique, tls_broker):
        worker = sagas_cli("run", "secureapp:app", cwd=tmp_path, env=env)
        try:
            worker.wait_for("worker.started")
            code, output = finish(sagas_cli("health", "--broker", URL, "--ssl-ca", tls_broker.ca, cwd=tmp_path))
            assert code == 0, output
            assert f"ok: amqps://{USER}:***@localhost:{AMQPS_PORT}//" in output
            published = [
                sagas_cli("publish", "ocis.secure.work", '{"n": 1}', "--exchange", unique, cwd=tmp_path, env=env),
                sagas_cli(
                    "publish",
                    "ocis.secure.work",
                    '{"n": 2}',
                    "--exchange",
                    unique,
                    "--broker",
                    URL,
                    "--ssl-ca",
                    tls_broker.ca,
                    "--ssl-cert",
                    tls_broker.cert,
                    "--ssl-key",
                    tls_broker.key,
                    cwd=tmp_path,
                ),
            ]
            for proc in published:
                code, output = finish(proc)
                assert code == 0, output
            worker.wait_for("handled 1")
            worker.wait_for("handled 2")
        finally:
            code, output = worker.stop()
            assert PASSWORD not in output, output
    assert code == 0, output
    assert "worker.started" in output


def test_a_client_without_the_ca_fails_with_a_clear_error(tls_broker: TlsBroker, unique: str, tmp_path: Path) -> None:
    """Without the CA (system CAs only), the broker's certificate does not verify: the bus raises
    BrokerUnavailable naming the verification failure, `sagas publish` prints it and exits 2,
    `sagas health` exits 1, and a worker exits 3 after its grace period."""
    publish = sagas_cli("publish", "ocis.secure.work", "--broker", URL, "--timeout", "1", cwd=tmp_path)
    health = sagas_cli("health", "--broker", URL, "--timeout", "1", cwd=tmp_path)
    bus = EventBus(URL, exchange=unique, connect_timeout=1.0)
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED") as info:
        bus.connect()
    assert f"cannot reach the broker at amqps://{USER}:***@localhost:{AMQPS_PORT}//" in str(info.value)
    code, output = finish(publish)
    assert code == 2, output
    assert "certificate verify failed" in output
    assert "Traceback" not in output
    code, output = finish(health)
    assert code == 1, output
    worker = Worker(app_for(unique, []), broker=URL, store="memory://", grace_period=1.0)
    assert worker.run() == 3


def test_the_host_name_is_verified_and_checked_per_host_on_fail_over(tls_broker: TlsBroker, unique: str) -> None:
    """A certificate that does not name the host is refused; with a ';'-separated URL each host is checked
    against its own name (kombu filled the first host's name into the shared options, so the second host
    failed verification)."""
    wrong_name = EventBus(
        URL, exchange=unique, connect_timeout=1.0, ssl=tls_broker.ssl(server_hostname="rabbit.example.com")
    )
    with pytest.raises(BrokerUnavailable, match="Hostname mismatch"):
        wrong_name.connect()
    options = tls_broker.ssl()
    fail_over = f"amqps://{USER}:{PASSWORD}@127.0.0.2:{AMQPS_PORT}//;{URL}"  # nothing listens on 127.0.0.2
    bus = EventBus(fail_over, exchange=unique, connect_timeout=5.0, ssl=options)
    try:
        bus.connect()
        assert bus.connected
    finally:
        bus.close()
    assert options["server_hostname"] is None  # the caller's options are left as they were


def test_client_certificates_are_verified_by_the_broker(tls_broker: TlsBroker, unique: str) -> None:
    """A client certificate signed by the broker's CA is accepted; one from another CA is refused in the
    handshake; plain AMQP on the TLS port gets nowhere."""
    good = EventBus(URL, exchange=unique, ssl=tls_broker.ssl(certfile=tls_broker.cert, keyfile=tls_broker.key))
    try:
        good.connect()
        assert good.connected
    finally:
        good.close()
    rogue = EventBus(
        URL,
        exchange=unique,
        connect_timeout=1.0,
        ssl=tls_broker.ssl(certfile=tls_broker.rogue_cert, keyfile=tls_broker.rogue_key),
    )
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        rogue.connect()
    plain = EventBus(f"amqp://{USER}:{PASSWORD}@localhost:{AMQPS_PORT}//", exchange=unique, connect_timeout=1.0)
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        plain.connect()


def test_tls_options_of_the_cli() -> None:
    """tls_options: nothing for plain amqp:// without files; verification of the CA chain and the URL's host
    for amqps:// or any file; a key needs a certificate; memory:// takes no TLS options."""
    import click

    assert tls_options("amqp://h//") is None
    assert tls_options("amqps://h//") == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    assert tls_options("amqp://a//;amqps://b//", "ca.pem") == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
        "ca_certs": "ca.pem",
    }
    assert tls_options("amqp://h//", None, "c.pem", "k.pem") == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
        "certfile": "c.pem",
        "keyfile": "k.pem",
    }
    with pytest.raises(click.BadParameter, match="needs --ssl-cert"):
        tls_options("amqps://h//", None, None, "k.pem")
    with pytest.raises(click.BadParameter, match="not memory://"):
        tls_options("memory://", "ca.pem")
