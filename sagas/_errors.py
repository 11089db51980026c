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


class StoreError(SagasError):
    """The store could not be opened or written."""


__all__ = ["ConfigurationError", "Reject", "SagasError", "StoreError", "TransportError"]
