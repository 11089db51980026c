"""asyncio support: read and wait for sagas from an asyncio application (``SagasClient``)."""

from ._client import SagasClient, SagaStatus, WaitTimeout

__all__ = ["SagaStatus", "SagasClient", "WaitTimeout"]
