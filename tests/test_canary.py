"""The canary (tests/_canary.py) notices a disturbed service, and a disturbed canary fails the run.

Every disturbance here is made on the session's private RabbitMQ node and PostgreSQL cluster, never on
the machine's services: the canary under test is pointed at the private ones. The end-to-end tests run
a scratch pytest session in a subprocess with the same hooks as tests/conftest.py and check its exit
status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from private_services import PostgresCluster, RabbitNode, free_port

from tests._canary import Canary

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture
def canary(private_rabbit: RabbitNode, private_postgres: PostgresCluster) -> Iterator[Canary]:
    """A canary on the private services, opened; checked (and so closed) by the test or afterwards."""
    c = Canary(private_rabbit.url, private_postgres.url)
    c.open(required=True)
    assert c.problems == []
    yield c
    c.check()


def test_an_undisturbed_canary_finds_nothing(canary: Canary) -> None:
    """Connections nobody touched are reported as fine."""
    assert canary.check() == []


def test_the_canary_sees_the_broker_close_its_connection(canary: Canary, private_rabbit: RabbitNode) -> None:
    """rabbitmqctl close_all_connections (on the private node) is reported as a closed AMQP connection."""
    private_rabbit.ctl("close_all_connections", "canary test")
    (problem,) = canary.check()
    assert "AMQP connection" in problem
    assert "closed or broken" in problem


def test_the_canary_sees_a_broker_restart(canary: Canary, private_rabbit: RabbitNode) -> None:
    """stop_app and start_app of the (private) node break the canary's AMQP connection."""
    try:
        private_rabbit.ctl("stop_app")
    finally:
        private_rabbit.ctl("start_app")
    (problem,) = canary.check()
    assert "AMQP connection" in problem


def test_the_canary_sees_its_session_terminated(canary: Canary, private_postgres: PostgresCluster) -> None:
    """pg_terminate_backend of the canary's own backend is reported as a broken PostgreSQL session."""
    with psycopg.connect(private_postgres.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (canary.backend_pid,))
    (problem,) = canary.check()
    assert f"backend pid {canary.backend_pid}" in problem
    assert "closed or broken" in problem


def test_the_canary_sees_a_database_restart(canary: Canary, private_postgres: PostgresCluster) -> None:
    """pg_ctl restart of the (private) cluster is reported as a broken PostgreSQL session."""
    private_postgres.restart()
    (problem,) = canary.check()
    assert "PostgreSQL" in problem


# -- end to end: a scratch pytest run with the canary's hooks ------------------------------------------

CONFTEST = """
import os

from tests import _canary


def pytest_sessionstart(session):
    _canary.open_canary(
        session.config, os.environ["CANARY_AMQP_URL"], os.environ["CANARY_POSTGRES_URL"],
        required=bool(os.environ.get("CI")),
    )


def pytest_sessionfinish(session):
    _canary.check_canary(session)


def pytest_terminal_summary(terminalreporter):
    _canary.summary(terminalreporter)
"""

DISTURBING_TESTS = """
import json
import os
from pathlib import Path

import psycopg
from private_services import RabbitNode

from tests import _canary


def test_nothing():
    pass


def test_disturb(request):
    what = os.environ.get("DISTURB")
    if what == "postgres":
        with psycopg.connect(os.environ["CANARY_POSTGRES_URL"], autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (_canary.of(request.config).backend_pid,))
    elif what == "rabbitmq":
        node = json.loads(os.environ["CANARY_NODE"])
        RabbitNode(node["name"], node["port"], node["dist_port"], Path(node["dir"]), node["home"]).ctl(
            "close_all_connections", "canary test"
        )
"""


def _scratch_run(tmp: Path, amqp_url: str, postgres_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m pytest`` in a scratch folder whose conftest has the canary's hooks."""
    (tmp / "pytest.ini").write_text("[pytest]\n")
    (tmp / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp / "test_scratch.py").write_text(textwrap.dedent(DISTURBING_TESTS))
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "DISTURB")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_scratch.py"],
        cwd=tmp,
        env={
            **clean,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'scripts'}",
            "CANARY_AMQP_URL": amqp_url,
            "CANARY_POSTGRES_URL": postgres_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _node_env(node: RabbitNode) -> str:
    return json.dumps(
        {"name": node.name, "port": node.port, "dist_port": node.dist_port, "dir": str(node.dir), "home": node.home}
    )


def test_a_run_that_disturbs_nothing_passes(
    tmp_path: Path, private_rabbit: RabbitNode, private_postgres: PostgresCluster
) -> None:
    """A scratch run whose tests leave the services alone exits 0 with the canary on."""
    result = _scratch_run(tmp_path, private_rabbit.url, private_postgres.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "canary" not in result.stdout


@pytest.mark.parametrize("disturb", ["postgres", "rabbitmq"])
def test_a_run_that_disturbs_a_service_fails(
    tmp_path: Path, private_rabbit: RabbitNode, private_postgres: PostgresCluster, disturb: str
) -> None:
    """A scratch run whose tests all pass but break the canary's connection exits 1 and says why."""
    result = _scratch_run(
        tmp_path, private_rabbit.url, private_postgres.url, DISTURB=disturb, CANARY_NODE=_node_env(private_rabbit)
    )
    assert "2 passed" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    assert "canary: the machine's services were disturbed" in result.stdout
    assert ("AMQP connection" if disturb == "rabbitmq" else "session on PostgreSQL") in result.stdout


@pytest.mark.parametrize("ci", [True, False])
def test_a_missing_service_fails_the_run_in_ci_only(tmp_path: Path, ci: bool) -> None:
    """With CI set, a canary that cannot connect fails the run; without, it is left out with a note."""
    closed = free_port()
    result = _scratch_run(
        tmp_path,
        f"amqp://guest:guest@127.0.0.1:{closed}//",
        f"postgresql://postgres@127.0.0.1:{closed}/test",
        **({"CI": "true"} if ci else {}),
    )
    assert "2 passed" in result.stdout, result.stdout + result.stderr
    assert result.returncode == (1 if ci else 0), result.stdout + result.stderr
    assert "could not open the canary connection to RabbitMQ" in result.stdout
    assert "could not open the canary connection to PostgreSQL" in result.stdout
