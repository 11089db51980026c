"""A TCP proxy that can stop forwarding without closing anything: a "black hole" between a client and a broker.

It stands for a network partition or a paused broker host: while :meth:`BlackHoleProxy.freeze` is in force,
the proxy reads nothing from either side and sends nothing to either side, and it closes no socket. The client
sees a peer that is there and silent: no close, no reset, no heartbeat. New connections are accepted and
stay silent too (the TCP connect succeeds, the AMQP handshake gets no answer). :meth:`thaw` ends the
partition: what each side sent meanwhile is forwarded then, in order, as TCP would after a partition heals.

Standard library only: the tests (``tests/faults/test_hung_broker.py``, ``tests/transport``) and the drill
(``scripts/drills.py black-hole``) share it. It only listens on, and connects to, 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit


class BlackHoleProxy:
    """Forwards 127.0.0.1:``port`` (a free port) to 127.0.0.1:``target_port`` until :meth:`freeze`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()  # set: forwarding; clear: black hole
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        #: connections accepted so far
        self.accepted = 0

    def url(self, url: str) -> str:
        """``url`` (an ``amqp://`` URL of the target) pointed at the proxy instead."""
        u = urlsplit(url)
        netloc = u.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(u._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    def freeze(self) -> None:
        """Stop forwarding in both directions, on every connection, without closing any."""
        self._open.clear()

    def thaw(self) -> None:
        """Forward again; what was held back goes first."""
        self._open.set()

    def start(self) -> BlackHoleProxy:
        self._spawn(self._accept, "blackhole-accept")
        return self

    def close(self) -> None:
        """Stop: close the listener and every connection (both sides), and join the threads."""
        self._closed.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> BlackHoleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.accepted += 1
            self._spawn(self._pump, "blackhole-up", client, upstream)
            self._spawn(self._pump, "blackhole-down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` to ``dst``; while frozen, read nothing and hold what was read already."""
        while not self._closed.is_set():
            self._wait_open()
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                self._wait_open()  # a freeze that began meanwhile: read nothing more
                data = src.recv(65536)
                if not data:
                    break
                self._wait_open()  # read just before a freeze: held until it ends
                dst.sendall(data)
            except (OSError, ValueError):
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _wait_open(self) -> None:
        while not self._open.wait(0.1):
            if self._closed.is_set():
                return


@contextlib.contextmanager
def black_hole(target_port: int) -> Iterator[BlackHoleProxy]:
    """A running :class:`BlackHoleProxy` to 127.0.0.1:``target_port`` for the length of the block."""
    proxy = BlackHoleProxy(target_port).start()
    try:
        yield proxy
    finally:
        proxy.close()
