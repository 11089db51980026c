"""Shared fixtures: a bus URL for each transport, unique names, and the services CI must provide.

Tests marked ``rabbitmq`` or ``postgres`` need those services. Outside CI they skip with the reason
when the service is not there; in CI (``CI`` set) they fail instead, so a missing service is never
mistaken for a pass.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# scripts/ holds the helpers the tests share with the operator scripts (private_services, drillkit).
SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

AMQP_URL = os.environ.get("SAGAS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("SAGAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))


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


@pytest.fixture
def amqp_url() -> str:
    require(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def postgres_url() -> str:
    require(POSTGRES_URL, "PostgreSQL")
    return POSTGRES_URL


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the property tests' totals to the reliability report, if one is being written."""
    from tests import report

    report.flush()
