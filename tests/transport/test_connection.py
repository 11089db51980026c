"""The fail-over connection under `EventBus` (``transport._connection``) and the seams the bus shows of it."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.conftest import AMQP_URL, require
from transport import ConnectionLost, Event, EventBus, InvalidBrokerURL, LoginRefused, redact_url


def test_redact_url_hides_the_password_of_every_host() -> None:
    """Each host of a ``;``-separated URL loses its password, and nothing else."""
    url = "amqp://app:s3cret@rabbit-1:5672/v;amqps://app:0ther@rabbit-2/v;memory://"
    assert redact_url(url) == "amqp://app:***@rabbit-1:5672/v;amqps://app:***@rabbit-2/v;memory://"


def test_connection_is_none_until_connected_and_after_close() -> None:
    """``EventBus.connection`` is the kombu connection only while the bus is connected."""
    bus = EventBus("memory://", exchange="t-conn-seam")
    assert bus.connection is None
    bus.connect()
    assert bus.connection is not None
    assert bus.connected
    bus.close()
    assert bus.connection is None
    assert not bus.connected


def test_lost_closes_and_the_next_publish_connects_again() -> None:
    """``lost`` forgets the connection and its channels; the next publish opens a new one."""
    bus = EventBus("memory://", exchange="t-conn-lost")
    try:
        bus.connect()
        first = bus.connection
        error = bus.lost(ConnectionResetError("gone"))
        assert isinstance(error, ConnectionLost)
        assert "gone" in str(error)
        assert not bus.connected
        bus.publish(Event("ocis.conn.checked"))
        assert bus.connected
        assert bus.connection is not first
    finally:
        bus.close()


def test_drain_without_a_connection_raises_connection_lost() -> None:
    """Draining a bus that is not connected says so instead of waiting."""
    with pytest.raises(ConnectionLost):
        EventBus("memory://", exchange="t-conn-drain").drain(0.01)


def test_channel_is_a_new_channel_the_caller_closes() -> None:
    """``EventBus.channel`` connects if needed and hands out a channel apart from the publishing one."""
    bus = EventBus("memory://", exchange="t-conn-channel")
    try:
        ch = bus.channel()
        assert bus.connected
        other = bus.channel()
        assert ch is not other
        ch.close()
        other.close()
    finally:
        bus.close()


@pytest.mark.rabbitmq
def test_an_unreachable_broker_is_skipped_for_the_next_one(amqp_url: str, unique: str) -> None:
    """With several brokers in the URL, a refused connect moves on to the next broker at once."""
    bus = EventBus(f"amqp://guest:guest@127.0.0.1:1//;{amqp_url}", exchange=unique, connect_timeout=5.0)
    try:
        bus.connect()
        assert bus.health()
        assert bus.connection is not None
        assert bus.connection.port != 1
    finally:
        bus.delete_topology()
        bus.close()


@pytest.mark.rabbitmq
def test_a_connection_error_while_subscribing_is_a_lost_connection(
    amqp_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that closes the connection while a consumer declares its queues (RabbitMQ answers
    INTERNAL_ERROR while a cluster node goes down) raises ConnectionLost, which a worker retries, not
    the raw py-amqp error, which stopped it."""
    from amqp.exceptions import InternalError

    from transport import Subscription
    from transport._topology import declare as real_declare

    def declare(channel: object, exchange: str, subscription: object = None, *, dead: bool = True) -> list[str]:
        if subscription is not None:
            raise InternalError("INTERNAL_ERROR", method_sig=(40, 10))
        return real_declare(channel, exchange, None, dead=dead)

    monkeypatch.setattr("transport._bus.declare", declare)
    bus = EventBus(amqp_url, exchange=unique)
    try:
        bus.connect()
        with pytest.raises(ConnectionLost, match="INTERNAL_ERROR"):
            bus.consume([Subscription(queue=f"{unique}.q", patterns=("ocis.#",))], lambda inbound: None)
        assert not bus.connected
    finally:
        monkeypatch.undo()
        bus.delete_topology()
        bus.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://u:pw@h:5672//?heartbeat=abc", "heartbeat must be a number of seconds >= 0"),
        ("amqp://u:pw@h:5672//?connect_timeout=0", "connect_timeout must be a number of seconds > 0"),
        ("amqp://u:pw@h:5672//?login_method=NOPE", "login_method must be one of"),
        ("amqp://u:pw@h:5672//?ssl=1", "unknown option 'ssl'"),
        ("amqp://u:pw@h:99999//", "port that is not a number"),
        ("amqp://u:pw@h:5672//;amqp://u:pw@h:x//", "port that is not a number"),
        ("ampq://u:pw@h//", "unsupported broker URL"),
    ],
)
def test_a_malformed_broker_url_is_refused_when_the_bus_is_made(url: str, message: str) -> None:
    """EventBus(url) raises InvalidBrokerURL (a TransportError and ValueError) naming what is valid,
    without the password, before connecting."""
    with pytest.raises(InvalidBrokerURL, match=message) as info:
        EventBus(url)
    assert ":pw@" not in str(info.value)


def test_good_query_options_are_accepted() -> None:
    """heartbeat, connect_timeout and login_method with valid values make a bus."""
    EventBus("amqp://u:pw@h:5672//?heartbeat=0&connect_timeout=2.5&login_method=PLAIN").close()


@pytest.mark.rabbitmq
def test_a_refused_login_raises_at_once() -> None:
    """A wrong password raises LoginRefused at once, naming the user, instead of BrokerUnavailable after
    the connect timeout; health() raises it too."""
    require(AMQP_URL, "RabbitMQ")
    wrong = AMQP_URL.replace(":guest@", ":wrong-pw@")
    bus = EventBus(wrong, connect_timeout=30.0)
    started = time.monotonic()
    with pytest.raises(LoginRefused, match="refused the login for user 'guest'") as info:
        bus.connect()
    assert time.monotonic() - started < 10
    assert "wrong-pw" not in str(info.value)
    with pytest.raises(LoginRefused):
        bus.health(timeout=5.0)
    bus.close()


def _break(conn: Any) -> None:
    """Shut our own end of ``conn``'s socket (the py-amqp connection under kombu's), as a reset by the
    broker leaves it: the next write or read on it fails."""
    sock: socket.socket = conn.connection.transport.sock
    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.rabbitmq
def test_dead_letters_read_again_after_the_idle_connection_broke(amqp_url: str, unique: str) -> None:
    """A bus used only to read and act on dead letters (a console, a CLI) sends no heartbeats between
    calls, so the broker may close its idle connection. The next call finds the socket broken, connects
    again and answers, instead of failing on the dead socket for ever; so do replay and drop."""
    require(AMQP_URL, "RabbitMQ")
    bus = EventBus(amqp_url, exchange=f"t-dl-idle-{unique}")
    try:
        assert bus.dead_letters() == []
        first = bus.connection
        assert first is not None
        _break(first)
        assert bus.dead_letters() == []
        assert bus.connection is not first
        for act in (bus.replay_dead, bus.drop_dead):
            again = bus.connection
            assert again is not None
            _break(again)
            assert act(None) == []
            assert bus.connection is not again
    finally:
        bus.delete_topology()  # (its dead-letter queue and exchange, on the machine's RabbitMQ)
        bus.close()
