"""The clocks of a worker.

Two kinds of time, never mixed:

- **Local waits** (the timer and relay turns, claim renewals, held-back copies, reconnect backoff) run
  on ``time.monotonic()``: they measure intervals inside one process, and a step of the host's clock
  changes none of them.
- **Durable times** (deadlines, claim leases, outbox ages: values stored and compared by every worker)
  read a :class:`SteadyClock`. It starts at the reference time (the database's clock on PostgreSQL,
  the host's clock otherwise) and then advances with the monotonic clock. It looks at the reference
  again every ``resync`` seconds and moves towards it by at most ``max_slew`` of the time that passed
  (5 %: a 300 s step of the reference is absorbed in 100 minutes). So a step of the host's clock, back
  or forward, neither stalls deadlines nor fires them all at once: they run at most 5 % early or late
  while the clock catches up, inside the ±10 % jitter every deadline has anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("sagas.clock")

#: how often a steady clock looks at its reference again (seconds)
RESYNC_SECONDS = 10.0
#: how far a steady clock moves towards its reference, at most, per second that passed
MAX_SLEW = 0.05


class SteadyClock:
    """Wall-clock seconds that follow ``reference`` without ever jumping (see the module's docstring).

    ``reference`` is read once at once, then at most every ``resync`` seconds of ``monotonic``; a
    reference that raises (a database restarting) is skipped until the next look. The clock never goes
    back: it runs at least ``1 - max_slew`` times as fast as ``monotonic``.
    """

    def __init__(
        self,
        reference: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
        *,
        resync: float = RESYNC_SECONDS,
        max_slew: float = MAX_SLEW,
    ) -> None:
        self._reference = reference
        self._monotonic = monotonic
        self.resync = resync
        self.max_slew = max_slew
        now = monotonic()
        self._offset = reference() - now
        self._synced = now
        #: how far the reference is from this clock, as last seen (seconds; positive: the reference is ahead)
        self.behind = 0.0

    def __call__(self) -> float:
        now = self._monotonic()
        if now - self._synced >= self.resync:
            self._sync(now)
        return self._offset + now

    def _sync(self, now: float) -> None:
        elapsed, self._synced = now - self._synced, now
        try:
            target = self._reference() - now
        except Exception as exc:  # noqa: BLE001 - keep running on the monotonic clock; look again later
            log.debug("clock.reference_unavailable", error=repr(exc)[:200])
            return
        gap = target - self._offset
        if abs(gap) > 1.0 and abs(self.behind) <= 1.0:
            log.warning("clock.step_seen", seconds=round(gap, 3), slew=self.max_slew)
        self.behind = gap
        limit = elapsed * self.max_slew
        self._offset += max(-limit, min(limit, gap))
