"""The observation seam: what the worker and its pipelines tell an observer as they go.

The worker and its pipelines call an :class:`Observer` at the points that matter (a message's
outcome, a saga's transition, a deadline fired, a request re-sent, a publish confirmed, the
connection going up or down, a turn of the I/O loop). The default, :data:`NULL_OBSERVER`, does
nothing; :mod:`sagas._metrics` (the ``metrics`` extra) implements it with Prometheus metrics and
health probes. Every call is made on the worker's I/O thread and must not block or raise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

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


class _Groups(Protocol):
    def group(self) -> contextlib.AbstractContextManager[None]: ...


class AfterCommit:
    """Holds back what is observed inside store groups until the outermost group has committed.

    A saga's transition, a deadline fired or a request re-sent happen inside a store group; when the
    group's commit fails, nothing of it happened, and the work is redone (the message comes back, the
    deadline is still due): reported at once, it would count twice. :meth:`group` wraps
    :meth:`Store.group`: calls given to :meth:`report` inside it wait, are dropped with a group (outer or
    inner, which rolls back alone) that raises, and are made once the outermost group has committed.
    Outside any group, :meth:`report` calls at once (the store commits each write by itself)."""

    __slots__ = ("_depth", "_pending")

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._depth = 0

    @contextlib.contextmanager
    def group(self, store: _Groups) -> Iterator[None]:
        """``store.group()``, with the calls reported inside it held until the outermost one commits."""
        mark = len(self._pending)
        self._depth += 1
        try:
            with store.group():
                yield
        except BaseException:
            del self._pending[mark:]  # rolled back: what it observed did not happen
            raise
        finally:
            self._depth -= 1
        if not self._depth and self._pending:
            pending, self._pending = self._pending, []
            for call, args in pending:
                call(*args)

    def report(self, call: Callable[..., None], *args: Any) -> None:
        """``call(*args)`` once the current group commits, or now outside any group."""
        if self._depth:
            self._pending.append((call, args))
        else:
            call(*args)


__all__ = ["DOWN", "NULL_OBSERVER", "RECONNECTED", "UP", "AfterCommit", "NullObserver", "Observer"]
