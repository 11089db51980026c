"""Helpers for tests: waiting on an observable condition, raw publishing of hostile messages, and a
store whose commit fails once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from kombu.connection import Connection

from sagas import SQLiteStore
from transport import _memory


class CommitFailsOnce(SQLiteStore):
    """An SQLite store whose first group (transaction) that saves a saga or records an inbox entry fails
    to commit, as a database that restarts at that moment: everything the group wrote is rolled back,
    and the worker redoes the work. ``failures`` counts the failures still to come."""

    failures = 1
    _wrote = False

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        outer = not self._depth
        try:
            with super().group():
                yield
                if outer and self._wrote and self.failures:
                    self.failures -= 1
                    raise ConnectionError("the database restarted: the commit failed")
        finally:
            if outer:
                self._wrote = False

    def save_saga(self, *args: Any, **kwargs: Any) -> Any:
        self._wrote = True
        return super().save_saga(*args, **kwargs)

    def remember(self, consumer: str, message_id: str) -> None:
        self._wrote = True
        super().remember(consumer, message_id)


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
