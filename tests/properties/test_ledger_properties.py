"""Stateful property test of the compensation "ledger rule": whatever the faults and the operator did, a
step saga leaves in place exactly the effects its final state says it left.

Hypothesis drives a :class:`sagas.testing.Harness` (two workers, through :class:`FaultyWorld`: crashes,
worker kills and starts, broker restarts, stepping, clock moves) running step sagas of 2, 3, 4 and 5
steps. It starts runs (some told to fail at one step, some with a slow first call of one step, some with
a duplicated start event), injects message faults (drop, duplicate, reorder, and delays of up to 120 s,
well past the steps' 5 s timeouts, so replies arrive late), and acts as an operator at random points:
``retry`` and ``compensate`` on a random saga (refused with ``ActionRefused`` or ``NotFound`` when they
do not apply). Then the faults stop, every worker runs, the clock moves on, and for every saga:

- it is final;
- ``completed``: every step's effect is present and no compensation ran for it;
- ``compensated``: no effect is left in place: for every step, the last ledger entry is not "do";
- ``failed``: ``meta["compensation"]["not_undone"]`` lists every step whose effect is present, and no
  step in ``meta["compensation"]["undone"]`` is present;
- no saga handles a message twice, and one saga runs per key.

**Effects the saga cannot know of** (the one exception, counted and reported as ``unknowable_*``). The
saga learns of an effect only through a reply, and a reply's id is derived from its request id (and
the handler): every run of one request answers with one message id, which the saga handles once. A
step's effect left in place is put there by the "do" runs since its last "undo"; it is allowed only
when the saga can know of none of them, each for one of two reasons (``Network.copies`` counts the
copies of a message id that reached the broker; each "do" notes that count for its reply id):

- ``reply_lost``: no copy of the run's reply reached the broker after the run: the network lost every
  reply (or the worker died before it answered, and no later run answered for it);
- ``rerun``: a copy of the run's reply had reached the broker *before* the run: it is a second run of a
  request whose first run answered and whose reply-cache commit a crash stopped (the crash window,
  ``Stats.at_risk``, which bounds how many effects are allowed for this reason). Its reply, with the
  same id, is a duplicate to the saga.

A slow participant commits its effect at the *end* of its call (the harness runs a handler's body when
the call starts and holds only its result: see :class:`LedgerHarness`); a call its worker was killed
during commits nothing.

``HYPOTHESIS_PROFILE`` picks the profile (``sagas-dev`` locally, ``sagas-ci`` in CI, ``sagas-thorough``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from sagas import ActionRefused, App, Event, Failure, NotFound, SagaRecord, Service, Start, Step, StepSaga
from sagas._handlers import HandlerOutcome
from sagas._protocol import reply_event
from sagas.testing import Harness
from sagas.testing.strategies import message_faults
from tests.properties._world import WORKERS, FaultyWorld, report_run

# -- the participants' ledger ------------------------------------------------------------------------


class Entry(NamedTuple):
    """One run of a participant: the saga key, the step, "do" or "undo", and the request id."""

    key: str
    step: str
    action: str
    request_id: str


#: every participant run, in the order its effect was committed
LEDGER: list[Entry] = []
#: (saga key, step) -> whether the step's effect is in place ("do" sets it, "undo" clears it)
PRESENT: dict[tuple[str, str], bool] = {}


@dataclass
class _Pending:
    """A slow call's effect, committed when the call ends (``due``), unless its worker dies first."""

    due: float
    slot: int | None
    entry: Entry
    reply_id: str


