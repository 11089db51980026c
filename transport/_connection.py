"""The fail-over connection to the broker: which host to try, connecting with backoff, health and closing.

A URL may list several brokers separated by ``;``. :class:`FailoverConnection` holds at most one kombu
connection at a time, to the first of them that answers, and moves on to the next one when a connect
fails or a live connection breaks. It opens no channels itself: whoever owns it says what to set up on
each new connection and what to forget when it closes.

Nothing waits on the broker for ever, also when it stops answering without closing the connection (a
network partition, a paused host): a close waits for the broker's close-ok ``close_timeout`` seconds at most
and then drops the socket (:func:`close_within`); a connection found broken is dropped without a close
handshake (:func:`drop`); a blocked write fails after ``write_timeout`` (``SO_SNDTIMEO``); and the waits of
the consumer and the publisher check the heartbeats every :meth:`FailoverConnection.tick` seconds (py-amqp
raises once 2 heartbeat intervals passed with nothing received), so a silent broker is noticed within 2
heartbeat intervals, wherever the caller waits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from kombu.connection import Connection

from ._errors import BrokerUnavailable, InvalidBrokerURL, LoginRefused, TransportError
from ._frames import frame_handler

log = structlog.get_logger("transport")


class ConnectionLost(TransportError):
    """The connection to the broker broke; reconnect and consume again."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (each host of a ``;``-separated list)."""
    parts = []
    for one in url.split(";"):
        try:
            u = urlsplit(one)
            if u.password is not None:
                host = u.hostname or ""
                if u.port:
                    host = f"{host}:{u.port}"
                one = urlunsplit(u._replace(netloc=f"{u.username or ''}:***@{host}"))
        except ValueError:
            one = "<unparseable url>"
        parts.append(one)
    return ";".join(parts)


#: the URL schemes a bus connects with: RabbitMQ (plain or TLS), or the in-process memory broker
_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "memory"})


#: the query options a broker URL may carry, with what each must be (kombu passes them to its Connection,
#: where an unknown one or a bad value is a TypeError or ValueError deep in the first connect)
_QUERY_OPTIONS = {
    "heartbeat": "a number of seconds >= 0",
    "connect_timeout": "a number of seconds > 0",
    "login_method": "one of AMQPLAIN, PLAIN, EXTERNAL",
}


def check_broker_url(url: str) -> None:
    """Raise :class:`InvalidBrokerURL` unless every host of ``url`` (``;``-separated) is a broker URL this
    bus connects with: its scheme, its port and its query options (see ``_QUERY_OPTIONS``)."""
    hosts = [h for h in url.split(";") if h] or [url]
    for host in hosts:
        scheme = host.split("://", 1)[0] if "://" in host else ""
        if scheme not in _SCHEMES or (scheme == "memory" and len(hosts) > 1):
            raise InvalidBrokerURL(
                f"unsupported broker URL {redact_url(host)!r}: use amqp://user:pass@host:5672/vhost "
                "(amqps:// for TLS; several separated by ';') or memory://"
            )
        if scheme == "memory":
            continue
        try:
            parts = urlsplit(host)
            port = parts.port
        except ValueError:
            raise InvalidBrokerURL(
                f"broker URL {redact_url(host)!r} has a port that is not a number from 1 to 65535"
            ) from None
        if port == 0:
            raise InvalidBrokerURL(f"broker URL {redact_url(host)!r} has port 0; use 1 to 65535 (5672 for AMQP)")
        for item in parts.query.split("&") if parts.query else ():
            name, _, value = item.partition("=")
            if name not in _QUERY_OPTIONS:
                valid = ", ".join(f"{k} ({v})" for k, v in _QUERY_OPTIONS.items())
                raise InvalidBrokerURL(
                    f"broker URL {redact_url(host)!r} has an unknown option {name!r}; valid options: {valid}"
                )
            if not _valid_option(name, value):
                raise InvalidBrokerURL(
                    f"broker URL {redact_url(host)!r}: {name}={value!r} is not valid; {name} must be "
                    f"{_QUERY_OPTIONS[name]}"
                )


