"""Saga orchestration on events.

Services declare handlers with decorators; a worker runs them on RabbitMQ or in memory, with the
delivery guarantee each subscription picked.
"""

from transport import Event, EventBus

from ._errors import ActionRefused, ConfigurationError, Failure, NoReply, NotFound, Reject, SagasError, StoreError
from ._gc import tune_gc
from ._logging import configure_logging
from ._retention import Pruner, Retention
from ._saga import (
    FAILED,
    Compensate,
    Final,
    Go,
    Request,
    Saga,
    SagaContext,
    SagaDefinition,
    Start,
    State,
    Step,
    StepSaga,
    compensate,
    set_data,
)
from ._saga_engine import SagaEngine
from ._service import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    DEFAULT_PERMANENT,
    App,
    Context,
    Delivery,
    HandlerSpec,
    Retry,
    Service,
)
from ._store import (
    HistoryEntry,
    MemoryStore,
    PostgresStore,
    SagaRecord,
    SQLiteStore,
    Store,
    open_store,
)
from ._types import InboxStore
from ._versions import CompatibilityReport, StrandedSagas
from ._worker import Worker

__all__ = [
    "AT_LEAST_ONCE",
    "AT_MOST_ONCE",
    "DEFAULT_PERMANENT",
    "FAILED",
    "ActionRefused",
    "App",
    "CompatibilityReport",
    "Compensate",
    "ConfigurationError",
    "Context",
    "Delivery",
    "Event",
    "EventBus",
    "Failure",
    "Final",
    "Go",
    "HandlerSpec",
    "HistoryEntry",
    "InboxStore",
    "MemoryStore",
    "NoReply",
    "NotFound",
    "PostgresStore",
    "Pruner",
    "Reject",
    "Request",
    "Retention",
    "Retry",
    "SQLiteStore",
    "Saga",
    "SagaContext",
    "SagaDefinition",
    "SagaEngine",
    "SagaRecord",
    "SagasError",
    "Service",
    "Start",
    "State",
    "Step",
    "StepSaga",
    "Store",
    "StoreError",
    "StrandedSagas",
    "Worker",
    "compensate",
    "configure_logging",
    "open_store",
    "set_data",
    "tune_gc",
]
