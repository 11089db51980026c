"""Late successes: a participant's success that arrives after the saga stopped waiting on it (an operator's
retry replaced the request, or the step timed out) still left an effect, which a compensated saga must
undo; and the late success of a step the saga already counted must undo nothing.

Deterministic runs of the harness on the ledger participants of tests/properties/test_ledger_properties.py:
per-step idempotent, each run recorded in ``LEDGER`` and ``PRESENT``, and a slow call commits its
effect when it ends (see ``LedgerHarness``).
"""

from __future__ import annotations

import logging

import pytest
import structlog

from sagas import App, HistoryEntry, Service, Start, StepSaga
from sagas.testing import Delay, Harness
from tests.properties.test_ledger_properties import (
    LEDGER,
    PRESENT,
    WORLD,
    Ledger2,
    Ledger3,
    LedgerHarness,
    app,
    make_steps,
    serve,
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _ledger(key: str, step: str | None = None) -> list[str]:
    return [f"{e.action} {e.step}" for e in LEDGER if e.key == key and (step is None or e.step == step)]


def _retry_on_the_free_worker(h: Harness, saga_id: str) -> None:
    """The operator retries; the worker that is not busy with the slow call takes the new request first
    (the busy one would take it into its buffer, and only start it once the slow call has ended)."""
    busy = {p.slot for p in WORLD.pending}
    assert len(busy) == 1, busy
    free = next(slot for slot in range(len(h.workers)) if slot not in busy)
    h.operations.retry(saga_id, actor="prop")
    for _ in range(3):
        h.step(free)
    h.run()


def _late(history: list[HistoryEntry]) -> list[str]:
    return [f"{e.from_state} -> {e.to_state}: {e.reason}" for e in history if "late" in e.reason.lower()]


def test_an_operator_retry_never_brings_an_effect_back_after_its_compensation() -> None:
    """Step 2's first call takes 30 s (past its 5 s timeout: the saga waits on it, being handled). The
    operator retries: a new request, answered at once; step 3 fails, so step 2 and step 1 are undone and
    the saga ends compensated. Then the first call of step 2 ends, and its effect is in place again: its
    success is late, and must be compensated too."""
    h = LedgerHarness(app, workers=2, auto_restart=False)
    try:
        h.publish("ledger.runs3.requested", {"run": "a", "fail": "s3", "slow": "s2", "slow_for": 30.0})
        h.run()
        h.advance(6.0)  # past step 2's deadline: its first call is still running
        saga = h.saga(Ledger3, "a")
        assert saga.state == "s2"
        assert _ledger("a") == ["do s1"]  # (step 2's first call commits when it ends)
        _retry_on_the_free_worker(h, saga.id)
        assert h.saga(Ledger3, "a").state == "compensated"
        h.settle()  # the first call of step 2 ends, and its success reply arrives
        saga = h.saga(Ledger3, "a")
        history = h.history(saga.id)
    finally:
        h.close()
    assert saga.state == "compensated"
    assert not PRESENT[("a", "s2")], ("step 2's effect is back after its compensation", _ledger("a"))
    assert _ledger("a", "s2") == ["do s2", "undo s2", "do s2", "undo s2"]
    assert _late(history), [f"{e.from_state} -> {e.to_state}: {e.reason}" for e in history]


class Unsure(StepSaga):
    """Three steps; step 2 is taken not to have been done when its retries run out without a reply
    (``assume_not_done``), or compensated then (``compensate``, the default)."""

    type = "ledger_unsure"
    start = Start("ledger.unsure.requested", key="run")
    steps = make_steps("u", 3, assume_not_done=("s2",))


class Sure(StepSaga):
    type = "ledger_sure"
    start = Start("ledger.sure.requested", key="run")
    steps = make_steps("c", 3)


_unsure, _sure = Service("unsure"), Service("sure")
serve(_unsure, Unsure.steps)
serve(_sure, Sure.steps)
unsure_app = App(_unsure, _sure, sagas=[Unsure, Sure])


@pytest.mark.parametrize(
    ("saga", "start", "reply"),
    [
        pytest.param(Unsure, "ledger.unsure.requested", "ledger.us2.do.reply", id="assume_not_done"),
        pytest.param(Sure, "ledger.sure.requested", "ledger.cs2.do.reply", id="compensate"),
    ],
)
def test_a_late_reply_after_a_timeout_is_compensated(saga: type[StepSaga], start: str, reply: str) -> None:
    """Step 2 runs at once, but every copy of its success reply is delayed 300 s, past its retries (about
    35 s): the step times out and the saga compensates. Then the success arrives: step 2's effect must
    not stay in place, and the history says what the late success did."""
    h = LedgerHarness(unsure_app, workers=2, auto_restart=False)
    try:
        h.inject(Delay(seconds=300.0), match=reply, times=10)
        h.publish(start, {"run": "b"})
        h.advance(100.0)
        assert h.saga(saga, "b").state == "compensated"  # timed out; the replies are still on their way
        h.settle()
        record = h.saga(saga, "b")
        history = h.history(record.id)
    finally:
        h.close()
    assert record.state == "compensated"
    assert not PRESENT[("b", "s2")], ("step 2's effect stays after its late success", _ledger("b"))
    assert _late(history), [f"{e.from_state} -> {e.to_state}: {e.reason}" for e in history]


def test_a_late_success_of_a_counted_step_is_not_compensated() -> None:
    """Step 1's first call takes 30 s; the operator retries it and the new request answers at once, so
    the saga completes. The first call's success arrives late, for a step already counted: it undoes
    nothing."""
    h = LedgerHarness(app, workers=2, auto_restart=False)
    try:
        h.publish("ledger.runs2.requested", {"run": "c", "slow": "s1", "slow_for": 30.0})
        h.run()
        h.advance(6.0)
        saga = h.saga(Ledger2, "c")
        assert saga.state == "s1"
        _retry_on_the_free_worker(h, saga.id)
        assert h.saga(Ledger2, "c").state == "completed"
        h.settle()
        record = h.saga(Ledger2, "c")
    finally:
        h.close()
    assert record.state == "completed"
    assert PRESENT[("c", "s1")]
    assert PRESENT[("c", "s2")]
    assert _ledger("c") == ["do s1", "do s2", "do s1"], "no compensation runs"