@dataclass
class _World:
    """What the participants need from the harness, and what they know beyond the ledger."""

    harness: Harness | None = None
    #: per ledger index of a "do": its reply id and how many copies of that reply had reached the broker
    replies: dict[int, tuple[str, int]] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    #: calls of "do" started per (key, step): a step is slow on its first call only
    started: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: virtual seconds the last call of each request takes (read by the harness's handler_seconds)
    takes: dict[str, float] = field(default_factory=dict)

    def reset(self, harness: Harness) -> None:
        LEDGER.clear()
        PRESENT.clear()
        self.harness = harness
        self.replies.clear()
        self.pending.clear()
        self.started.clear()
        self.takes.clear()

    def now(self) -> float:
        assert self.harness is not None
        return self.harness.clock()

    def commit(self, entry: Entry, reply_id: str) -> None:
        assert self.harness is not None
        if entry.action == "do":
            self.replies[len(LEDGER)] = (reply_id, self.harness.network.copies[reply_id])
        LEDGER.append(entry)
        PRESENT[(entry.key, entry.step)] = entry.action == "do"

    def run(self, entry: Entry, reply_id: str, seconds: float) -> None:
        """A participant's call: committed now, or at its end for a slow one."""
        assert self.harness is not None
        self.flush()
        if seconds > 0:
            self.pending.append(_Pending(self.now() + seconds, self.harness.current, entry, reply_id))
        else:
            self.commit(entry, reply_id)

    def flush(self) -> None:
        """Commit the slow calls that have ended, in the order they ended."""
        now = self.now()
        done = sorted((p for p in self.pending if p.due <= now), key=lambda p: p.due)
        self.pending = [p for p in self.pending if p.due > now]
        for p in done:
            self.commit(p.entry, p.reply_id)

    def killed(self, slot: int) -> None:
        """Worker ``slot`` dies: its calls that have ended committed; those still running never will."""
        self.flush()
        self.pending = [p for p in self.pending if p.slot != slot]

    def seconds_of(self, outcome: HandlerOutcome) -> float:
        return self.takes.pop(outcome.event.id, 0.0)

    def unknowable(self, index: int) -> str:
        """Why the saga cannot know of the "do" at ledger ``index`` ("" when it can)."""
        assert self.harness is not None
        reply_id, before = self.replies[index]
        if before > 0:
            return "rerun"
        if self.harness.network.copies[reply_id] == before:
            return "reply_lost"
        return ""

    def effect_unknowable(self, key: str, step: str) -> str:
        """Why the saga cannot know that ``step``'s effect is in place ("" when it can): it cannot know of
        any of the "do" runs since the last "undo" (each put the effect in place, or left it there)."""
        since = [i for i, e in enumerate(LEDGER) if (e.key, e.step) == (key, step)]
        undone = [i for i in since if LEDGER[i].action == "undo"]
        dos = [i for i in since if i > (undone[-1] if undone else -1)]
        assert dos, (key, step, "in place without a do since its last undo")
        why = [self.unknowable(i) for i in dos]
        if not all(why):
            return ""
        return "rerun" if "rerun" in why else "reply_lost"


WORLD = _World()


class LedgerHarness(Harness):
    """The harness, with slow participants that commit their effect when their call ends.

    The harness runs a handler's body when the call starts and holds its result for ``handler_seconds``;
    a slow participant's effect would then land before a compensation sent meanwhile. Here a "do" that
    takes time is committed (:data:`LEDGER`, :data:`PRESENT`) once the clock reaches its end, before the
    worker learns it finished; a worker killed before then commits nothing."""

    def __init__(self, app: App, **options: Any) -> None:
        super().__init__(app, handler_seconds=WORLD.seconds_of, **options)
        WORLD.reset(self)

    def step(self, slot: int) -> bool:
        WORLD.flush()
        return super().step(slot)

    def crash(self, slot: int = 0) -> None:
        if self.workers[slot] is not None:
            WORLD.killed(slot)
        super().crash(slot)


# -- the participants ----------------------------------------------------------------------------------


def make_steps(prefix: str, n: int, *, assume_not_done: tuple[str, ...] = ()) -> list[Step]:
    """``n`` steps ``s1``..``sn`` with requests ``ledger.<prefix>s<i>.do`` and ``.undo``."""
    return [
        Step(
            f"s{i}",
            request=f"ledger.{prefix}s{i}.do",
            compensation=f"ledger.{prefix}s{i}.undo",
            timeout=5,
            retries=2,
            unknown_outcome="assume_not_done" if f"s{i}" in assume_not_done else "compensate",
        )
        for i in range(1, n + 1)
    ]


def serve(service: Service, saga_steps: list[Step]) -> None:
    """Per-step idempotent participants of ``saga_steps`` on ``service``: "do" puts the step's effect in
    place (or leaves it there), "undo" removes it (or finds nothing); each run goes in the ledger. The
    request's payload (the saga's data) can say ``fail`` (a step that answers with a Failure) and
    ``slow``/``slow_for`` (a step whose first call takes that many virtual seconds)."""
    for s in saga_steps:
        assert s.compensation is not None
        for action, request in (("do", s.request), ("undo", s.compensation)):
            name = request.split(".")[1] + "_" + action
            service.handles(request, name=name)(_participant(s.name, action, f"{service.name}.{name}", service.name))


def _participant(step: str, action: str, handler: str, service: str) -> Callable[[Event], dict[str, Any]]:
    def run(event: Event) -> dict[str, Any]:
        key = str(event.payload["run"])
        seconds = 0.0
        if action == "do":
            if event.payload.get("fail") == step:
                raise Failure(f"{step} refused for {key}")
            if event.payload.get("slow") == step and not WORLD.started[(key, step)]:
                seconds = float(event.payload.get("slow_for") or 0.0)
            WORLD.started[(key, step)] += 1
        WORLD.takes[event.id] = seconds
        reply_id = reply_event(event, handler, service, ok=True).id
        WORLD.run(Entry(key, step, action, event.id), reply_id, seconds)
        return {"step": step, "action": action}

    run.__name__ = handler.replace(".", "_")
    return run


# -- the app: step sagas of 2, 3, 4 and 5 steps ----------------------------------------------------------


class Ledger2(StepSaga):
    type = "ledger2"
    start = Start("ledger.runs2.requested", key="run")
    steps = make_steps("l2", 2)


class Ledger3(StepSaga):
    type = "ledger3"
    start = Start("ledger.runs3.requested", key="run")
    steps = make_steps("l3", 3)


class Ledger4(StepSaga):
    type = "ledger4"
    start = Start("ledger.runs4.requested", key="run")
    steps = make_steps("l4", 4)


class Ledger5(StepSaga):
    type = "ledger5"
    start = Start("ledger.runs5.requested", key="run")
    # one step that, when its retries run out without a reply, is taken not to have been done
    steps = make_steps("l5", 5, assume_not_done=("s3",))


SAGAS: dict[int, type[StepSaga]] = {2: Ledger2, 3: Ledger3, 4: Ledger4, 5: Ledger5}
participants = Service("ledger")
for _saga in SAGAS.values():
    serve(participants, _saga.steps)
app = App(participants, sagas=list(SAGAS.values()))
TYPES = {s.type for s in SAGAS.values()}
MATCHES = [
    "#",
    "ledger.*.*",
    "ledger.*.do",
    "ledger.*.do.reply",
    "ledger.*.undo",
    "ledger.*.undo.reply",
    "ledger.l3s2.do.reply",
    "ledger.l5s3.do.reply",  # the step taken not to be done when no reply comes
    "ledger.*.requested",
]


@dataclass(frozen=True)
class Run:
    """What a run was started with (a second start of the same key is a duplicate start)."""

    size: int
    fail: str
    slow: str
    slow_for: float

    def payload(self, key: str) -> dict[str, Any]:
        return {"run": key, "fail": self.fail, "slow": self.slow, "slow_for": self.slow_for}


# -- the checks --------------------------------------------------------------------------------------------


def check_ledger(record: SagaRecord, size: int, unknowable: Counter[str]) -> None:
    """The ledger rule for one final saga; effects the saga cannot know of are counted in ``unknowable``."""
    key, names = record.key, [f"s{i}" for i in range(1, size + 1)]
    ran = [(e.step, e.action) for e in LEDGER if e.key == key]

    def allowed(step: str) -> bool:
        """The step's effect is in place: only if the saga cannot know of it."""
        why = WORLD.effect_unknowable(key, step)
        if why:
            unknowable[why] += 1
        return bool(why)

    if record.state == "completed":
        assert all(PRESENT.get((key, s)) for s in names), (key, "completed with an effect missing", ran)
        assert not [a for _, a in ran if a == "undo"], (key, "completed, yet a compensation ran", ran)
    elif record.state == "compensated":
        for s in names:
            if PRESENT.get((key, s)):
                assert allowed(s), (key, f"compensated with {s}'s effect in place", ran, record.meta)
    elif record.state == "failed":
        compensation = record.meta.get("compensation") or {}
        not_undone, undone = compensation.get("not_undone") or [], compensation.get("undone") or []
        for s in names:
            if not PRESENT.get((key, s)):
                continue
            if s not in not_undone:
                assert allowed(s), (key, f"failed; {s}'s effect is in place and not in not_undone", ran, record.meta)
            elif s in undone:
                assert allowed(s), (key, f"failed; {s} is in undone, yet in place", ran, record.meta)
    else:
        raise AssertionError((key, f"ended in {record.state}", record.meta))


# -- the machine -------------------------------------------------------------------------------------------


class LedgerFaults(FaultyWorld):
    def __init__(self) -> None:
        super().__init__()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        self.h = LedgerHarness(app, workers=WORKERS, auto_restart=False)
        self.runs: dict[str, Run] = {}
        self.starts: dict[str, list[str]] = {}  # the start events' ids of each run
        self.operator: Counter[str] = Counter()
        self.unknowable: Counter[str] = Counter()

    def teardown(self) -> None:
        try:
            self.faults_stop_and_every_saga_ends()
            records = self.sagas()
            report_run(
                self.h,
                "the compensation ledger rule under faults and operator actions (hypothesis)",
                sagas_started=len(records),
                sagas_completed=sum(r.state == "completed" for r in records),
                sagas_compensated=sum(r.state == "compensated" for r in records),
                sagas_failed=sum(r.state == "failed" for r in records),
                operator_actions=self.operator["done"],
                operator_refused=self.operator["refused"],
                unknowable_reply_lost=self.unknowable["reply_lost"],
                unknowable_rerun=self.unknowable["rerun"],
            )
        finally:
            self.h.close()

    def sagas(self) -> list[SagaRecord]:
        return sorted((r for r in self.h.sagas() if r.type in TYPES), key=lambda r: r.key)

    # -- what the world does ---------------------------------------------------------------------

    @initialize(n=st.integers(1, 3), size=st.integers(2, 5), fail=st.integers(0, 5))
    def first_runs(self, n: int, size: int, fail: int) -> None:
        for i in range(n):
            self.start_run(i, size, fail, 0, 0.0, duplicate=False)

    @rule(
        i=st.integers(0, 7),
        size=st.integers(2, 5),
        fail=st.integers(0, 5),
        slow=st.integers(0, 5),
        slow_for=st.floats(1.0, 60.0),
        duplicate=st.booleans(),
    )
    def start_run(self, i: int, size: int, fail: int, slow: int, slow_for: float, duplicate: bool) -> None:
        key = f"run-{i}"
        new = Run(size, f"s{fail}" if 1 <= fail <= size else "", f"s{slow}" if 1 <= slow <= size else "", slow_for)
        run = self.runs.setdefault(key, new)  # starting a run again is a duplicate start
        event = self.h.publish(f"ledger.runs{run.size}.requested", run.payload(key))
        self.starts.setdefault(key, []).append(event.id)
        if duplicate:
            self.h.send(event)  # the same event again (same id)

    @rule(fault=message_faults(), match=st.sampled_from(MATCHES), times=st.integers(1, 3))
    def message_fault(self, fault: Any, match: str, times: int) -> None:
        self.h.inject(fault, match=match, times=times)

    @rule(which=st.integers(0, 15), action=st.sampled_from(["retry", "compensate"]))
    def operator_action(self, which: int, action: str) -> None:
        records = self.sagas()
        if not records:
            return
        saga_id = records[which % len(records)].id
        ops = self.h.operations
        try:
            if action == "retry":
                ops.retry(saga_id, actor="prop")
            else:
                ops.compensate(saga_id, actor="prop")
        except (ActionRefused, NotFound):
            self.operator["refused"] += 1
        else:
            self.operator["done"] += 1

    # -- what must always hold -------------------------------------------------------------------

    @invariant()
    def one_saga_per_run(self) -> None:
        keys = Counter(r.key for r in self.sagas())
        assert all(n == 1 for n in keys.values()), keys
        assert set(keys) <= set(self.runs)

    @invariant()
    def no_saga_handles_a_message_twice(self) -> None:
        for record in self.sagas():
            ids = [e.message_id for e in self.h.history(record.id)]
            assert len(ids) == len(set(ids)), (record.key, ids)

    # -- once the faults stop and the clock moves on ------------------------------------------------

    @rule()
    def faults_stop_and_every_saga_ends(self) -> None:
        self.stop_faults_and_settle()
        WORLD.flush()
        h = self.h
        sagas = {r.key: r for r in self.sagas()}
        # a run whose every start event the network lost never started (its publisher's loss)
        arrived = {key for key, ids in self.starts.items() if any(h.network.copies[i] for i in ids)}
        assert set(sagas) == arrived, "every run whose start event arrived started exactly one saga"
        unknowable: Counter[str] = Counter()
        for key, record in sagas.items():
            assert record.final, (key, record.state)
            run = self.runs[key]
            assert record.type == SAGAS[run.size].definition().type
            check_ledger(record, run.size, unknowable)
        # a second run of a request whose reply was out already: only in the crash window
        assert unknowable["rerun"] <= h.stats.at_risk, (unknowable, h.stats.at_risk)
        self.unknowable = unknowable


TestLedgerFaults = LedgerFaults.TestCase
