"""The overview, read in the background and served from memory.

Counting every saga by state reads the whole table (about half a second on 1,000,000 sagas in
PostgreSQL), so pages do not wait for it: a page gets the last overview read, with its time, and an overview
older than its time to live is read again in the background (a page waits only for the first one, and
after nobody looked for a while: for one older than three times its time to live). The time to live grows
with what a read costs (ten times its duration), so the console never spends more than about a tenth
of the store's time on it, however large the store. A read that fails is not hidden behind the old
overview: the next page reads again itself, and shows the error.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ..operations import Overview

log = structlog.get_logger("sagas.console")

#: How long an overview is served, at least, as a multiple of what its read took.
COST_FACTOR = 10.0


class OverviewCache:
    """The last overview ``read`` gave, and when to read it again (``ttl`` seconds at least)."""

    def __init__(self, read: Callable[[], Overview], *, ttl: float, clock: Callable[[], float]) -> None:
        self._read = read
        self.ttl = ttl
        self._clock = clock
        self.last: Overview | None = None
        #: what the last read raised, if it failed (the next page then reads itself)
        self.failure: str | None = None
        self.cost = 0.0

    @property
    def lifetime(self) -> float:
        """How long the last overview is served before it is read again."""
        return max(self.ttl, COST_FACTOR * self.cost)

    def due(self) -> bool:
        """Whether the overview should be read again (none yet, too old, or from a clock that went back)."""
        return not self._younger_than(self.lifetime)

    def stale(self) -> bool:
        """Whether the last overview is too old to show while a newer one is read (older than three
        lifetimes: a console nobody looked at for a while reads it again before the page shows it)."""
        return not self._younger_than(3 * self.lifetime)

    def _younger_than(self, seconds: float) -> bool:
        """Whether there is an overview, read less than ``seconds`` ago by a clock that did not go back."""
        return self.last is not None and 0 <= self._clock() - self.last.as_of < seconds

    def refresh(self) -> Overview:
        """Read the overview now (on the console's worker thread), keep it, and return it."""
        started = self._clock()
        try:
            fresh = self._read()
        except Exception as exc:
            self.failure = str(exc) or type(exc).__name__
            raise
        self.cost = max(0.0, self._clock() - started)
        self.last, self.failure = fresh, None
        return fresh

    def refresh_quietly(self) -> None:
        """:meth:`refresh` in the background: a failure is kept in :attr:`failure`, for the next page."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - kept in self.failure: the next page reads again and shows it
            log.warning("console.overview_failed", error=str(exc) or type(exc).__name__)
