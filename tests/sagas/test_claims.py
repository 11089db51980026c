"""Claims on de-duplicated messages across workers (``sagas._handlers``): two workers sharing one store
never both run an idempotent handler or a cached-reply request handler for one message id, on
memory:// and RabbitMQ."""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path
from typing import Any

from sagas import (
    App,
    Event,
    EventBus,
    MemoryStore,
    Retry,
    SagaContext,
    SagaRecord,
    Service,
    Start,
    Step,
    StepSaga,
    Store,
    Worker,
    open_store,
)
from sagas._saga_engine import SagaEngine
from tests.helpers import wait_for

HOTEL = "ocis.trip.book_hotel"
TRIP_REQUESTED = "ocis.trip.requested"


def _keep_trip_id(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data["trip_id"] = ctx.event.payload["trip_id"]


class SlowBooking(StepSaga):
    """One step whose deadline (0.4 s) is shorter than the participant's handling time."""

    type = "slow_booking"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("hotel", HOTEL, timeout=0.4, retries=8)]


class _Effects:
    """Counts a handler's effects per message id, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, message_id: str) -> None:
        with self.lock:
            self.counts[message_id] += 1

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def duplicates(self) -> dict[str, int]:
        with self.lock:
            return {k: n for k, n in self.counts.items() if n > 1}


def _workers(buses: list[object], app: App, broker_url: str, store: str, n: int = 2) -> list[Worker]:
    workers = [Worker(app, broker=broker_url, store=store, timer_interval=0.05) for _ in range(n)]
    buses.extend(workers)
    return workers


def test_an_idempotent_handler_runs_once_per_id_across_two_workers(
    broker_url: str, unique: str, buses: list[object], tmp_path: Path
) -> None:
    """Two workers share an SQLite store; each event is published twice with the same id and the handler
    takes 0.5 s: every event's effect happens exactly once (the copy meets the other worker's claim,
    waits in the delay queue, and then meets the inbox)."""
    effects = _Effects()
    indexer = Service("indexer")

    @indexer.on("ocis.file.uploaded", idempotent=True, prefetch=1)  # (so that both workers get copies)
    def index(event: Event) -> None:
        time.sleep(0.5)
        effects.add(event.id)

    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = _workers(buses, App(indexer, exchange=unique), broker_url, url)
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    events = [Event("ocis.file.uploaded", {"n": i}) for i in range(12)]
    with a.running(), b.running():
        for e in events:
            bus.publish(e)
            bus.publish(e)
        wait_for(lambda: effects.total >= len(events), timeout=30.0, what="every event handled")
        wait_for(lambda: a.idle and b.idle and a.handlers.idle and b.handlers.idle, timeout=30.0, what="both idle")
        time.sleep(1.5)  # a copy held back comes back from the delay queue within 1 s
        wait_for(lambda: a.idle and b.idle, timeout=30.0, what="both idle again")
    assert effects.duplicates() == {}
    assert set(effects.counts) == {e.id for e in events}
    assert a.handlers.handled > 0  # both workers took part
    assert b.handlers.handled > 0


def test_a_slow_participant_runs_once_per_request_across_two_workers(
    broker_url: str, unique: str, buses: list[object], tmp_path: Path
) -> None:
    """A step's deadline (0.4 s) is shorter than its participant's handling time (1.2 s), and two workers
    share the store: the re-sent requests meet the claim of the worker on it, the work runs once per
    request id, and every saga completes."""
    effects = _Effects()
    hotels = Service("hotels")

    @hotels.handles(HOTEL, cache_replies=True)
    def book(event: Event) -> dict[str, Any]:
        time.sleep(1.2)
        effects.add(event.id)
        return {"room": event.payload["trip_id"]}

    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = _workers(buses, App(hotels, sagas=[SlowBooking], exchange=unique), broker_url, url)
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    trips = [f"t{i}" for i in range(6)]
    store: Store = open_store(url)
    try:

        def completed() -> bool:
            return all((r := store.find_saga("slow_booking", t)) is not None and r.final for t in trips)

        with a.running(), b.running():
            for t in trips:
                bus.publish(Event(TRIP_REQUESTED, {"trip_id": t}))
            wait_for(completed, timeout=45.0, what="every booking completed")
        states = {t: r.state for t in trips if (r := store.find_saga("slow_booking", t)) is not None}
        reasons = [
            h.reason for t in trips if (r := store.find_saga("slow_booking", t)) for h in store.saga_history(r.id)
        ]
    finally:
        store.close()
    assert states == dict.fromkeys(trips, "completed")
    assert effects.duplicates() == {}
    assert effects.total == len(trips)
    assert any(r.startswith("deadline passed") for r in reasons)  # deadlines passed during the handling


def test_a_request_sent_twice_runs_once_across_two_workers(
    broker_url: str, unique: str, buses: list[object], tmp_path: Path
) -> None:
    """The same request published twice at once, to two workers that share the store: one copy meets the
    other's claim, goes back through the delay queue without counting an attempt, and is answered
    with the cached reply; the work runs once per request and every request gets two replies."""
    effects = _Effects()
    replies: list[Event] = []
    hotels, audit = Service("hotels"), Service("audit")

    @hotels.handles(HOTEL, cache_replies=True, prefetch=1)  # (so that both workers get copies)
    def book(event: Event) -> dict[str, Any]:
        time.sleep(0.5)
        effects.add(event.id)
        return {"room": 1}

    audit.on(HOTEL + ".reply", name="replies")(replies.append)
    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = _workers(buses, App(hotels, audit, exchange=unique), broker_url, url)
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    requests = [Event(HOTEL, {"trip_id": f"t{i}"}) for i in range(6)]
    with a.running(), b.running():
        for r in requests:
            bus.publish(r)
            bus.publish(r)
        wait_for(lambda: len(replies) == 2 * len(requests), timeout=30.0, what="every copy answered")
    assert effects.duplicates() == {}
    assert effects.total == len(requests)
    if broker_url != "memory://":  # (RabbitMQ hands the two copies to the two workers in turn)
        assert a.handlers.held_back + b.handlers.held_back > 0  # copies met the other worker's claim
    assert {e.headers["request_id"] for e in replies} == {r.id for r in requests}


class PatientBooking(StepSaga):
    """Deadlines of 0.3 s with one re-send, and a participant allowed 6 s."""

    type = "patient_booking"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("hotel", HOTEL, timeout=0.3, retries=1, handling_timeout=6.0)]


class HastyBooking(StepSaga):
    """A participant allowed 0.8 s only."""

    type = "hasty_booking"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("hotel", HOTEL, timeout=0.3, retries=1, handling_timeout=0.8)]


def _slow_hotels(effects: _Effects, seconds: float) -> Service:
    hotels = Service("hotels")

    @hotels.handles(HOTEL, cache_replies=True)
    def book(event: Event) -> dict[str, Any]:
        time.sleep(seconds)
        effects.add(event.id)
        return {"room": 1}

    return hotels


def test_a_participant_being_handled_uses_up_no_retries(unique: str) -> None:
    """While a worker holds the request's claim, a deadline neither re-sends it nor counts an attempt:
    a 2 s participant behind 0.3 s deadlines with one re-send completes, within its handling_timeout."""
    effects = _Effects()
    store = MemoryStore()
    worker = Worker(App(_slow_hotels(effects, 2.0), sagas=[PatientBooking], exchange=unique), store=store)
    with worker.running():
        EventBus("memory://", exchange=unique).publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "patient_booking", "t1"), timeout=10.0, what="the booking final")
    assert saga.state == "completed"
    assert effects.total == 1
    reasons = [h.reason for h in store.saga_history(saga.id)]
    assert any("is being handled, waiting" in r for r in reasons)
    assert saga.attempts <= 2


def test_past_its_handling_timeout_the_step_times_out(unique: str) -> None:
    """A participant still handling the request after handling_timeout (0.8 s) is given up on: the step
    takes its timeout outcome, and the request is not run again."""
    effects = _Effects()
    store = MemoryStore()
    worker = Worker(App(_slow_hotels(effects, 2.0), sagas=[HastyBooking], exchange=unique), store=store)
    with worker.running():
        EventBus("memory://", exchange=unique).publish(Event(TRIP_REQUESTED, {"trip_id": "t1"}))
        saga = wait_for(lambda: _final(store, "hasty_booking", "t1"), timeout=10.0, what="the booking final")
        wait_for(lambda: effects.total == 1, timeout=5.0, what="the participant done")
    assert saga.state != "completed"
    assert any("still being handled after 0.8s" in h.reason for h in store.saga_history(saga.id))
    assert effects.total == 1


def _final(store: Store, saga_type: str, key: str) -> SagaRecord | None:
    record = store.find_saga(saga_type, key)
    return record if record is not None and record.final else None


class Errand(StepSaga):
    """Deadlines of 1 s, one re-send, a participant allowed 10 s."""

    type = "errand"
    start = Start(TRIP_REQUESTED, key="trip_id", do=_keep_trip_id)
    steps = [Step("hotel", HOTEL, timeout=1.0, retries=1, handling_timeout=10.0)]


def test_a_deadline_waits_on_a_claimed_request_then_times_out_past_its_handling_timeout() -> None:
    """Engine alone, on a clock the test moves: while the request is claimed, a deadline re-sends
    nothing and counts no attempt, with waits that grow; once the claim is gone the request is re-sent
    as before; past handling_timeout a still-claimed request times the step out."""
    now = [1_000.0]
    store = MemoryStore()
    engine = SagaEngine([Errand], store, clock=lambda: now[0], rng=random.Random(0))
    engine.handle("errand", Event(TRIP_REQUESTED, {"trip_id": "t1"}))
    record = store.find_saga("errand", "t1")
    assert record is not None
    request_id = record.meta["request"]["id"]
    assert store.claim("hotels.book", request_id, "worker-a", now[0] + 30, now[0])
    deadlines: list[float] = []
    for _ in range(3):
        saga = store.get_saga(record.id)
        assert saga is not None
        assert saga.deadline is not None
        now[0] = saga.deadline
        assert engine.fire_due() == []  # nothing re-sent
        after = store.get_saga(record.id)
        assert after is not None
        assert after.attempts == 1
        assert after.state == "hotel"
        assert after.deadline is not None
        deadlines.append(after.deadline - now[0])
    assert deadlines == sorted(deadlines)  # waits that grow
    store.release("hotels.book", request_id, "worker-a")
    saga = store.get_saga(record.id)
    assert saga is not None
    assert saga.deadline is not None
    now[0] = saga.deadline
    (resent,) = engine.fire_due()  # not claimed: re-sent, an attempt counted
    assert resent.message_id == request_id
    saga = store.get_saga(record.id)
    assert saga is not None
    assert saga.attempts == 2
    assert saga.deadline is not None
    assert store.claim("hotels.book", request_id, "worker-b", now[0] + 60, now[0])
    while not saga.final:
        assert saga.deadline is not None
        assert saga.deadline <= 1_000.0 + 10.0
        now[0] = saga.deadline
        engine.fire_due()
        saga = store.get_saga(record.id)
        assert saga is not None
    assert saga.state != "completed"
    assert any("still being handled after 10s" in h.reason for h in store.saga_history(saga.id))


# -- the claims of a turn, written together ----------------------------------------------------------------


class _ClaimsSeen:
    """A store that records how the worker claims: the size of each claim_many batch, single claims."""

    def __init__(self, store: Store, fail_first: bool = False) -> None:
        self._store = store
        self.batches: list[int] = []
        self.reads: list[int] = []  # (the size of each answers() read)
        self.single = 0  # claims and inbox reads of one message
        self.fail_first = fail_first

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def claim_many(self, claims: Any, *args: Any) -> set[tuple[str, str]]:
        self.batches.append(len(claims))
        if self.fail_first:
            self.fail_first = False
            from sagas import StoreError

            raise StoreError("the store is restarting")
        won: set[tuple[str, str]] = self._store.claim_many(claims, *args)
        return won

    def claim(self, *args: Any) -> bool:
        self.single += 1
        return bool(self._store.claim(*args))

    def answers(self, inbox: Any, replies: Any) -> Any:
        self.reads.append(len(inbox) + len(replies))
        return self._store.answers(inbox, replies)

    def seen(self, *args: Any) -> bool:
        self.single += 1
        return bool(self._store.seen(*args))


def _indexer(effects: _Effects, **options: Any) -> Service:
    indexer = Service("indexer")

    @indexer.on("ocis.file.uploaded", idempotent=True, **options)
    def index(event: Event) -> None:
        effects.add(event.id)

    return indexer


def _handle_all(app: App, store: Any, published: list[Event], effects: _Effects, n: int) -> Worker:
    """Publish ``published`` to a worker of ``app`` on ``store`` (memory://) whose queue exists but which
    does not consume yet, so that it takes them in few turns; run it until ``n`` effects happened and it
    is idle. The worker, closed."""
    worker = Worker(app, broker="memory://", store=store)
    bus = EventBus("memory://", exchange=app.exchange)
    try:
        worker.start()  # (declares the queue)
        bus.publish_many(published)
        with worker.running():
            wait_for(lambda: effects.total >= n, timeout=30.0, what="every event handled")
            wait_for(lambda: worker.idle and worker.handlers.idle, timeout=30.0, what="idle")
    finally:
        worker.close()
        bus.close()
    return worker


def test_the_claims_and_inbox_reads_of_the_messages_a_worker_takes_at_once_are_one_store_call_each(
    any_store: Store, unique: str
) -> None:
    effects = _Effects()
    store = _ClaimsSeen(any_store)
    events = [Event("ocis.file.uploaded", {"n": i}) for i in range(40)]
    _handle_all(App(_indexer(effects), exchange=unique), store, events, effects, len(events))
    assert set(effects.counts) == {e.id for e in events}
    assert effects.duplicates() == {}
    assert store.single == 0
    assert sum(store.batches) == len(events)
    assert store.reads == store.batches  # (the inbox of every message claimed, read together)
    assert max(store.batches) > 1, store.batches
    assert len(store.batches) < len(events), store.batches


def test_two_copies_of_a_message_taken_at_once_run_it_once(any_store: Store, unique: str) -> None:
    effects = _Effects()
    events = [Event("ocis.file.uploaded", {"n": i}) for i in range(10)]
    twice = [e for e in events for _ in range(2)]  # (each id twice, in one batch)
    worker = _handle_all(App(_indexer(effects), exchange=unique), any_store, twice, effects, len(events))
    assert effects.duplicates() == {}
    assert set(effects.counts) == {e.id for e in events}
    assert worker.handlers.handled == len(events)


def test_messages_whose_claims_the_store_failed_to_write_are_handled_later(unique: str) -> None:
    effects = _Effects()
    store = _ClaimsSeen(MemoryStore(), fail_first=True)
    app = App(_indexer(effects, retry=Retry(attempts=3, initial=0.05)), exchange=unique)
    events = [Event("ocis.file.uploaded", {"n": i}) for i in range(10)]
    _handle_all(app, store, events, effects, len(events))
    assert store.fail_first is False  # (the first write failed)
    assert effects.duplicates() == {}
    assert set(effects.counts) == {e.id for e in events}


def test_claim_many_takes_what_claim_would_take(any_store: Store) -> None:
    now = 1_000.0
    assert any_store.claim("svc.h", "theirs", "worker-b", now + 30, now)
    assert any_store.claim("svc.h", "expired", "worker-b", now - 1, now - 31)
    assert any_store.claim("svc.h", "ours", "worker-a", now + 5, now - 25)
    asked = [("svc.h", "free"), ("svc.h", "theirs"), ("svc.h", "expired"), ("svc.h", "ours"), ("svc.g", "theirs")]
    won = any_store.claim_many(asked, "worker-a", now + 30, now)
    assert won == {("svc.h", "free"), ("svc.h", "expired"), ("svc.h", "ours"), ("svc.g", "theirs")}
    # what was taken is held: worker-b now meets it, and worker-a's lease runs to its new end
    assert not any_store.claim("svc.h", "expired", "worker-b", now + 60, now + 29)
    assert any_store.claim("svc.h", "ours", "worker-b", now + 60, now + 31)
    assert any_store.claim_many([], "worker-a", now, now) == set()
    many = [("svc.h", f"m{i}") for i in range(450)]  # (more than one statement's worth)
    assert any_store.claim_many(many, "worker-a", now + 30, now) == set(many)


def test_answers_reads_the_inbox_and_reply_cache_of_many_messages(any_store: Store) -> None:
    any_store.remember("svc.h", "in")
    any_store.remember("svc.other", "elsewhere")
    any_store.cache_reply("svc.r", "req", '{"ok": 1}')
    many = [("svc.h", f"m{i}") for i in range(1200)]  # (more than one statement's worth)
    seen, cached = any_store.answers(
        [("svc.h", "in"), ("svc.h", "out"), ("svc.h", "elsewhere"), *many], [("svc.r", "req"), ("svc.r", "none")]
    )
    assert seen == {("svc.h", "in")}
    assert cached == {("svc.r", "req"): '{"ok": 1}'}
    assert any_store.answers([], []) == (set(), {})
