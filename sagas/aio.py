"""asyncio support: publish events from an asyncio application without blocking its event loop, and
read and wait for sagas (``SagasClient``).

``AsyncPublisher`` is the transport's (see :mod:`transport`); :func:`lifespan` starts and closes such
resources with a Starlette or FastAPI application.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from transport import AsyncPublisher, EventLoopMismatch, PublisherClosed

from ._client import SagasClient, SagaStatus, WaitTimeout

__all__ = [
    "AsyncPublisher",
    "AsyncResource",
    "EventLoopMismatch",
    "PublisherClosed",
    "SagaStatus",
    "SagasClient",
    "WaitTimeout",
    "lifespan",
]


class AsyncResource(Protocol):
    """Anything with ``async start()`` and ``async close()``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def lifespan(*resources: AsyncResource) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A Starlette/FastAPI ``lifespan``: starts ``resources`` in order when the application starts, and
    closes those it started, in reverse order, when it stops (also when a later start failed)::

        pub = AsyncPublisher("amqp://guest:guest@localhost//")
        app = Starlette(routes=routes, lifespan=lifespan(pub))
    """

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        started: list[AsyncResource] = []
        try:
            for resource in resources:
                await resource.start()
                started.append(resource)
            yield
        finally:
            for resource in reversed(started):
                await resource.close()

    return run
