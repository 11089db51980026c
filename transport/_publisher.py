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
        #: while streaming (:meth:`Publisher.send`): each message settled since the last look, with its
        #: failure (None when confirmed)
        self.settled: list[tuple[str, str | None]] | None = None
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
                self._one(self.pending.pop(seq), failure)
        else:
            mid = self.pending.pop(tag, "")
            if mid:
                self._one(mid, failure)

    def _one(self, mid: str, failure: str | None) -> None:
        if self.settled is not None:
            self.settled.append((mid, failure or self.failed.pop(mid, None)))
        elif failure:
            self.failed[mid] = failure

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, "the broker refused the message (nack)")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        mid = message.properties.get("message_id", "")
        self.failed[mid] = f"unroutable: no queue is bound to {exchange!r} for {routing_key!r}"


#: frames of this many messages go to the socket in one write (see :class:`_CoalescedWrites`)
_WRITE_EVERY = 64


class _CoalescedWrites:
    """Gathers the frames py-amqp writes for a batch of messages and sends them in one socket write per
    :data:`_WRITE_EVERY` messages, instead of one per message.

    A write per message costs a system call and, worse, releases the GIL each time: with another busy
    thread in the process (an asyncio loop), getting it back can take the interpreter's switch interval
    (5 ms). py-amqp writes through ``transport._write`` (the socket's ``sendall``, or the TLS write); it
    is replaced for the batch and put back by :meth:`end`, which also sends what is left, so that what
    the broker received always matches the confirms counted. A write that fails raises from
    ``transport.write`` as it would have, at the flush."""

    def __init__(self, conn: Any) -> None:
        transport = getattr(getattr(conn, "connection", None), "transport", None)
        self._transport = transport if transport is not None and hasattr(transport, "_write") else None
        self._chunks: list[bytes] = []
        self._armed = False
        if self._transport is not None:
            self._own = "_write" in vars(self._transport)  # the TCP transport sets it per connection
            self._real = self._transport._write  # noqa: SLF001 - py-amqp's socket write (see the class)
            self.arm()

    def _chunks_append(self, data: Any) -> None:
        self._chunks.append(bytes(data))  # py-amqp hands over a view of a buffer it reuses

    def arm(self) -> None:
        """Gather writes from now on."""
        if self._transport is not None and not self._armed:
            self._transport._write = self._chunks_append  # noqa: SLF001
            self._armed = True

    def flush(self) -> None:
        """Send what was gathered, in one write."""
        transport = self._transport
        if transport is None or not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._put_back()
        try:
            transport.write(data)
        finally:
            self.arm()

    def disarm(self) -> None:
        """Send what was gathered and write directly again (before waiting for confirms, so that a
        heartbeat written meanwhile goes out at once)."""
        self.flush()
        self._put_back()

    def _put_back(self) -> None:
        transport = self._transport
        if transport is None or not self._armed:
            return
        if self._own:
            transport._write = self._real  # noqa: SLF001
        else:
            del transport._write  # noqa: SLF001
        self._armed = False

    def end(self) -> None:
        """Send what is left (a failure then is the connection's, and shows on the next use) and put
        py-amqp's write back."""
        try:
            with contextlib.suppress(Exception):
                self.flush()
        finally:
            self._put_back()
            self._transport = None


