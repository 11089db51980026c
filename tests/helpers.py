"""Helpers for tests: waiting on an observable condition, and raw publishing of hostile messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kombu.connection import Connection

from transport import _memory


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def raw_publish(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    content_type: str | None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish bytes as they are, bypassing the envelope codec (to test hostile input)."""
    # kombu's Connection is unannotated.
    conn: Connection = (
        Connection(url, transport=_memory.Transport)  # type: ignore[no-untyped-call]
        if url.startswith("memory")
        else Connection(url)  # type: ignore[no-untyped-call]
    )
    with conn:
        ch = conn.channel()  # type: ignore[no-untyped-call]
        msg = ch.prepare_message(
            body, content_type=content_type, headers=headers or {}, properties={"delivery_mode": 2}
        )
        ch.basic_publish(msg, exchange=exchange, routing_key=routing_key)
        ch.close()