def _valid_option(name: str, value: str) -> bool:
    if name == "login_method":
        return value in ("AMQPLAIN", "PLAIN", "EXTERNAL")
    try:
        number = float(value)
    except ValueError:
        return False
    return number == number and number < float("inf") and (number >= 0 if name == "heartbeat" else number > 0)


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names the in-process memory transport."""
    return url.startswith("memory://")


class FailoverConnection:
    """One kombu connection at a time, to the first broker of a ``;``-separated URL that answers.

    ``on_connect`` runs on every new connection before it counts as established; an error in it that
    is a connection error (or a refused login) fails over exactly like a refused connect. ``on_close``
    runs whenever the connection is closed or lost, so the channels opened on it are forgotten with it.

    :attr:`lock` serialises connecting, closing and every use of a channel shared between threads.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat: float,
        connect_timeout: float,
        ssl: bool | Mapping[str, Any] | None,
        memory_transport: type[Any],
        on_connect: Callable[[Connection], None],
        on_close: Callable[[], None],
        close_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.memory = is_memory_url(url)
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.ssl = ssl
        #: seconds a close waits for the broker's close-ok before it drops the socket
        self.close_timeout = close_timeout
        #: the kombu transport class behind ``memory://``
        self.memory_transport = memory_transport
        self.lock = threading.RLock()
        #: the brokers of a ``;``-separated URL, tried in turn; ``_next_host`` goes first
        self._hosts = [h for h in url.split(";") if h] or [url]
        check_broker_url(url)
        self._next_host = 0
        self._conn: Connection | None = None
        self._on_connect = on_connect
        self._on_close = on_close

    @property
    def current(self) -> Connection | None:
        """The established kombu connection, or None."""
        return self._conn

    def _new(self, connect_timeout: float | None = None) -> Connection:
        if self.memory:
            return Connection("memory://", transport=self.memory_transport)
        host = self._hosts[self._next_host % len(self._hosts)]
        return Connection(
            host,
            heartbeat=self.heartbeat,
            connect_timeout=self.connect_timeout if connect_timeout is None else connect_timeout,
            # A copy per connection: kombu fills a None server_hostname in with the host it connects to,
            # in place, which pinned the first host's name for every other host of a ';'-separated URL.
            ssl=dict(self.ssl) if isinstance(self.ssl, Mapping) else self.ssl,
            transport_options={
                "confirm_publish": False,
                "frame_handler": frame_handler,
                # A write the broker does not take (its socket buffer full: a partition, a paused host)
                # fails instead of blocking for ever.
                "write_timeout": self.write_timeout,
            },
        )

    @property
    def write_timeout(self) -> float:
        """Seconds a blocked write to the broker waits: 2 heartbeat intervals, at least ``connect_timeout``
        (10 s without heartbeats)."""
        return max(self.connect_timeout, 2 * self.heartbeat if self.heartbeat else 10.0)

    def tick(self) -> float:
        """The longest slice a wait on the broker may take between two heartbeat checks: a quarter of
        the negotiated heartbeat interval (of the URL's ``heartbeat`` if it names one), at most 1 s."""
        conn = self._conn
        interval = 0.0
        if conn is not None and not self.memory:
            with contextlib.suppress(Exception):  # no transport connection yet: no heartbeat either
                interval = float(conn.get_heartbeat_interval() or 0)
        return min(1.0, interval / 4) if interval > 0 else 1.0

    def connect(self, timeout: float | None = None) -> None:
        """Connect, retrying with backoff for up to ``timeout`` seconds; raise :class:`BrokerUnavailable`."""
        with self.lock:
            if self._conn is not None:
                return
            deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
            delay = 0.1
            while True:
                conn = self._new()
                try:
                    # One attempt per loop turn: kombu's own connect() would wait 2 s and retry.
                    conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
                    self._on_connect(conn)
                except Exception as exc:
                    self._discard(conn)
                    if login_refused(exc):
                        raise refused_login(conn, exc) from None
                    if not is_connection_error(conn, exc):
                        raise
                    # Fail over: the next broker of the URL is tried at once; after a whole round, wait.
                    self._next_host += 1
                    if self._next_host % len(self._hosts) and time.monotonic() < deadline:
                        log.warning("bus.broker_unreachable", broker=redact_url(conn.as_uri()), error=str(exc))
                        continue
                    if time.monotonic() + delay > deadline:
                        raise BrokerUnavailable(f"cannot reach the broker at {redact_url(self.url)}: {exc}") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self._conn = conn
                return

    def _discard(self, conn: Connection) -> None:
        """Throw away ``conn``, which may have half connected: no close handshake to wait for on RabbitMQ."""
        if self.memory:
            close_quietly(conn)
        else:
            drop(conn)

    def live(self) -> Connection:
        """The established connection, connecting first if needed."""
        self.connect()
        if self._conn is None:
            raise ConnectionLost(f"not connected to {redact_url(self.url)}")
        return self._conn

    def close(self) -> None:
        """Close the connection. Unacked messages go back to their queues (broker side). Waits for the
        broker's close-ok ``close_timeout`` seconds at most, then drops the socket."""
        self._let_go(lambda conn: close_within(conn, self.close_timeout))

    def drop(self) -> None:
        """Throw the connection away without a close handshake (it broke, or its broker stopped
        answering): the socket is closed at once, and the broker requeues what was unacked on it."""
        self._let_go(drop)

    def _let_go(self, end: Callable[[Connection], None]) -> None:
        """Forget the connection and end it with ``end`` (a memory:// one is closed quietly)."""
        with self.lock:
            conn, self._conn = self._conn, None
            self._on_close()
            if conn is not None:
                if self.memory:
                    close_quietly(conn)
                else:
                    end(conn)

    def lost(self, exc: BaseException) -> ConnectionLost:
        """Drop the connection after it broke with ``exc``, and return the :class:`ConnectionLost` to
        raise. The next connect tries the next broker first, in case this one is going down (or silent)."""
        where = self._conn.as_uri() if self._conn is not None and not self.memory else self.url
        self.drop()
        self._next_host += 1
        log.warning("bus.connection_dropped", broker=redact_url(where), error=str(exc) or type(exc).__name__)
        return ConnectionLost(f"connection to {redact_url(where)} lost: {exc or type(exc).__name__}")

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """The exception types that mean the connection (or a channel on it) broke."""
        conn = self._conn or self._new()
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    def health(self, timeout: float = 5.0) -> bool:
        """Whether the broker answers within ``timeout`` seconds (opens a channel; declares nothing).
        Raises :class:`LoginRefused` if it answers but refuses the user or password."""
        if self.memory:
            return True
        conn = self._new(connect_timeout=timeout)
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            sock = _socket_of(conn)
            if sock is not None:
                sock.settimeout(timeout)  # a broker that accepted the connection and then went silent
            conn.channel().close()
        except Exception as exc:
            if login_refused(exc):
                raise refused_login(conn, exc) from None
            if not is_connection_error(conn, exc):
                raise
            return False
        finally:
            drop(conn)
        return True


