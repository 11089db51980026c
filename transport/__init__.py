"""The event bus on kombu: envelope, naming, topology, publishing with confirms, consuming with acks.

This package knows kombu and py-amqp and nothing about sagas.
"""

from ._aio import AsyncPublisher
from ._bus import EventBus
from ._connection import ConnectionLost, is_memory_url, redact_url
from ._consumer import ATTEMPT_HEADER, Inbound
from ._deadletters import DeadLetter
from ._envelope import CONTENT_TYPE, DEFAULT_MAX_EVENT_SIZE, Event, decode, encode, new_id
from ._errors import (
    BrokerUnavailable,
    DecodeError,
    EventLoopMismatch,
    EventTooLarge,
    InvalidArgument,
    InvalidBrokerURL,
    InvalidEvent,
    InvalidEventName,
    LoginRefused,
    PublisherClosed,
    PublishError,
    PublishTimeout,
    QueueInUse,
    TopologyMismatch,
    TransportError,
    Unroutable,
)
from ._memory import isolated_transport
from ._names import topic_matches, validate_event_name, validate_pattern
from ._topology import DEFAULT_PREFETCH, QueueInfo, Subscription, delay_queue

__all__ = [
    "ATTEMPT_HEADER",
    "CONTENT_TYPE",
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_PREFETCH",
    "AsyncPublisher",
    "BrokerUnavailable",
    "ConnectionLost",
    "DeadLetter",
    "DecodeError",
    "Event",
    "EventBus",
    "EventLoopMismatch",
    "EventTooLarge",
    "Inbound",
    "InvalidArgument",
    "InvalidBrokerURL",
    "InvalidEvent",
    "InvalidEventName",
    "LoginRefused",
    "PublishError",
    "PublishTimeout",
    "PublisherClosed",
    "QueueInUse",
    "QueueInfo",
    "Subscription",
    "TopologyMismatch",
    "TransportError",
    "Unroutable",
    "decode",
    "delay_queue",
    "encode",
    "is_memory_url",
    "isolated_transport",
    "new_id",
    "redact_url",
    "topic_matches",
    "validate_event_name",
    "validate_pattern",
]
