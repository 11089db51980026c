"""Stateful property test of the two delivery guarantees under faults (DESIGN: "Guarantees").

Hypothesis publishes events to a service with an at-least-once handler (which fails the first
attempt of some events, so retries through the delay queue are part of the run) and an at-most-once
handler, while it duplicates, delays and reorders messages, crashes workers before or after any
side effect, restarts them and the broker, and moves the clock. Then the faults stop and:

- the at-least-once handler has received every published event, at least once;
- an idempotent at-least-once handler has run once per event id, except where a crash fell between
  its run and its inbox commit;
- the at-most-once handler has received no event more often than it was put on the bus (a network
  duplicate is a second publish; the bus itself never redelivers).

Message *loss* is left out here: an at-least-once subscription promises delivery of what the broker
took, and a message the network loses after the broker confirmed it is outside that promise. (Sagas
are tested with loss in test_saga_properties.py: their deadlines recover it.)
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import structlog
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from sagas import AT_LEAST_ONCE, AT_MOST_ONCE, Event, Retry, Service
from sagas.testing import Harness
from sagas.testing.strategies import message_faults
from tests import report
from tests.properties._world import WORKERS, FaultyWorld

archive = Service("archive")
ALO: Counter[str] = Counter()
AMO: Counter[str] = Counter()
IDEMPOTENT: Counter[str] = Counter()


@archive.on("media.files.*", delivery=AT_LEAST_ONCE, retry=Retry(attempts=5, initial=1.0, factor=2.0))
def keep(event: Event) -> None:
    ALO[event.id] += 1
    if event.payload.get("flaky") and ALO[event.id] == 1:
        raise ConnectionError("the archive is busy")


@archive.on("media.files.*", delivery=AT_MOST_ONCE, name="preview")
def preview(event: Event) -> None:
    AMO[event.id] += 1


@archive.on("media.files.*", idempotent=True, name="index")
def index(event: Event) -> None:
    IDEMPOTENT[event.id] += 1


class EventFaults(FaultyWorld):
    def __init__(self) -> None:
        super().__init__()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        ALO.clear()
        AMO.clear()
        IDEMPOTENT.clear()
        self.h = Harness(archive, workers=WORKERS, auto_restart=False)
        self.published: list[str] = []

    def teardown(self) -> None:
        try:
            self.faults_stop_and_everything_arrives()
            s = self.h.stats
            report.add(
                "events under any fault schedule (hypothesis)",
                examples=1,
                events_published=len(self.published),
                at_least_once_handled=sum(ALO.values()),
                at_least_once_lost=sum(1 for i in self.published if not ALO[i]),
                at_most_once_handled=sum(AMO.values()),
                idempotent_handled_again=sum(n - 1 for n in IDEMPOTENT.values()),
                duplicated=s.duplicated,
                delayed=s.delayed,
                reordered=s.reordered,
                worker_crashes=sum(s.crashes.values()),
                broker_restarts=s.broker_restarts,
            )
        finally:
            self.h.close()

    @rule(kind=st.sampled_from(["uploaded", "moved"]), flaky=st.booleans(), n=st.integers(1, 5))
    def publish(self, kind: str, flaky: bool, n: int) -> None:
        for _ in range(n):
            self.published.append(self.h.publish(f"media.files.{kind}", {"flaky": flaky}).id)

    @rule(fault=message_faults(drop=False), times=st.integers(1, 3))
    def message_fault(self, fault: Any, times: int) -> None:
        self.h.inject(fault, times=times)

    @invariant()
    def at_most_once_never_redelivers(self) -> None:
        copies = self.h.network.copies
        assert all(n <= copies[event_id] for event_id, n in AMO.items()), (AMO, copies)

    @invariant()
    def an_idempotent_handler_runs_once_per_event(self) -> None:
        again = sum(n - 1 for n in IDEMPOTENT.values())
        window = self.h.stats.at_risk
        assert again <= window, f"{again} event(s) handled again, with {window} run(s) caught in the window"

    @rule()
    def faults_stop_and_everything_arrives(self) -> None:
        self.stop_faults_and_settle()
        h = self.h
        for handled in (ALO, IDEMPOTENT):
            missing = [i for i in self.published if handled[i] == 0]
            assert not missing, f"{len(missing)} of {len(self.published)} events never reached a handler"
        assert not h.dead_letters(), [d.reason for d in h.dead_letters()]
        self.at_most_once_never_redelivers()


TestEventFaults = EventFaults.TestCase
