"""py-amqp's frame reader, made to survive a message whose AMQP properties cannot be decoded.

py-amqp decodes a message's properties (content type, message id, correlation id, ...) as UTF-8 while
it reads the frames. One that is not UTF-8, which any publisher can send, raised ``UnicodeDecodeError``
out of ``drain_events`` and left the connection's frame state half-way: the worker crashed, and
crashed again after each restart, because the message was never acked. ``sagas dead ls`` crashed on it
too. This reader is py-amqp's own (``amqp.method_framing.frame_handler``, py-amqp 5.4) with one change:
a message whose properties cannot be decoded arrives with empty properties and ``invalid_properties``
set to the reason, and the bus dead-letters it like any other message that is not a valid event.

The bus passes it to every connection it opens (``transport_options={"frame_handler": ...}``); no
global state of py-amqp is changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from struct import unpack_from
from typing import Any

from amqp import spec
from amqp.basic_message import Message
from amqp.exceptions import UnexpectedFrame

#: Methods followed by a content header and a body (as in py-amqp).
_CONTENT_METHODS = frozenset([spec.Basic.Return, spec.Basic.Deliver, spec.Basic.GetOk])


class TolerantMessage(Message):  # type: ignore[misc]  # py-amqp is untyped
    """A py-amqp message whose properties may fail to decode; ``invalid_properties`` then says why."""

    invalid_properties: str | None = None

    def _load_properties(self, class_id: int, buf: Any, offset: int) -> int:
        try:
            return int(super()._load_properties(class_id, buf, offset))
        except Exception as exc:  # noqa: BLE001 - any malformed property list; the message is refused
            self.properties: dict[str, Any] = {}
            self.invalid_properties = f"{type(exc).__name__}: {exc}"[:300]
            return offset


def frame_handler(connection: Any, callback: Callable[..., Any]) -> Callable[[tuple[int, int, Any]], bool]:
    """Create the closure that reads frames (py-amqp's, building :class:`TolerantMessage`)."""
    expected_types: defaultdict[int, int] = defaultdict(lambda: 1)
    partial_messages: dict[int, TolerantMessage] = {}

    def on_frame(frame: tuple[int, int, Any]) -> bool:
        frame_type, channel, buf = frame
        connection.bytes_recv += 1
        if frame_type not in (expected_types[channel], 8):
            raise UnexpectedFrame(f"Received frame {frame_type} while expecting type: {expected_types[channel]}")
        if frame_type == 1:
            method_sig = unpack_from(">HH", buf, 0)
            if method_sig in _CONTENT_METHODS:
                # Save what we have and wait for the content header.
                partial_messages[channel] = TolerantMessage(frame_method=method_sig, frame_args=buf)
                expected_types[channel] = 2
                return False
            callback(channel, method_sig, buf, None)
        elif frame_type == 2:
            msg = partial_messages[channel]
            msg.inbound_header(buf)
            if not msg.ready:
                expected_types[channel] = 3  # wait for the body
                return False
            expected_types[channel] = 1  # a message without a body: done
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 3:
            msg = partial_messages[channel]
            msg.inbound_body(buf)
            if not msg.ready:
                return False  # wait for the rest of the body
            expected_types[channel] = 1
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 8:
            return False  # a heartbeat; bytes_recv is already counted
        return True

    return on_frame