def is_connection_error(conn: Connection, exc: BaseException) -> bool:
    """Whether ``exc`` means that ``conn`` broke (rather than, say, a refused declaration)."""
    try:
        errors = tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
    except Exception:  # noqa: BLE001 - a broken transport cannot tell; treat the error as a connection error
        return True
    return isinstance(exc, (*errors, OSError, ConnectionError))


def queue_node_down(exc: BaseException) -> bool:
    """Whether a declare failed because the queue's home node (in a cluster) is down."""
    text = str(exc)
    return getattr(exc, "reply_code", None) == 404 and ("home node" in text or "down or inaccessible" in text)


def login_refused(exc: BaseException) -> bool:
    """Whether the broker closed the connection in the handshake with 403: a wrong user or password.
    py-amqp raises that as a channel error; it becomes :class:`LoginRefused`, which is raised at once
    (retrying cannot help) and never shows the password."""
    return getattr(exc, "reply_code", None) == 403 and getattr(exc, "method_sig", None) == (0, 0)


def refused_login(conn: Connection, exc: BaseException) -> LoginRefused:
    """The :class:`LoginRefused` for a login that ``conn``'s broker refused with ``exc``."""
    where = redact_url(conn.as_uri(include_password=True))
    return LoginRefused(
        f"the broker at {where} refused the login for user {conn.userid!r}: check the user and password "
        f"(SAGAS_BROKER_URL or --broker); the broker said: {getattr(exc, 'reply_text', '') or exc}"
    )


def close_quietly(conn: Connection) -> None:
    """Release ``conn``, which is being thrown away; a failure is only logged."""
    try:
        conn.release()
    except Exception as exc:  # noqa: BLE001 - the connection is being thrown away; the reason is logged
        log.debug("bus.close_failed", error=repr(exc))


def _socket_of(conn: Connection) -> socket.socket | None:
    """The TCP socket under a kombu pyamqp connection, or None."""
    # (``conn.connection`` would connect; ``_connection`` is the py-amqp connection as it is, or None)
    transport = getattr(getattr(conn, "_connection", None), "transport", None)
    sock = getattr(transport, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def close_within(conn: Connection, timeout: float) -> None:
    """Close ``conn`` with the AMQP handshake, waiting for the broker's close-ok ``timeout`` seconds at
    most; a broker that does not answer by then has its socket dropped (:func:`drop`).

    py-amqp waits for the close-ok with no timeout of its own, on the socket's timeout: so the socket is
    given one first. A timeout there makes py-amqp collect the connection (close the socket) and kombu
    swallow the error; :func:`drop` then clears whatever is left."""
    try:
        sock = _socket_of(conn)
        if sock is not None:
            sock.settimeout(timeout)
        conn.release()
    except Exception as exc:  # noqa: BLE001 - the connection is being thrown away; the reason is logged
        log.debug("bus.close_failed", error=repr(exc))
    drop(conn)


def drop(conn: Connection) -> None:
    """Throw ``conn`` away without a close handshake: close its socket and forget its channels
    (``Connection.collect``: nothing is sent, nothing is waited for)."""
    try:
        conn.collect()
    except Exception as exc:  # noqa: BLE001 - the connection is being thrown away; the reason is logged
        log.debug("bus.drop_failed", error=repr(exc))


def close_channel_quietly(ch: Any) -> None:
    """Close ``ch``; closing requeues its unacked messages, and a failure means the connection is gone."""
    try:
        ch.close()
    except Exception as exc:  # noqa: BLE001 - closing requeues; a failure means the connection is gone
        log.debug("bus.channel_close_failed", error=repr(exc))
