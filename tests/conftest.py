"""Shared fixtures: a bus URL for each transport, unique names, the services CI must provide, and
private services for the tests that disturb them.

Tests marked ``rabbitmq`` or ``postgres`` need those services. Outside CI they skip with the reason
when the service is not there; in CI (``CI`` set) they fail instead, so a missing service is never
mistaken for a pass. They only use the machine's RabbitMQ and PostgreSQL: a test that stops, restarts
or closes connections asks for ``private_rabbit`` or ``private_postgres`` (a node and a cluster of the
session's own, ``scripts/private_services.py``), and the canary (``tests/_canary.py``) fails the run if
the machine's services were disturbed anyway.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from tests import _canary

# scripts/ holds the helpers the tests share with the operator scripts (private_services, drillkit).
SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

if TYPE_CHECKING:
    from private_services import PostgresCluster, RabbitNode

    from sagas import Store

AMQP_URL = os.environ.get("SAGAS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("SAGAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))

pytest_plugins = ["pytester"]


def _reachable(url: str) -> bool:
    u = urlsplit(url.split(";")[0])
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def require(url: str, what: str) -> None:
    """Skip (outside CI) or fail (in CI) when the service at ``url`` does not answer."""
    if _reachable(url):
        return
    message = f"{what} is not reachable at {urlsplit(url).hostname}:{urlsplit(url).port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it (.ci/run starts it)")
    pytest.skip(f"{message}; set it up or export SAGAS_TEST_* to run these tests")


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """Undo any structlog configuration a test (such as a CLI call) made."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def unique() -> str:
    """A name no other test or run uses (for exchanges, queues and schemas)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[Store]:
    """A fresh store of each backend: memory, SQLite (a file of the test's), PostgreSQL (a schema of its
    own, dropped after the test); closed after the test."""
    from sagas import MemoryStore, open_store

    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path}/s.db")
        try:
            yield store
        finally:
            store.close()
        return
    url = request.getfixturevalue("postgres_url")
    store = open_store(f"{url}?schema={unique}")
    try:
        yield store
    finally:
        store.close()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')


@pytest.fixture
def amqp_url() -> str:
    require(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def postgres_url() -> str:
    require(POSTGRES_URL, "PostgreSQL")
    return POSTGRES_URL


def _need_installed(installed: bool, what: str) -> None:
    """Skip (outside CI) or fail (in CI) when a private service cannot be started."""
    if installed:
        return
    message = f"{what} is not installed: the tests that disturb a service start a private one"
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the session's own (free ports, its own Erlang cookie), for tests that restart the
    broker or close its connections; stopped and deleted at the end."""
    from private_services import private_rabbit_node, rabbitmq_installed

    _need_installed(rabbitmq_installed(), "rabbitmq-server")
    with private_rabbit_node("sagas-test") as node:
        yield node


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the session's own (initdb in a temporary folder, pg_ctl on a free port), for
    tests that restart or stop the database; stopped and deleted at the end."""
    from private_services import postgres_installed
    from private_services import private_postgres as cluster

    _need_installed(postgres_installed(), "PostgreSQL (initdb, pg_ctl)")
    with cluster("sagas-test-pg") as db:
        yield db


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each conformance test runs once on memory:// and once on RabbitMQ."""
    if request.param == "memory":
        yield "memory://"
    else:
        require(AMQP_URL, "RabbitMQ")
        yield AMQP_URL


@pytest.fixture
def buses(broker_url: str, unique: str) -> Iterator[list[object]]:
    """Buses and workers created by a test; their queues and exchange are deleted afterwards."""
    made: list[object] = []
    yield made
    from transport import EventBus

    queues: set[str] = set()
    for thing in made:
        bus = getattr(thing, "bus", thing)
        if isinstance(bus, EventBus):
            queues |= bus.declared_queues
            bus.close()
    cleaner = EventBus(broker_url, exchange=unique)
    cleaner.declared_queues |= queues
    cleaner.delete_topology()
    cleaner.close()


def pytest_configure(config: pytest.Config) -> None:
    """Run the property tests with the sagas-ci hypothesis profile in CI and sagas-dev elsewhere.

    ``HYPOTHESIS_PROFILE`` (e.g. ``sagas-thorough``) or ``--hypothesis-profile`` picks another one.
    """
    from hypothesis import settings

    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("sagas-ci" if IN_CI else "sagas-dev"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Open the canary's connections to the machine's RabbitMQ and PostgreSQL."""
    _canary.open_canary(session.config, AMQP_URL, POSTGRES_URL, required=IN_CI)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the property tests' totals to the reliability report, if one is being written; fail the run if
    the canary's connections to the machine's services did not survive it."""
    from tests import report

    report.flush()
    _canary.check_canary(session)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what the canary found."""
    _canary.summary(terminalreporter)
