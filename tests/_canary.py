"""The canary: proof that a test run leaves the machine's RabbitMQ and PostgreSQL alone.

When the session starts, ``tests/conftest.py`` opens one AMQP connection to the machine's RabbitMQ
(``SAGAS_TEST_AMQP_URL``) and one session on its PostgreSQL (``SAGAS_TEST_POSTGRES_URL``). When it ends,
both must still be the same, usable connections: the broker never closed the AMQP connection (a
``close_all_connections``, ``close_connection`` or a restart would have) and it still opens a channel and
takes a heartbeat; the PostgreSQL session still answers ``SELECT 1`` with the same backend pid, and the
server's start time is unchanged (a restart or ``pg_terminate_backend`` would break that). If not, the run
fails (its exit status is made non-zero) with a message that says which one was disturbed.

Outside CI a service that does not answer when the session starts is left out, with a note; in CI
(``CI`` set) that fails the run too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

#: how the canary's connections show up on the servers (connection_name, application_name)
CONNECTION_NAME = "sagas test canary"


@dataclass
class Canary:
    """One AMQP connection and one PostgreSQL session, opened at the start and checked at the end."""

    amqp_url: str
    postgres_url: str
    amqp: Any = None
    postgres: Any = None
    backend_pid: int | None = None
    server_started: Any = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def open(self, required: bool) -> None:
        """Connect to both services; a service that does not answer is a problem when ``required``, and a
        note otherwise."""
        for what, url, connect in (
            ("RabbitMQ", self.amqp_url, self._open_amqp),
            ("PostgreSQL", self.postgres_url, self._open_postgres),
        ):
            try:
                connect()
            except Exception as exc:
                message = f"could not open the canary connection to {what} at {_where(url)}: {exc!r}"
                (self.problems if required else self.notes).append(message)

    def _open_amqp(self) -> None:
        import amqp

        u = urlsplit(self.amqp_url.split(";")[0])
        vhost = u.path[1:] if len(u.path) > 1 else "/"
        conn = amqp.Connection(
            f"{u.hostname or '127.0.0.1'}:{u.port or 5672}",
            userid=u.username or "guest",
            password=u.password or "guest",
            virtual_host=vhost,
            connect_timeout=5,
            heartbeat=0,  # off: an idle canary is never closed for missed heartbeats, however long the run
            client_properties={"connection_name": CONNECTION_NAME},
        )
        conn.connect()
        self.amqp = conn

    def _open_postgres(self) -> None:
        import psycopg

        conn = psycopg.connect(self.postgres_url, autocommit=True, connect_timeout=5, application_name=CONNECTION_NAME)
        row = conn.execute("SELECT pg_backend_pid(), pg_postmaster_start_time()").fetchone()
        assert row is not None
        self.postgres, self.backend_pid, self.server_started = conn, row[0], row[1]

    def check(self) -> list[str]:
        """What happened to the connections since :meth:`open` (nothing: an empty list). Closes them."""
        problems = list(self.problems)
        if self.amqp is not None:
            problem = self._check_amqp()
            if problem:
                problems.append(f"the canary's AMQP connection to RabbitMQ at {_where(self.amqp_url)} {problem}")
        if self.postgres is not None:
            problem = self._check_postgres()
            if problem:
                problems.append(
                    f"the canary's session on PostgreSQL at {_where(self.postgres_url)} "
                    f"(backend pid {self.backend_pid}) {problem}"
                )
        return problems

    def _check_amqp(self) -> str | None:
        conn, self.amqp = self.amqp, None
        try:
            # Read what the broker sent meanwhile: nothing, unless it closed the connection (then this raises).
            for _ in range(100):
                try:
                    conn.drain_events(timeout=0.05)
                except TimeoutError:
                    break
            conn.channel().close()
            conn.send_heartbeat()
        except Exception as exc:
            return f"was closed or broken during the run: {exc!r}"
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return None

    def _check_postgres(self) -> str | None:
        conn, self.postgres = self.postgres, None
        try:
            row = conn.execute("SELECT pg_backend_pid(), pg_postmaster_start_time(), 1").fetchone()
        except Exception as exc:
            return f"was closed or broken during the run: {exc!r}"
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        if row is None or row[2] != 1:
            return f"answered SELECT 1 with {row!r}"
        if row[0] != self.backend_pid:
            return f"now has backend pid {row[0]}: it was reconnected"
        if row[1] != self.server_started:
            return f"reports a server started at {row[1]}, not {self.server_started}: the server restarted"
        return None


_KEY = pytest.StashKey[Canary]()
_FOUND = pytest.StashKey[list[str]]()


def of(config: pytest.Config) -> Canary | None:
    """The canary of this run (None before the session started)."""
    return config.stash.get(_KEY, None)


def _where(url: str) -> str:
    u = urlsplit(url.split(";")[0])
    return f"{u.hostname}:{u.port}"


def open_canary(config: pytest.Config, amqp_url: str, postgres_url: str, *, required: bool) -> None:
    """At session start: open the canary and keep it on ``config``."""
    canary = Canary(amqp_url, postgres_url)
    canary.open(required)
    config.stash[_KEY] = canary


def check_canary(session: pytest.Session) -> None:
    """At session end: check the canary; if it found a problem, make the run fail."""
    canary = session.config.stash.get(_KEY, None)
    if canary is None:
        return
    found = canary.check()
    session.config.stash[_FOUND] = found
    if found and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def summary(reporter: pytest.TerminalReporter) -> None:
    """Print what the canary found (or that it was left out)."""
    canary = reporter.config.stash.get(_KEY, None)
    found = reporter.config.stash.get(_FOUND, [])
    if found:
        reporter.write_sep("=", "canary: the machine's services were disturbed", red=True, bold=True)
        for problem in found:
            reporter.write_line(problem, red=True)
    elif canary is not None and canary.notes:
        for note in canary.notes:
            reporter.write_line(f"canary: {note} (left out: not in CI)", yellow=True)