def _basic_publish(channel: Any, item: Outgoing, content_type: str) -> str | None:
    """Send one persistent message on ``channel``; the reason when the memory transport refused it at
    once as unroutable (RabbitMQ returns such a message later, with its confirm)."""
    exchange, routing_key, body, message_id, headers, mandatory = item
    message = channel.prepare_message(
        body,
        content_type=content_type,
        content_encoding="utf-8",
        headers=headers,
        properties={"message_id": message_id, "delivery_mode": 2},
    )
    try:
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    except Unroutable as exc:
        return f"unroutable: {exc}"
    return None


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
            writes = _CoalescedWrites(link.current) if confirms is not None else None
            try:
                for item in items:
                    message_id = item[3]
                    refused = _basic_publish(ch, item, content_type)
                    if refused is not None:
                        unroutable[message_id] = refused
                        continue
                    ids.append(message_id)
                    if confirms is not None and writes is not None:
                        confirms.sent(message_id)
                        if len(ids) % _WRITE_EVERY == 0:
                            writes.flush()
                        if len(confirms.pending) >= self.confirm_window:
                            writes.disarm()
                            self._wait_confirms(confirms, deadline, self.confirm_window // 2)
                            writes.arm()
                if confirms is not None and writes is not None:
                    writes.disarm()
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
            finally:
                if writes is not None:
                    writes.end()
            failed = dict(unroutable)
            if confirms is not None and confirms.failed:
                failed.update({i: confirms.failed.pop(i) for i in ids if i in confirms.failed})
                confirms.failed.clear()
            if failed:
                first = next(iter(failed.values()))
                cls = Unroutable if all(f.startswith("unroutable") for f in failed.values()) else PublishError
                raise cls(f"{len(failed)} of {len(items)} message(s) not taken by the broker: {first}", failed=failed)

    # -- streaming: send now, collect each confirm as it comes (one thread publishing alone) -----------

    @property
    def unconfirmed(self) -> int:
        """Messages sent by :meth:`send` whose confirm has not come yet."""
        confirms = self._confirms
        return len(confirms.pending) if confirms is not None else 0

    def send(self, items: Sequence[Outgoing], timeout: float) -> list[tuple[str, str | None]]:
        """Send ``items`` without waiting for their confirms (collect them with :meth:`collect`); return the
        outcomes known at once: every message on ``memory://`` (which has no confirms), else none.

        Raises :class:`PublishError` as :meth:`publish` does when no connection can be made within
        ``timeout`` or the connection breaks; the connection is then dropped, and every message sent
        before and not yet confirmed is lost with it (the caller fails them)."""
        if not items:
            return []
        link = self._link
        with link.lock:
            if link.current is None or self._channel is None:
                try:
                    link.connect(timeout=max(0.0, min(link.connect_timeout, timeout)))
                except BrokerUnavailable as exc:
                    raise PublishError(f"not published: {exc}") from None
            ch, confirms = self._channel, self._confirms
            outcomes: list[tuple[str, str | None]] = []
            writes = None
            if confirms is not None:
                if confirms.settled is None:
                    confirms.settled = []
                writes = _CoalescedWrites(link.current)
            try:
                for n, item in enumerate(items, 1):
                    message_id = item[3]
                    refused = _basic_publish(ch, item, CONTENT_TYPE)
                    if refused is not None:
                        outcomes.append((message_id, refused))
                        continue
                    if confirms is None:
                        outcomes.append((message_id, None))
                    else:
                        confirms.sent(message_id)
                        if writes is not None and n % _WRITE_EVERY == 0:
                            writes.flush()
                if writes is not None:
                    writes.flush()
            except Exception as exc:
                self._broken(exc)
                raise
            finally:
                if writes is not None:
                    writes.end()
            return outcomes

    def collect(self, wait: float) -> list[tuple[str, str | None]]:
        """The outcomes of messages sent by :meth:`send` whose confirm (or refusal) came: reads what the
        broker sent next, waiting up to ``wait`` seconds for it. Raises :class:`PublishError` when the
        connection broke (it is dropped)."""
        link = self._link
        with link.lock:
            confirms = self._confirms
            conn = link.current
            if confirms is None or conn is None or confirms.settled is None:
                return []
            try:
                conn.heartbeat_check()
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=wait)  # one frame: an ack often settles many messages
            except Exception as exc:
                self._broken(exc)
                raise
            settled, confirms.settled = confirms.settled, []
            return settled

    def _broken(self, exc: BaseException) -> None:
        """After an error while streaming: a broken connection is dropped and raises :class:`PublishError`."""
        conn = self._link.current
        if conn is not None and is_connection_error(conn, exc):
            self._link.lost(exc)
            raise PublishError(f"publish failed, the broker connection broke: {exc or type(exc).__name__}") from None

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
