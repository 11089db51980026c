"""Saga orchestration on events.

Services declare handlers with decorators; a worker runs them on RabbitMQ or in memory, with the
delivery guarantee each subscription picked.
"""

from transport import Event, EventBus

from ._errors import ConfigurationError, Reject, SagasError, StoreError
from ._logging import configure_logging
from ._service import AT_LEAST_ONCE, AT_MOST_ONCE, App, Context, Delivery, HandlerSpec, Retry, Service
from ._store import MemoryStore, PostgresStore, SQLiteStore, open_store
from ._types import InboxStore
from ._worker import Worker

__all__ = [
    "AT_LEAST_ONCE",
    "AT_MOST_ONCE",
    "App",
    "ConfigurationError",
    "Context",
    "Delivery",
    "Event",
    "EventBus",
    "HandlerSpec",
    "InboxStore",
    "MemoryStore",
    "PostgresStore",
    "Reject",
    "Retry",
    "SQLiteStore",
    "SagasError",
    "Service",
    "StoreError",
    "Worker",
    "configure_logging",
    "open_store",
]
