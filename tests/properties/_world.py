"""What the world does to a harness, as hypothesis rules shared by the property tests: crashes armed
at any stage, workers stepped in any interleaving, killed and started, the broker restarted, the
clock moved. A machine sets ``self.h`` (a Harness with ``auto_restart=False``) and adds its own
publishing and message-fault rules."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from sagas.testing import Harness, VirtualClock
from sagas.testing.strategies import crashes
from tests import report

WORKERS = 2


def report_run(h: Harness, scenario: str, **figures: int) -> None:
    """Add one example's figures to the test report: the faults ``h`` injected, the virtual time it took,
    and the machine's own ``figures``."""
    s = h.stats
    report.add(
        scenario,
        examples=1,
        messages=s.published,
        dropped=s.dropped,
        duplicated=s.duplicated,
        delayed=s.delayed,
        reordered=s.reordered,
        worker_crashes=sum(s.crashes.values()),
        broker_restarts=s.broker_restarts,
        virtual_seconds=round(h.clock() - VirtualClock().now),
        **figures,
    )


class FaultyWorld(RuleBasedStateMachine):
    h: Harness

    @rule(crash=crashes(max_nth=4))
    def arm_crash(self, crash: Any) -> None:
        self.h.arm(crash)

    @rule(slot=st.integers(0, WORKERS - 1), steps=st.integers(1, 20))
    def step(self, slot: int, steps: int) -> None:
        for _ in range(steps):
            self.h.step(slot)

    @rule(seconds=st.floats(0.0, 60.0))
    def advance(self, seconds: float) -> None:
        self.h.advance(seconds)

    @rule(slot=st.integers(0, WORKERS - 1))
    def kill_worker(self, slot: int) -> None:
        self.h.crash(slot)

    @rule(slot=st.integers(0, WORKERS - 1))
    def start_worker(self, slot: int) -> None:
        if self.h.workers[slot] is None:
            self.h.start_worker(slot)

    @rule()
    def restart_broker(self) -> None:
        self.h.restart_broker()

    def stop_faults_and_settle(self) -> None:
        """The faults stop, every worker runs again, and the clock moves on until nothing is pending."""
        h = self.h
        h.stop_faults()
        for slot, worker in enumerate(h.workers):
            if worker is None:
                h.start_worker(slot)
        h.auto_restart = True
        try:
            h.settle()
        finally:
            h.auto_restart = False
