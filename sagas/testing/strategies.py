"""Hypothesis strategies for fault schedules (needs ``hypothesis``: ``pip install 'kombu-sagas[testing]'``).

from hypothesis import given
from sagas.testing import Harness
from sagas.testing.strategies import fault_schedules

@given(fault_schedules())
def test_every_share_ends(faults):
    with Harness(app, faults=faults) as h:
        h.publish("ocis.sharing.share_created", {"share_id": "s1"})
        h.settle()
        assert h.saga(Share, "s1").state in ("done", "revoked")
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from ._harness import STAGES, Crash, Delay, Deliver, Drop, Duplicate, FaultSchedule, MessageFault, Reorder, Stage


def message_faults(*, drop: bool = True, max_delay: float = 120.0) -> st.SearchStrategy[MessageFault]:
    """One message's fate. Delivering unchanged is the most likely, so schedules stay realistic and
    shrink towards no faults at all."""
    faults: list[st.SearchStrategy[MessageFault]] = [
        st.just(Deliver()),
        st.builds(Duplicate, copies=st.integers(2, 3)),
        st.builds(Delay, seconds=st.floats(0.1, max_delay, allow_nan=False, allow_infinity=False)),
        st.builds(Reorder, after=st.integers(1, 5)),
    ]
    if drop:
        faults.insert(1, st.just(Drop()))
    return st.one_of(*faults)


def crashes(stages: Sequence[Stage] = STAGES, *, max_nth: int = 30) -> st.SearchStrategy[Crash]:
    """A worker crash before or after the nth time any worker reaches one of ``stages``."""
    return st.builds(
        Crash,
        stage=st.sampled_from(list(stages)),
        when=st.sampled_from(["before", "after"]),
        nth=st.integers(1, max_nth),
    )


def fault_schedules(
    *,
    max_messages: int = 40,
    max_crashes: int = 3,
    drop: bool = True,
    stages: Sequence[Stage] = STAGES,
    max_delay: float = 120.0,
    max_nth: int = 30,
) -> st.SearchStrategy[FaultSchedule]:
    """Schedules of message faults (for the first ``max_messages`` messages) and worker crashes.

    ``drop=False`` leaves out message loss, for properties that only hold without it (an
    at-least-once subscription cannot receive an event the network lost after the broker took it).
    """
    return st.builds(
        FaultSchedule,
        messages=st.lists(message_faults(drop=drop, max_delay=max_delay), max_size=max_messages).map(tuple),
        crashes=st.lists(crashes(stages, max_nth=max_nth), max_size=max_crashes).map(tuple),
    )


__all__ = ["crashes", "fault_schedules", "message_faults"]
