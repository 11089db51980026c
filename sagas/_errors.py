"""Typed errors of the framework."""

from __future__ import annotations

from transport import TransportError


class SagasError(Exception):
    """Base class of the framework's own errors."""


class ConfigurationError(SagasError, ValueError):
    """A service, handler, app or option is declared wrongly; the message says how to fix it."""


class Reject(SagasError):
    """Raise from a handler to dead-letter the message at once, without retries (a permanent error,
    such as a payload the handler can never process). The message is the reason kept with it."""


class Failure(SagasError):
    """Raise from a request handler (``@svc.handles``) to answer with a failure reply carrying this
    reason, at once and without retries: the saga then compensates (a business failure, such as
    "quota exceeded")."""


class NoReply(SagasError):
    """Raise from a request handler to acknowledge the request without answering it (for example, a
    request this instance must ignore). The saga's deadline re-sends it; nothing is cached."""


class StoreError(SagasError):
    """The store could not be opened or written."""


class NotFound(SagasError, LookupError):
    """An operator asked for a saga or a dead letter that does not exist (the message says which)."""


class SagaCodeError(SagasError):
    """A saga's own code raised (a guard, an action, a request's payload builder), or what it made
    cannot be kept or sent (its data is not JSON, an event it publishes is too large). The worker parks
    that saga in ``failed`` with ``where``, the error and its traceback in the history; every other
    saga goes on."""

    def __init__(self, where: str, error: BaseException, saga_id: str | None) -> None:
        super().__init__(f"{where} raised {type(error).__name__}: {error}".removesuffix(": "))
        self.where = where
        self.error = error
        self.saga_id = saga_id


class ActionRefused(SagasError):
    """An operator action does not apply to the saga as it is now (the message says why, and what
    would apply)."""


__all__ = [
    "ActionRefused",
    "ConfigurationError",
    "Failure",
    "NoReply",
    "NotFound",
    "Reject",
    "SagaCodeError",
    "SagasError",
    "StoreError",
    "TransportError",
]
