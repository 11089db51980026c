"""A RabbitMQ node of the security tests' own: TLS listener, users from docs/security.md.

Node ``sagas-tls-<random>@localhost`` (started by ``scripts/private_services.py``): AMQP on 127.0.0.1:5690,
AMQPS on 127.0.0.1:5691, distribution on 25691, its own configuration, data, log, plugins (none) and Erlang
cookie in a temporary directory. A throw-away CA
(made with openssl) signed its certificate, for ``localhost`` and ``127.0.0.1``, and a client
certificate; a rogue CA signed another client certificate. The node asks clients for a certificate and
verifies any it gets, but does not require one.

Users: ``sagas`` (administrator, on ``/`` and ``ocis``), and every user of the ``rabbitmqctl
set_permissions`` commands in docs/security.md, with exactly those permissions on their vhost, and the
password ``<user>-s3cr3t``. They are loaded from a definitions file when the node boots (quicker than
``rabbitmqctl``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from private_services import ServiceError, port_open, private_rabbit_node, rabbitmq_installed

from sagas._cli import tls_options
from tests.conftest import IN_CI
from transport import EventBus

NODE_PREFIX = "sagas-tls"
NODE = f"{NODE_PREFIX}-*@localhost"
AMQP_PORT, AMQPS_PORT, DIST_PORT = 5690, 5691, 25691
USER, PASSWORD = "sagas", "s3cr3t-tls-pw"
URL = f"amqps://{USER}:{PASSWORD}@localhost:{AMQPS_PORT}//"
PLAIN_URL = f"amqp://{USER}:{PASSWORD}@localhost:{AMQP_PORT}//"
BOOT_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TlsBroker:
    """The running node and the files a client needs."""

    dir: Path
    ca: str
    cert: str
    key: str
    rogue_cert: str
    rogue_key: str

    def ssl(self, **extra: Any) -> dict[str, Any]:
        """The CLI's options for this broker (verify against our CA and the URL's host), plus ``extra``."""
        options = tls_options(URL, self.ca)
        assert options is not None
        return {**options, **extra}


@dataclass(frozen=True)
class Permission:
    """One ``rabbitmqctl set_permissions`` command of docs/security.md."""

    vhost: str
    user: str
    configure: str
    write: str
    read: str

    @property
    def password(self) -> str:
        return f"{self.user}-s3cr3t"

    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@localhost:{AMQP_PORT}/{self.vhost}"


def documented_permissions() -> dict[str, Permission]:
    """The ``rabbitmqctl set_permissions -p VHOST USER CONF WRITE READ`` commands in docs/security.md."""
    text = (ROOT / "docs" / "security.md").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if "rabbitmqctl set_permissions" not in line:
            continue
        words = shlex.split(line.split("rabbitmqctl", 1)[1])
        assert words[:2] == ["set_permissions", "-p"], line
        vhost, user, configure, write, read = words[2:7]
        found[user] = Permission(vhost, user, configure, write, read)
    return found


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _definitions() -> dict[str, Any]:
    permissions = documented_permissions()
    vhosts = sorted({"/", *(p.vhost for p in permissions.values())})
    users = [
        {
            "name": USER,
            "password_hash": _password_hash(PASSWORD),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": ["administrator"],
        }
    ]
    grants = [{"user": USER, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"} for v in vhosts]
    for p in permissions.values():
        users.append(
            {
                "name": p.user,
                "password_hash": _password_hash(p.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        grants.append({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read})
    return {"users": users, "vhosts": [{"name": v} for v in vhosts], "permissions": grants}


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}; CI must provide it (the TLS tests start their own RabbitMQ node)")
    pytest.skip(f"{what}: the TLS tests start their own RabbitMQ node")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(d: Path) -> None:
    """A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a rogue CA with a
    client certificate of its own (P-256 keys: fast to make)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    leaf = ["-addext", "basicConstraints=CA:FALSE"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=sagas test CA", cwd=d)
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "server.key",
        "-out",
        "server.pem",
        "-subj",
        "/CN=localhost",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        *leaf,
        cwd=d,
    )
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "client.key",
        "-out",
        "client.pem",
        "-subj",
        "/CN=sagas-client",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        *leaf,
        cwd=d,
    )
    _openssl("req", "-x509", *ec, "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem", "-subj", "/CN=rogue CA", cwd=d)
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        "-subj",
        "/CN=sagas-client",
        "-CA",
        "rogue-ca.pem",
        "-CAkey",
        "rogue-ca.key",
        *leaf,
        cwd=d,
    )


def _prepare(d: Path) -> str:
    """The certificates and definitions the node loads, and its rabbitmq.conf lines for them."""
    _make_certificates(d)
    (d / "definitions.json").write_text(json.dumps(_definitions()))
    return textwrap.dedent(f"""\
        listeners.ssl.1 = 127.0.0.1:{AMQPS_PORT}
        ssl_options.cacertfile = {d}/ca.pem
        ssl_options.certfile = {d}/server.pem
        ssl_options.keyfile = {d}/server.key
        ssl_options.verify = verify_peer
        ssl_options.fail_if_no_peer_cert = false
        load_definitions = {d}/definitions.json
        loopback_users = none
        """)


@contextlib.contextmanager
def running_node() -> Iterator[TlsBroker]:
    """Start the node (scripts/private_services.py), wait until it answers, yield; always stop it and remove
    its directory. Without rabbitmq-server or openssl: fail in CI, skip elsewhere."""
    if not rabbitmq_installed():
        _missing("rabbitmq-server is not installed")
    if shutil.which("openssl") is None:
        _missing("the openssl command is not installed")
    busy = [p for p in (AMQP_PORT, AMQPS_PORT, DIST_PORT) if port_open(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use: is a {NODE} node left over from another run?")
    try:
        with private_rabbit_node(NODE_PREFIX, port=AMQP_PORT, dist_port=DIST_PORT, prepare=_prepare) as node:
            d = node.dir
            probe = EventBus(PLAIN_URL, connect_timeout=1.0)
            if not (port_open(AMQPS_PORT) and probe.health(timeout=5.0)):
                pytest.fail(f"the TLS RabbitMQ node does not answer:\n{node.tail()}")
            yield TlsBroker(
                d,
                str(d / "ca.pem"),
                str(d / "client.pem"),
                str(d / "client.key"),
                str(d / "rogue.pem"),
                str(d / "rogue.key"),
            )
    except ServiceError as exc:
        pytest.fail(f"the TLS RabbitMQ node did not start: {exc}")
