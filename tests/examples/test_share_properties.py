"""Property-testing a saga with sagas.testing: the share example under any fault schedule.

This is the file docs/testing.md walks through: a user's test of their own saga.
"""

from __future__ import annotations

import logging

import structlog
from hypothesis import given
from hypothesis import strategies as st

from examples.share import Share, app, effects
from sagas.testing import FaultSchedule, Harness
from sagas.testing.strategies import fault_schedules

grantees = st.lists(st.sampled_from(["marie", "richard", "nobody"]), min_size=1, max_size=4)


@given(faults=fault_schedules(), grantees=grantees)
def test_every_share_ends_and_undoes_what_it_did(faults: FaultSchedule, grantees: list[str]) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    effects.clear()
    with Harness(app, faults=faults, workers=2) as h:
        for i, grantee in enumerate(grantees):
            h.publish(
                "ocis.sharing.share_requested",
                {"share_id": f"s{i}", "owner": "einstein", "grantee": grantee, "path": "/p", "size": 1},
            )
        h.settle()  # the faults are spent; move the clock until nothing is pending

        for i, grantee in enumerate(grantees):
            saga = h.saga(Share, f"s{i}")
            did = list(dict.fromkeys(e.split()[0] for e in effects if e.endswith(f" s{i}")))
            if saga.state == "completed":
                assert did == ["reserve", "grant", "notify"]
                continue
            assert grantee == "nobody" or h.stats.dropped or h.stats.delayed, "did not complete, with no cause"
            steps = ["reserve_quota", "grant", "notify"]
            completed = [s["step"] for s in saga.meta.get("steps", [])]
            assert completed == steps[: len(completed)]
            # the step that did not complete: only notify answers with a failure (for "nobody"); the
            # others did not complete because no reply came back, so their outcome is unknown
            unknown = steps[len(completed) : len(completed) + 1]
            undo = {"reserve_quota": "release", "grant": "revoke"}
            expected = [undo[s] for s in reversed(completed + unknown) if s in undo]
            undone = [e for e in did if e in ("revoke", "release")]
            if saga.state == "compensated":
                # the steps that completed and the one whose outcome is unknown are undone, the last one
                # first; so nothing done stays done
                assert undone == expected
                assert "grant" not in did or "revoke" in undone
                assert "reserve" not in did or "release" in undone
            else:
                # parked: every attempt of a compensation was lost or late; what was undone so far is
                # the start of that order, and an operator takes the saga from there
                assert saga.state == "failed", saga.state
                assert saga.meta["failed_from"].startswith("undo_"), saga.meta
                assert h.stats.dropped or h.stats.delayed, "a compensation failed with no cause"
                assert undone == expected[: len(undone)]
