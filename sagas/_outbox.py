"""The one outbox publisher: committed outbox rows to the broker, with confirms, then marked sent.

A saga's state change and the messages it sends are committed together (the outbox). Every process
that commits rows publishes them the same way: the worker right after a group of saga messages or
deadlines, its relay for rows a crash left unsent, and an operator's action through
:class:`sagas.operations.Operations`.

Rows are published with pipelined confirms, and marked sent only once the broker confirmed them. A
request that no queue is bound to receive cannot be answered: its saga's step fails at once (the
engine decides where that leads), instead of waiting out every retry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from transport import ConnectionLost, EventBus, PublishError

from ._observe import NULL_OBSERVER, Observer
from ._saga_engine import SagaEngine
from ._store import OutboxRow, Store

log = structlog.get_logger("sagas.outbox")

#: rounds of "publish, then fail the unroutable requests' steps, publish what that committed"
_ROUNDS = 10


class OutboxPublisher:
    """Publishes committed outbox rows on ``bus`` and marks them sent in ``store``.

    Without an ``engine``, an unroutable request is only logged (its saga's deadline takes over).
    """

    def __init__(
        self, bus: EventBus, store: Store, engine: SagaEngine | None = None, *, observer: Observer = NULL_OBSERVER
    ) -> None:
        self.bus = bus
        self.store = store
        self.engine = engine
        self.observer = observer

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish ``rows``, wait for the confirms, mark them sent.

        Raises :class:`~transport.ConnectionLost` if the connection broke, and
        :class:`~transport.PublishError` if the broker refused or did not confirm a message; then
        nothing is marked sent, and the relay publishes the rows again later (receivers' inboxes drop
        the repeats).
        """
        pending = list(rows)
        for _ in range(_ROUNDS):
            if not pending:
                return
            failed: dict[str, str] = {}
            try:
                t0 = time.perf_counter()
                self.bus.publish_encoded([(r.routing_key, r.body.encode(), r.message_id, r.mandatory) for r in pending])
                self.observer.published(len(pending), time.perf_counter() - t0)
            except ConnectionLost:
                raise
            except PublishError as exc:
                if not self.bus.connected:
                    raise ConnectionLost(str(exc)) from None
                failed = exc.failed
                if not failed or any(not reason.startswith("unroutable") for reason in failed.values()):
                    raise
            self.store.mark_sent([r.id for r in pending])
            pending = self._unroutable([r for r in pending if r.message_id in failed])

    def relay(self, created_before: float) -> None:
        """Publish rows committed before ``created_before`` and still unsent (a crash or an outage
        stopped their first publish)."""
        self.publish(self.store.unsent(created_before=created_before))

    def _unroutable(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Fail the saga step of each request nobody is bound to receive; return the rows that commits."""
        more: list[OutboxRow] = []
        for r in rows:
            log.warning("saga.request_unroutable", saga_id=r.saga_id, request=r.routing_key)
            if self.engine is not None:
                reason = f"no service is bound to receive {r.routing_key}"
                more += self.engine.request_unroutable(r.saga_id, r.message_id, reason)
        return more
