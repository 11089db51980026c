"""The contracts: what a handler is and what a store must do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

#: A handler: ``fn(event)`` or ``fn(event, ctx)``; its return value is ignored.
Handler = TypeVar("Handler", bound=Callable[..., Any])


@runtime_checkable
class InboxStore(Protocol):
    """Remembers which message ids a consumer has handled, so a redelivery can be skipped.

    ``remember`` must be durable when it returns: the message is acked right after it.
    """

    def seen(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` already handled ``message_id``."""
        ...

    def remember(self, consumer: str, message_id: str) -> None:
        """Record that ``consumer`` handled ``message_id``."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...
