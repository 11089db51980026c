"""Typed errors of the event bus. Every one says what went wrong and what to do about it."""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every error the transport raises."""


class InvalidEventName(TransportError, ValueError):
    """An event name or subscription pattern breaks the naming rules."""


class InvalidEvent(TransportError, ValueError):
    """An event could not be built: a field has the wrong type or value."""


class EventTooLarge(TransportError, ValueError):
    """The encoded event is larger than the bus allows (``max_event_size``)."""


class DecodeError(TransportError):
    """A received message is not a valid event. ``reason`` is kept with the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PublishError(TransportError):
    """The broker did not confirm the event (or, for a batch, some of them: ``failed`` maps their ids
    to the reason). Publishing again is the way to make sure; receivers may then see it twice."""

    def __init__(self, message: str, *, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed: dict[str, str] = failed or {}


class PublishTimeout(PublishError):
    """The broker did not confirm in time (it may be down or blocked): the event may or may not have
    been taken."""


class Unroutable(PublishError):
    """A mandatory message matched no queue: nobody is bound to receive it."""


class BrokerUnavailable(TransportError):
    """No connection to the broker could be made within the time allowed."""


class InvalidBrokerURL(TransportError, ValueError):
    """A broker URL is malformed: an unsupported scheme, a port that is not a number, or a query option
    that is unknown or has a bad value. Retrying cannot help; the message says what is valid."""


class LoginRefused(TransportError):
    """The broker refused the login (RabbitMQ's 403 ACCESS_REFUSED): a wrong user or password. Retrying
    cannot help, so it is raised at once instead of :class:`BrokerUnavailable` after the time allowed."""


class TopologyMismatch(TransportError):
    """A queue or exchange exists on the broker with other arguments (RabbitMQ's PRECONDITION_FAILED).
    Changing a queue's arguments is a migration; the message says how."""


class QueueInUse(TransportError):
    """A queue was not deleted because a consumer is attached to it: something still reads it."""


class PublisherClosed(TransportError):
    """A publish on an :class:`AsyncPublisher` after its ``close()``: start it again, or make a new one."""


class EventLoopMismatch(TransportError, RuntimeError):
    """An :class:`AsyncPublisher` used outside the event loop it was started on (or outside any loop):
    use one publisher per event loop."""


class InvalidArgument(TransportError, ValueError):
    """A call got an argument of the wrong type or out of range (a timeout that is not a number of
    seconds, say); the message says what it takes."""


def seconds(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a number of seconds for the argument ``name``: a real number above 0 (or 0, with
    ``zero``); else :class:`InvalidArgument` saying what to give."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # (NaN)
        raise InvalidArgument(f"{name} is a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise InvalidArgument(f"{name} must be {'0 or more' if zero else 'more than 0'} seconds, not {value!r}")
    return float(value)
