"""The security tests' own RabbitMQ node (tests/security/_node.py), started once for the session when a
test asks for it, and always stopped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security._node import TlsBroker, running_node


@pytest.fixture(scope="session")
def tls_broker() -> Iterator[TlsBroker]:
    with running_node() as node:
        yield node
