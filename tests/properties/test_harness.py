"""The harness of sagas.testing: each fault does what it says, runs are reproducible, and it reports
what it cannot settle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from examples.share import Share
from examples.share import app as share_app
from examples.share import effects as share_effects
from sagas import AT_LEAST_ONCE, AT_MOST_ONCE, Event, Service
from sagas.testing import (
    STAGES,
    Crash,
    Delay,
    Drop,
    Duplicate,
    FaultSchedule,
    Harness,
    NotSettled,
    Reorder,
    VirtualClock,
)
from tests.properties.test_saga_properties import EFFECTS, Trip
from tests.properties.test_saga_properties import app as trip_app

#: The type of the ``saga_harness`` fixture (sagas.testing's pytest plugin).
MakeHarness = Callable[..., Harness]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    EFFECTS.clear()
    share_effects.clear()


def _share(h: Harness, share_id: str, grantee: str = "marie") -> Event:
    return h.publish(
        "ocis.sharing.share_requested",
        {"share_id": share_id, "owner": "einstein", "grantee": grantee, "path": "/p", "size": 1},
    )


def test_a_clean_run_completes_without_moving_the_clock(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    start = h.clock()
    _share(h, "s1")
    h.settle()
    assert h.saga(Share, "s1").state == "completed"
    assert h.clock() == start
    assert share_effects == ["reserve s1", "grant s1", "notify s1"]


def test_a_failing_step_compensates_in_reverse_order(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    _share(h, "s2", grantee="nobody")
    h.settle()
    assert h.saga(Share, "s2").state == "compensated"
    assert share_effects == ["reserve s2", "grant s2", "revoke s2", "release s2"]


def test_a_dropped_request_is_sent_again_when_its_deadline_passes(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant")
    start = h.clock()
    _share(h, "s3")
    h.run()
    assert h.saga(Share, "s3").state == "grant"
    h.settle()
    record = h.saga(Share, "s3")
    assert record.state == "completed"
    assert h.stats.dropped == 1
    assert 4.5 <= h.clock() - start <= 5.5, "re-sent at the 5 s deadline (±10 % jitter)"
    assert any("re-sent ocis.sharing.grant" in e.reason for e in h.history(record.id))


def test_a_dropped_reply_does_not_run_the_work_twice(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant.reply")
    _share(h, "s4")
    h.settle()
    assert h.saga(Share, "s4").state == "completed"
    assert share_effects.count("grant s4") == 1, "the re-sent request got the cached reply"


def test_duplicates_are_ignored_by_the_inbox(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    h.inject(Duplicate(copies=3), match="#", times=20)
    _share(h, "s5")
    h.settle()
    assert h.saga(Share, "s5").state == "completed"
    assert share_effects == ["reserve s5", "grant s5", "notify s5"]
    assert h.stats.duplicated >= 10


def test_a_delayed_message_arrives_when_the_clock_gets_there(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    h.inject(Delay(3.0), match="ocis.quota.reserve.reply")
    start = h.clock()
    _share(h, "s6")
    h.run()
    assert h.saga(Share, "s6").state == "reserve_quota"
    h.advance(2.9)
    assert h.saga(Share, "s6").state == "reserve_quota"
    h.advance(0.2)
    assert h.saga(Share, "s6").state == "completed"
    assert h.clock() - start == pytest.approx(3.1)


def test_a_reordered_message_is_overtaken() -> None:
    seen: list[str] = []
    svc = Service("ledger")

    @svc.on("bank.accounts.*", delivery=AT_LEAST_ONCE)
    def record(event: Event) -> None:
        seen.append(event.payload["n"])

    with Harness(svc) as h:
        h.inject(Reorder(after=2), match="bank.accounts.*")
        for n in ("a", "b", "c", "d"):
            h.publish("bank.accounts.opened", {"n": n})
        h.run()
    assert seen == ["b", "c", "a", "d"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_stage_loses_nothing(stage: str, when: str) -> None:
    faults = FaultSchedule(crashes=(Crash(stage, when, 1), Crash(stage, when, 3)))  # type: ignore[arg-type]
    with Harness(trip_app, faults=faults, workers=2) as h:
        for i in range(3):
            h.publish("travel.trips.requested", {"trip": f"t{i}", "fail": "flight" if i == 1 else ""})
        h.settle()
        states = {r.key: r.state for r in h.sagas(Trip)}
        assert states == {"t0": "completed", "t1": "compensated", "t2": "completed"}
        assert sum(h.stats.crashes.values()) == 2
        assert h.stats.restarts == 2


def test_a_fault_schedule_replays_exactly() -> None:
    faults = FaultSchedule(
        messages=(Drop(), Duplicate(), Reorder(2), Delay(7.0), Drop(), Drop()),
        crashes=(Crash("commit", "after", 2), Crash("ack", "before", 5)),
    )

    def run() -> tuple[object, float, dict[str, Any], tuple[tuple[str, str, str], ...]]:
        EFFECTS.clear()
        with Harness(trip_app, faults=faults, workers=2, seed=7) as h:
            for i in range(4):
                h.publish("travel.trips.requested", {"trip": f"t{i}", "fail": ""}, id=f"{i:032x}")
            h.settle()
            histories = sorted(
                (r.key, r.state, [(e.to_state, round(e.at, 6)) for e in h.history(r.id)]) for r in h.sagas(Trip)
            )
            return tuple(histories), h.clock(), h.stats.as_dict(), tuple(sorted(EFFECTS))

    first, second = run(), run()
    assert first == second
    assert first[2]["dropped"] == 3


def test_broker_restart_requeues_what_was_not_acked(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app, workers=2)
    for i in range(3):
        _share(h, f"b{i}")
    h.step(0)
    h.restart_broker()
    h.settle()
    assert {r.state for r in h.sagas(Share)} == {"completed"}
    assert h.stats.broker_restarts == 1


def test_settle_reports_a_saga_that_cannot_end() -> None:
    h = Harness(share_app, auto_restart=False)
    _share(h, "stuck")
    h.run()
    h.crash(0)
    with pytest.raises(NotSettled, match=r"no worker runs|a worker is down"):
        h.settle()
    h.close()


def test_settle_gives_up_after_its_time_limit(saga_harness: MakeHarness) -> None:
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.quota.reserve", times=1000)
    _share(h, "lost")
    with pytest.raises(NotSettled, match="still pending"):
        h.settle(within=3.0)
    # given time, the deadlines run out and the saga ends anyway
    h.settle()
    assert h.saga(Share, "lost").state == "compensated"


def test_a_message_routed_to_two_queues_is_requeued_to_its_own_queue_after_a_crash() -> None:
    """Regression: the memory transport handed both queues one dict, so marking the source queue of
    one delivery moved the other: a crash requeued the at-least-once copy into the at-most-once queue."""
    counts: dict[str, int] = {"alo": 0, "amo": 0}
    svc = Service("mirror")

    @svc.on("files.mirror.copied", delivery=AT_LEAST_ONCE)
    def alo(event: Event) -> None:
        counts["alo"] += 1

    @svc.on("files.mirror.copied", delivery=AT_MOST_ONCE, name="amo")
    def amo(event: Event) -> None:
        counts["amo"] += 1

    with Harness(svc, workers=2, faults=FaultSchedule(crashes=(Crash("ack", "before", 1),))) as h:
        h.publish("files.mirror.copied")
        h.settle()
    assert counts == {"alo": 1, "amo": 1}, "each copy handled once, from its own queue"


def test_the_virtual_clock_only_moves_forward() -> None:
    clock = VirtualClock(100.0)
    clock.advance(5)
    assert clock() == 105.0
    with pytest.raises(Exception, match="does not go back"):
        clock.advance(-1)


def test_a_crash_needs_a_known_stage() -> None:
    with pytest.raises(Exception, match="unknown crash stage"):
        Crash("lunch")  # type: ignore[arg-type]


def test_a_key_starts_a_new_saga_after_its_old_one_is_deleted(tmp_path: Path) -> None:
    """Saga ids are random, so a saga deleted by hand does not leave its id (or its request ids, and the
    participants' cached replies to them) to the next saga with its key."""
    import sqlite3

    db = tmp_path / "s.db"
    with Harness(share_app, store=f"sqlite:///{db}", seed=1) as h:
        _share(h, "again")
        h.settle()
        first = h.saga(Share, "again")
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM saga_history WHERE saga_id = ?", (first.id,))
            conn.execute("DELETE FROM sagas WHERE id = ?", (first.id,))
        _share(h, "again")
        h.settle()
        second = h.saga(Share, "again")
    assert second.id != first.id
    assert second.state == "completed"
    assert share_effects.count("grant again") == 2


def test_a_handler_that_takes_virtual_time_holds_its_message_until_the_clock_gets_there() -> None:
    """With handler_seconds, a call's effect happens when it starts, and its message settles only once the
    clock has moved that far; a crash meanwhile sends the message back, so it runs again."""
    ran: list[str] = []
    svc = Service("slow")

    @svc.on("files.slow.thing")
    def work(event: Event) -> None:
        ran.append(event.id)

    with Harness(svc, handler_seconds={"slow.work": 10.0}) as h:
        event = h.publish("files.slow.thing")
        h.run()
        assert ran == [event.id]
        worker = h.workers[0]
        assert worker is not None
        assert (worker.handled, worker.idle) == (0, False)
        assert h.pending()["handling"] == 1
        h.advance(9.0)
        assert worker.handled == 0
        h.advance(1.0)
        assert (worker.handled, worker.idle) == (1, True)
        assert h.queued() == {}

        second = h.publish("files.slow.thing")
        h.run()
        h.crash(0)  # in the middle of the call: nobody learns it finished
        h.restart(0)
        h.settle()
        assert ran == [event.id, second.id, second.id]


def test_two_workers_run_a_slow_handler_side_by_side() -> None:
    """While one worker's call takes virtual time, another worker takes the next message."""
    started: list[str] = []
    svc = Service("slow")

    @svc.on("files.slow.thing")
    def work(event: Event) -> None:
        started.append(event.payload["n"])

    with Harness(svc, workers=2, handler_seconds=5.0) as h:
        for n in ("a", "b"):
            h.publish("files.slow.thing", {"n": n})
        h.run()
        assert sorted(started) == ["a", "b"]  # both started before the clock moved
        h.settle()
        assert sum(w.handled for w in h.live_workers()) == 2
