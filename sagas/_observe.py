"""The observation seam: what the worker and its pipelines tell an observer as they go.

The worker and its pipelines call an :class:`Observer` at the points that matter (a message's
outcome, a saga's transition, a deadline fired, a request re-sent, a publish confirmed, the
connection going up or down, a turn of the I/O loop). The default, :data:`NULL_OBSERVER`, does
nothing; :mod:`sagas._metrics` (the ``metrics`` extra) implements it with Prometheus metrics and
health probes. Every call is made on the worker's I/O thread and must not block or raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from transport import Subscription

#: connection states given to :meth:`Observer.connection`
UP, DOWN, RECONNECTED = "up", "down", "reconnected"


class Observer(Protocol):
    """What a worker reports as it runs (every method is called on the worker's I/O thread)."""

    def consuming(self, subscriptions: Sequence[Subscription]) -> None:
        """The worker consumes these queues (each with its prefetch)."""

    def message(self, service: str, handler: str, event_type: str, outcome: str, duration: float | None) -> None:
        """A message was settled: ``outcome`` is ``ok``, ``retry``, ``dead-letter``, ``kept-unacked`` for
        a handler, or the saga pipeline's outcome (``moved``, ``duplicate``, ``refused``...) for a saga
        (``service`` is then the saga type, ``handler`` ``saga``, ``duration`` None)."""

    def transition(self, saga_type: str, from_state: str, to_state: str, final: bool) -> None:
        """A saga moved (``from_state`` is ``-`` for a saga that started); ``final``: it ended there."""

    def deadline_fired(self, saga_type: str) -> None:
        """A saga's deadline passed and was acted on (a re-send, a wait, or a timeout)."""

    def request_resent(self, saga_type: str, request_type: str) -> None:
        """A deadline re-sent a saga's request."""

    def published(self, count: int, seconds: float) -> None:
        """``count`` messages were published and confirmed by the broker in ``seconds``."""

    def connection(self, state: str) -> None:
        """The broker connection is ``up``, ``down`` (lost, or an attempt to connect failed) or
        ``reconnected`` (up again after it was lost)."""

    def turn(self, inflight: int, ready: int) -> None:
        """The I/O loop turned: ``inflight`` messages are being handled, ``ready`` wait to start."""


class NullObserver:
    """Observes nothing (the default)."""

    def consuming(self, subscriptions: Sequence[Subscription]) -> None:
        pass

    def message(self, service: str, handler: str, event_type: str, outcome: str, duration: float | None) -> None:
        pass

    def transition(self, saga_type: str, from_state: str, to_state: str, final: bool) -> None:
        pass

    def deadline_fired(self, saga_type: str) -> None:
        pass

    def request_resent(self, saga_type: str, request_type: str) -> None:
        pass

    def published(self, count: int, seconds: float) -> None:
        pass

    def connection(self, state: str) -> None:
        pass

    def turn(self, inflight: int, ready: int) -> None:
        pass


#: the observer of a worker that was given none
NULL_OBSERVER: Observer = NullObserver()

__all__ = ["DOWN", "NULL_OBSERVER", "RECONNECTED", "UP", "NullObserver", "Observer"]
