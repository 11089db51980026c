"""Publishing with pipelined publisher confirms, on the one publishing channel of a connection.

Every message is persistent (``delivery_mode=2``); every publish waits for the broker's confirm with a
timeout, and a batch pipelines its confirms (``confirm_select`` plus ``basic_ack`` events) up to a
window. With ``mandatory``, a message that no queue is bound to receive raises :class:`Unroutable`
instead of vanishing. Publishing holds the connection's lock, so a publisher can be shared by threads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from ._connection import FailoverConnection, is_connection_error
from ._envelope import CONTENT_TYPE
from ._errors import BrokerUnavailable, PublishError, PublishTimeout, Unroutable

#: one message to send: (exchange, routing key, body, message id, AMQP headers, mandatory)
Outgoing = tuple[str, str, bytes, str, dict[str, Any], bool]


class _Confirms:
    """Pipelined publisher confirms on a py-amqp channel (``confirm_select`` + ``basic_ack`` events)."""

    def __init__(self, channel: Any) -> None:
        self.seq = 0
        self.pending: dict[int, str] = {}
        self.failed: dict[str, str] = {}
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)

    def sent(self, message_id: str) -> int:
        self.seq += 1
        self.pending[self.seq] = message_id
        return self.seq

    def _settle(self, tag: int, multiple: bool, failure: str | None) -> None:
        if multiple:
            for seq in [s for s in self.pending if s <= tag]:
                mid = self.pending.pop(seq)
                if failure:
                    self.failed[mid] = failure
        else:
            mid = self.pending.pop(tag, "")
            if failure and mid:
                self.failed[mid] = failure

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, "the broker refused the message (nack)")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        mid = message.properties.get("message_id", "")
        self.failed[mid] = f"unroutable: no queue is bound to {exchange!r} for {routing_key!r}"


class Publisher:
    """Sends messages on the publishing channel of a :class:`FailoverConnection` and waits for confirms.

    The channel is handed over with :meth:`attach` when the connection is set up, and dropped with
    :meth:`detach` when it closes. ``timeout`` bounds a publish that names none; at most
    ``confirm_window`` messages wait for their confirm at a time (the memory transport has no confirms:
    it raises at once instead).
    """

    def __init__(self, link: FailoverConnection, *, timeout: float, confirm_window: int) -> None:
        self.timeout = timeout
        self.confirm_window = confirm_window
        self._link = link
        self._channel: Any = None
        self._confirms: _Confirms | None = None

    @property
    def channel(self) -> Any:
        """The publishing channel, or None while not connected."""
        return self._channel

    def attach(self, channel: Any) -> None:
        """Publish on ``channel`` from now on, with confirms turned on (except on ``memory://``)."""
        confirms = None if self._link.memory else _Confirms(channel)
        self._channel, self._confirms = channel, confirms

    def detach(self) -> None:
        """Forget the channel (its connection closed)."""
        self._channel, self._confirms = None, None

    def publish(self, items: Sequence[Outgoing], timeout: float | None, content_type: str = CONTENT_TYPE) -> None:
        """Send ``items`` with pipelined confirms; return once all are confirmed. Connects first if needed.

        Raises :class:`PublishError` (or :class:`Unroutable` when every failure is one) whose ``failed``
        maps the ids that were not taken to the reason; the others were confirmed. A timeout or a broken
        connection closes the connection.
        """
        if not items:
            return
        link = self._link
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with link.lock:
            if link.current is None or self._channel is None:
                try:
                    link.connect(timeout=max(0.0, min(link.connect_timeout, deadline - time.monotonic())))
                except BrokerUnavailable as exc:
                    raise PublishError(f"not published: {exc}") from None
            ch, confirms = self._channel, self._confirms
            ids = []
            unroutable: dict[str, str] = {}
            try:
                for exchange, routing_key, body, message_id, headers, mandatory in items:
                    message = ch.prepare_message(
                        body,
                        content_type=content_type,
                        content_encoding="utf-8",
                        headers=headers,
                        properties={"message_id": message_id, "delivery_mode": 2},
                    )
                    try:
                        ch.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                    except Unroutable as exc:  # raised at once by the memory transport
                        unroutable[message_id] = f"unroutable: {exc}"
                        continue
                    ids.append(message_id)
                    if confirms is not None:
                        confirms.sent(message_id)
                        if len(confirms.pending) >= self.confirm_window:
                            self._wait_confirms(confirms, deadline, self.confirm_window // 2)
                if confirms is not None:
                    self._wait_confirms(confirms, deadline, 0)
            except PublishTimeout:
                # A broker that did not confirm in time may not answer a close either: the connection
                # is dropped without a close handshake, so the publish raises at its timeout; the next
                # connect tries the next broker of the URL first.
                link.lost(TimeoutError("no publisher confirm in time"))
                raise
            except Exception as exc:
                conn = link.current
                if conn is not None and is_connection_error(conn, exc):
                    link.lost(exc)  # dropped; the next connect tries the next broker of the URL first
                    raise PublishError(
                        f"publish failed, the broker connection broke: {exc or type(exc).__name__}"
                    ) from None
                raise
            failed = dict(unroutable)
            if confirms is not None and confirms.failed:
                failed.update({i: confirms.failed.pop(i) for i in ids if i in confirms.failed})
                confirms.failed.clear()
            if failed:
                first = next(iter(failed.values()))
                cls = Unroutable if all(f.startswith("unroutable") for f in failed.values()) else PublishError
                raise cls(f"{len(failed)} of {len(items)} message(s) not taken by the broker: {first}", failed=failed)

    def keep_alive(self) -> None:
        """Between publishes: send a heartbeat if one is due, and read what the broker sent meanwhile (its
        heartbeats, or the close of a connection it ended). A connection found broken is dropped, so the
        next publish connects again instead of failing on it. A no-op while not connected."""
        link = self._link
        if link.memory:
            return
        with link.lock:
            conn = link.current
            if conn is None or self._channel is None:
                return
            try:
                conn.heartbeat_check()
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.001)
            except Exception as exc:
                if not is_connection_error(conn, exc):
                    raise
                link.lost(exc)

    def _wait_confirms(self, confirms: _Confirms, deadline: float, until_pending: int) -> None:
        conn = self._link.live()
        while len(confirms.pending) > until_pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout(
                    f"the broker did not confirm {len(confirms.pending)} message(s) in time; "
                    "they may or may not have been taken"
                )
            # Heartbeats are checked on each slice: a broker gone silent raises ConnectionForced within 2
            # heartbeat intervals, even when the publish timeout is longer.
            conn.heartbeat_check()
            try:
                conn.drain_events(timeout=min(remaining, self._link.tick()))
            except TimeoutError:
                continue
