"""Pruning never removes anything still needed: the saga properties, with prunes interleaved.

Hypothesis drives a :class:`sagas.testing.Harness` running two workers of the trip-booking app of
``test_saga_properties`` under short retention windows (seconds) that pass the app's validation. It
starts trips, re-sends start events within the dedup window (the redelivery horizon), injects message
faults (drop, duplicate, delay up to 120 s, reorder), arms crashes, kills workers, steps the workers,
moves the clock by up to several windows, and prunes the store at any moment. Crashed and killed
workers restart at once, so no message waits in a queue longer than the faults delay it: the world
keeps to the horizon (a run that broke it, both workers down for 485 s, did start a second saga, as
documented for a copy that comes back after the window). Then the
faults stop, the clock moves on and:

- every saga reaches a final state, and its compensations are the right ones (as in
  ``test_saga_properties``), also for sagas the pruner has deleted since (checked on their last state);
- no participant effect applies twice, outside the crash window no framework can close;
- a start event delivered again within the dedup window (the same event, or a new one with the same
  key) never starts a second saga;
- no saga handles the same message twice;
- and the prunes did prune: after one more window nothing but parked sagas is left in the store.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import structlog
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from sagas import App, Event, Retention
from sagas._store import MemoryStore, PruneCutoffs
from sagas.testing import Harness
from sagas.testing.strategies import message_faults
from tests.properties import test_saga_properties as trips
from tests.properties._world import FaultyWorld, report_run

#: short windows that pass the app's validation: the trips' requests re-send for at most ~158 s
SHORT = Retention(finished=600, inbox=300, outbox_sent=1, replies=300)
#: the saga properties' own checks, over this world's effects and sagas
check_effects = trips._check_effects  # noqa: SLF001 - the same checks as test_saga_properties, not a copy
check_compensations = trips._check_compensations  # noqa: SLF001 - (as above)
app = App(trips.hotels, trips.cars, trips.flights, sagas=[trips.Trip], retention=SHORT)


class PruningWorld(FaultyWorld):
    def __init__(self) -> None:
        super().__init__()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        trips.EFFECTS.clear()
        trips.BROKEN.clear()
        self.store = MemoryStore()
        self.h = Harness(app, workers=2, store=self.store, auto_restart=True)
        self.trips: dict[str, str] = {}
        #: each trip's start event and when it was first published
        self.starts: dict[str, tuple[Event, float]] = {}
        #: every saga seen, by trip: its id, and its last state and metadata
        self.seen: dict[str, tuple[str, str, dict[str, Any]]] = {}
        self.pruned: Counter[str] = Counter()
        self.next_trip = 0

    def teardown(self) -> None:
        try:
            self.every_saga_ends_and_the_store_empties()
            report_run(
                self.h,
                "sagas under any fault schedule, with prunes (hypothesis)",
                sagas_started=len(self.seen),
                sagas_pruned=self.pruned["sagas"],
                inbox_pruned=self.pruned["inbox"],
                replies_pruned=self.pruned["reply_cache"],
                effects_applied_again=sum(n - 1 for n in Counter(e[2] for e in trips.EFFECTS).values()),
            )
        finally:
            self.h.close()

    # -- what the world does ---------------------------------------------------------------------

    @initialize(fail=st.sampled_from(["", "car", "flight"]))
    def first_trip(self, fail: str) -> None:
        self.start_trip(fail, duplicate=False)

    @rule(fail=st.sampled_from(["", "car", "flight"]), duplicate=st.booleans())
    def start_trip(self, fail: str, duplicate: bool) -> None:
        key = f"trip-{self.next_trip}"
        self.next_trip += 1
        self.trips[key] = fail
        event = self.h.publish("travel.trips.requested", {"trip": key, "fail": fail})
        self.starts[key] = (event, self.h.clock())
        if duplicate:
            self.h.send(event)

    @rule(data=st.data())
    def start_event_again_within_the_window(self, data: st.DataObject) -> None:
        """A copy of a start event, delivered again within the dedup window (the redelivery horizon)."""
        now = self.h.clock()
        recent = sorted(k for k, (_, at) in self.starts.items() if now - at < SHORT.inbox - 120)
        if recent:
            self.h.send(self.starts[data.draw(st.sampled_from(recent))][0])

    @rule(data=st.data())
    def start_again_with_a_new_id_within_the_window(self, data: st.DataObject) -> None:
        """A publisher that sends a trip's start event again, as a new event, within the dedup window: the
        saga's key (kept while its ended saga is) makes it a duplicate."""
        now = self.h.clock()
        recent = sorted(k for k, (_, at) in self.starts.items() if now - at < SHORT.inbox - 120)
        if recent:
            key = data.draw(st.sampled_from(recent))
            self.h.publish("travel.trips.requested", {"trip": key, "fail": self.trips[key]})

    @rule(fault=message_faults(max_delay=120.0), match=st.sampled_from(trips.TRIP_MATCHES), times=st.integers(1, 3))
    def message_fault(self, fault: Any, match: str, times: int) -> None:
        self.h.inject(fault, match=match, times=times)

    @rule(seconds=st.floats(0.0, 700.0))
    def advance_far(self, seconds: float) -> None:
        self.h.advance(seconds)

    @rule(slot=st.integers(0, 1))
    def kill_worker(self, slot: int) -> None:
        """A worker is killed and comes back at once (here, no message outwaits the horizon in a queue
        that no worker consumes: one that does is handled again, as documented)."""
        self.h.crash(slot)
        if self.h.workers[slot] is None:
            self.h.start_worker(slot)

    @rule()
    def prune(self) -> None:
        self.pruned.update(self.h.prune())

    # -- what must always hold -------------------------------------------------------------------

    @invariant()
    def one_saga_per_trip_and_no_message_twice(self) -> None:
        for record in self.h.sagas(trips.Trip):
            first = self.seen.setdefault(record.key, (record.id, record.state, record.meta))
            assert first[0] == record.id, f"trip {record.key} started a second saga"
            self.seen[record.key] = (record.id, record.state, record.meta)
            ids = [e.message_id for e in self.h.history(record.id)]
            assert len(ids) == len(set(ids)), (record.key, ids)

    @invariant()
    def effects_apply_once_outside_the_crash_window(self) -> None:
        check_effects(self.h.stats)

    # -- once the faults stop and the clock moves on ------------------------------------------------

    def every_saga_ends_and_the_store_empties(self) -> None:
        self.stop_faults_and_settle()
        h = self.h
        self.one_saga_per_trip_and_no_message_twice()
        for key, (_, state, meta) in self.seen.items():
            assert state in ("completed", "compensated", "failed"), (key, state)
            if state == "failed" and "raised" in str(meta):
                continue
            check_compensations(key, state, meta, self.trips[key], h.stats)
        check_effects(h.stats)
        # one more window (no message is in flight any more): the pruner leaves only the parked sagas
        h.advance(SHORT.finished + 1)
        self.pruned.update(h.prune())
        left = self.store.prune_counts(SHORT.cutoffs(h.clock()))
        assert not any(left.values()), left
        assert all(r.state == "failed" for r in h.sagas(trips.Trip))
        every_row = PruneCutoffs(finished=h.clock(), inbox=math.inf, outbox_sent=math.inf, replies=math.inf)
        left = self.store.prune_counts(every_row)
        assert left["inbox"] == left["reply_cache"] == left["outbox"] == 0, left
        assert len(h.sagas(trips.Trip)) + self.pruned["sagas"] == len(self.seen)


TestPruningWorld = PruningWorld.TestCase
