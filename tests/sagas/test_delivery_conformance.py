"""The delivery promises, checked the same way on memory:// and on RabbitMQ."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import pickle
import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from sagas import (
    AT_MOST_ONCE,
    DEFAULT_PERMANENT,
    App,
    ConfigurationError,
    Context,
    Event,
    EventBus,
    MemoryStore,
    Reject,
    Retry,
    Service,
    Start,
    Step,
    StepSaga,
    Worker,
)
from tests.helpers import raw_publish, wait_for
from transport import (
    CONTENT_TYPE,
    EventTooLarge,
    InvalidEventName,
    Unroutable,
    encode,
)

FAST = Retry(attempts=3, initial=0.05, factor=2.0)


@pytest.fixture(autouse=True, params=["sync", "mixed"])
def flavour(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with the handlers as written (sync), and in a mixed app where the first
    handler of each service, and every second one after it, is an ``async def`` handler. The async
    handler awaits the test's function on a thread (``asyncio.to_thread``), so a test handler that waits
    on a ``threading.Event`` does not block the worker's event loop; the message's path (admit, the
    loop, the settling) is the async handlers' own."""
    if request.param == "mixed":
        on = Service.on
        declared: Counter[str] = Counter()

        def mixed_on(self: Service, *args: Any, **kwargs: Any) -> Any:
            register = on(self, *args, **kwargs)

            def wrap(fn: Any) -> Any:
                declared[self.name] += 1
                if declared[self.name] % 2 == 1:
                    register(_as_async(fn))
                    assert self.handlers[-1].is_async
                else:
                    register(fn)
                return fn

            return wrap

        monkeypatch.setattr(Service, "on", mixed_on)
    return str(request.param)


def _as_async(fn: Any) -> Any:
    """``fn`` as an ``async def`` handler with the same name and arity."""
    if len(inspect.signature(fn).parameters) >= 2:

        async def with_ctx(event: Event, ctx: Context) -> Any:
            await asyncio.sleep(0)
            return await asyncio.to_thread(fn, event, ctx)

        handler: Any = with_ctx
    else:

        async def without_ctx(event: Event) -> Any:
            await asyncio.sleep(0)
            return await asyncio.to_thread(fn, event)

        handler = without_ctx
    handler.__name__ = handler.__qualname__ = fn.__name__
    return handler


def make_worker(buses: list[object], app: App, url: str, **kw: Any) -> Worker:
    kw.setdefault("store", "memory://")
    worker = Worker(app, broker=url, **kw)
    buses.append(worker)
    return worker


def make_bus(buses: list[object], url: str, exchange: str, **kw: Any) -> EventBus:
    bus = EventBus(url, exchange=exchange, **kw)
    buses.append(bus)
    return bus


def test_patterns_route_like_rabbitmq(broker_url: str, unique: str, buses: list[object]) -> None:
    """'*' matches one word and '#' zero or more, identically on both transports."""
    svc = Service("router")
    seen: dict[str, list[str]] = {"star": [], "hash": [], "tail": []}
    svc.on("ocis.*.deleted", name="star")(lambda e: seen["star"].append(e.type))
    svc.on("ocis.#", name="hash")(lambda e: seen["hash"].append(e.type))
    svc.on("ocis.files.deleted.#", name="tail")(lambda e: seen["tail"].append(e.type))
    bus = make_bus(buses, broker_url, unique)
    names = ["ocis.files.deleted", "ocis.files.deleted.hard", "ocis.shares.deleted", "ocis.files.created"]
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        bus.publish_many([Event(n) for n in names])
        wait_for(lambda: len(seen["hash"]) == 4, what="all four events on ocis.#")
        bus.publish(Event("other.files.deleted"))  # matches nothing here
        bus.publish(Event("ocis.zzz.sentinel"))
        wait_for(lambda: "ocis.zzz.sentinel" in seen["hash"], what="sentinel")
    assert sorted(seen["star"]) == ["ocis.files.deleted", "ocis.shares.deleted"]
    assert sorted(seen["tail"]) == ["ocis.files.deleted", "ocis.files.deleted.hard"]
    assert "other.files.deleted" not in seen["hash"]


def test_each_service_gets_every_event(broker_url: str, unique: str, buses: list[object]) -> None:
    """Two services subscribed to the same event both receive all of it."""
    got: Counter[str] = Counter()
    a, b = Service("audit"), Service("search")
    a.on("ocis.sharing.share_created", name="record")(lambda e: got.update(["audit"]))
    b.on("ocis.sharing.share_created", name="index")(lambda e: got.update(["search"]))
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(a, b, exchange=unique), broker_url).running():
        bus.publish_many([Event("ocis.sharing.share_created", {"i": i}) for i in range(50)])
        wait_for(lambda: got["audit"] == 50 and got["search"] == 50, what="50 events in each service")


def test_instances_of_a_service_share_the_work(broker_url: str, unique: str, buses: list[object]) -> None:
    """Two instances of one service compete: each event is handled by exactly one of them."""
    by_instance: dict[str, list[int]] = {"w1": [], "w2": []}
    lock = threading.Lock()

    def app_for(instance: str) -> App:
        svc = Service("thumbnails")

        @svc.on("ocis.files.uploaded")
        def make_thumbnail(event: Event) -> None:
            with lock:
                by_instance[instance].append(event.payload["i"])

        return App(svc, exchange=unique)

    bus = make_bus(buses, broker_url, unique)
    w1 = make_worker(buses, app_for("w1"), broker_url)
    w2 = make_worker(buses, app_for("w2"), broker_url)
    with w1.running(), w2.running():
        bus.publish_many([Event("ocis.files.uploaded", {"i": i}) for i in range(200)])
        wait_for(lambda: len(by_instance["w1"]) + len(by_instance["w2"]) >= 200, what="200 events handled")
    assert sorted(by_instance["w1"] + by_instance["w2"]) == list(range(200))


def test_broadcast_reaches_every_instance(broker_url: str, unique: str, buses: list[object]) -> None:
    """A broadcast handler gets every event in every running instance."""
    got: dict[str, list[str]] = {"w1": [], "w2": []}

    def app_for(instance: str) -> App:
        svc = Service("cache")
        svc.on("ocis.config.changed", delivery=AT_MOST_ONCE, broadcast=True, name="invalidate")(
            lambda e: got[instance].append(e.id)
        )
        return App(svc, exchange=unique)

    bus = make_bus(buses, broker_url, unique)
    with (
        make_worker(buses, app_for("w1"), broker_url).running(),
        make_worker(buses, app_for("w2"), broker_url).running(),
    ):
        events = [Event("ocis.config.changed") for _ in range(5)]
        bus.publish_many(events)
        wait_for(lambda: len(got["w1"]) == 5 and len(got["w2"]) == 5, what="5 events in both instances")
    # (in any order: handlers of one queue run in parallel, docs/guarantees.md)
    assert sorted(got["w1"]) == sorted(got["w2"]) == sorted(e.id for e in events)


def test_at_least_once_keeps_events_while_nobody_listens(broker_url: str, unique: str, buses: list[object]) -> None:
    """Events published while no instance of an at-least-once service runs are handled when one starts."""
    got: list[int] = []
    svc = Service("indexer")
    svc.on("ocis.files.uploaded", name="index")(lambda e: got.append(e.payload["i"]))
    app = App(svc, exchange=unique)
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, app, broker_url).running():
        pass  # declares the durable queue, then stops
    bus.publish_many([Event("ocis.files.uploaded", {"i": i}) for i in range(20)])
    with make_worker(buses, app, broker_url).running():
        wait_for(lambda: len(got) == 20, what="20 kept events")
    assert sorted(got) == list(range(20))


def test_at_most_once_drops_events_while_nobody_listens(broker_url: str, unique: str, buses: list[object]) -> None:
    """An at-most-once queue is transient: what is published while no instance runs is not kept."""
    got: list[str] = []
    svc = Service("presence")
    svc.on("ocis.users.#", delivery=AT_MOST_ONCE, name="track")(lambda e: got.append(e.type))
    app = App(svc, exchange=unique)
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, app, broker_url).running():
        bus.publish(Event("ocis.users.first"))
        wait_for(lambda: got == ["ocis.users.first"], what="first event")
    bus.publish(Event("ocis.users.while_down"))
    with make_worker(buses, app, broker_url).running():
        bus.publish(Event("ocis.users.after"))
        wait_for(lambda: "ocis.users.after" in got, what="event published after restart")
    assert got == ["ocis.users.first", "ocis.users.after"]


def test_at_most_once_is_not_redelivered_after_a_crash(broker_url: str, unique: str, buses: list[object]) -> None:
    """A worker that dies in the middle of an at-most-once handler loses that event, even though another
    instance keeps the queue alive: it was acked on arrival, so nothing is redelivered."""
    started, release = threading.Event(), threading.Event()
    got: list[int] = []
    svc = Service("presence")

    @svc.on("ocis.users.logged_in", delivery=AT_MOST_ONCE)
    def track(event: Event) -> None:
        got.append(event.payload["i"])
        if event.payload["i"] == 0:
            started.set()
            release.wait(10)

    app = App(svc, exchange=unique)
    bus = make_bus(buses, broker_url, unique)
    crashed = make_worker(buses, app, broker_url, concurrency=1)
    crashed.start()
    bus.publish(Event("ocis.users.logged_in", {"i": 0}))

    def took_event_0() -> bool:
        crashed.step(0.01)
        return started.is_set()

    wait_for(took_event_0, what="the crashing worker to take event 0")
    with make_worker(buses, app, broker_url, concurrency=1).running():
        crashed.bus.close()  # the process dies: its connection goes away without any further ack
        bus.publish(Event("ocis.users.logged_in", {"i": 1}))
        wait_for(lambda: 1 in got, what="event after the crash")
    release.set()
    assert got == [0, 1]


def test_at_least_once_is_redelivered_after_a_crash(broker_url: str, unique: str, buses: list[object]) -> None:
    """A worker that dies before acking an at-least-once event leaves it for another instance."""
    calls: list[str] = []
    block = threading.Event()
    svc = Service("indexer")

    @svc.on("ocis.files.uploaded")
    def index(event: Event) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            block.wait(10)

    app = App(svc, exchange=unique)
    bus = make_bus(buses, broker_url, unique)
    crashed = make_worker(buses, app, broker_url)
    crashed.start()
    bus.publish(Event("ocis.files.uploaded"))

    def took_the_event() -> bool:
        crashed.step(0.01)
        return bool(calls)

    wait_for(took_the_event, what="first delivery")
    crashed.bus.close()  # dies without acking
    with make_worker(buses, app, broker_url).running():
        wait_for(lambda: len(calls) == 2, what="redelivery to the other instance")
    block.set()


def test_failing_handler_is_retried_with_backoff_then_dead_lettered(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """A raising handler is retried with growing delays, then dead-lettered with the error; replay
    puts it back and a fixed handler takes it."""
    import time

    attempts: list[tuple[int, float]] = []
    fixed = threading.Event()
    svc = Service("mailer")

    @svc.on("ocis.sharing.share_created", retry=FAST)
    def send(event: Event, ctx: Context) -> None:
        attempts.append((ctx.attempt, time.monotonic()))
        if not fixed.is_set():
            raise ConnectionRefusedError("smtp is down")

    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        event = Event("ocis.sharing.share_created", {"share_id": "s1"})
        bus.publish(event)
        dead = wait_for(lambda: bus.dead_letters(), what="the dead letter")
        assert [a for a, _ in attempts] == [1, 2, 3]
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.05, gaps
        assert gaps[1] >= 0.1, gaps
        (letter,) = dead
        assert letter.id == event.id
        assert letter.attempts == 3
        assert letter.error_type == "builtins.ConnectionRefusedError"
        assert letter.error_message == "smtp is down"
        assert "ConnectionRefusedError" in letter.traceback
        assert letter.routing_key == "ocis.sharing.share_created"
        fixed.set()
        assert bus.replay_dead([event.id]) == [event.id]
        wait_for(lambda: len(attempts) == 4, what="replayed delivery")
        assert attempts[-1][0] == 1  # a fresh attempt count
    assert bus.dead_letters() == []


def test_reject_dead_letters_without_retry(broker_url: str, unique: str, buses: list[object]) -> None:
    """Raising Reject dead-letters the event at once with the reason."""
    calls: list[int] = []
    svc = Service("mailer")

    @svc.on("ocis.sharing.share_created", retry=FAST)
    def send(event: Event) -> None:
        calls.append(1)
        raise Reject("no grantee")

    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        bus.publish(Event("ocis.sharing.share_created"))
        (letter,) = wait_for(lambda: bus.dead_letters(), what="the dead letter")
    assert calls == [1]
    assert "no grantee" in letter.reason


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (pickle.dumps({"share_id": "s1"}), "application/x-python-serialize", "content type"),
        (b'{"id": "x", "type": ', CONTENT_TYPE, "not valid UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", CONTENT_TYPE, "not valid UTF-8 JSON"),
        (json.dumps({"id": "1", "type": "ocis.a.b"}).encode(), CONTENT_TYPE, "missing field"),
        (json.dumps(["not", "an", "object"]).encode(), CONTENT_TYPE, "JSON object"),
        (b"{}" + b" " * (2 * 1024 * 1024), CONTENT_TYPE, "exceeds the limit"),
    ],
    ids=["pickle", "invalid-json", "not-utf8", "missing-fields", "json-list", "2MiB"],
)
def test_hostile_messages_are_dead_lettered_with_a_reason(
    broker_url: str,
    unique: str,
    buses: list[object],
    body: bytes,
    content_type: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Undecodable, non-JSON and oversized messages go to the dead-letter queue with the reason; they never
    reach a handler (a pickle is never unpickled) and the worker keeps handling good events."""
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a pickle body was unpickled"))
    got: list[str] = []
    svc = Service("mailer")
    svc.on("ocis.sharing.share_created", name="send")(lambda e: got.append(e.id))
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        raw_publish(broker_url, unique, "ocis.sharing.share_created", body, content_type)
        (letter,) = wait_for(lambda: bus.dead_letters(), what="the dead letter")
        good = Event("ocis.sharing.share_created")
        bus.publish(good)
        wait_for(lambda: got == [good.id], what="a good event after the bad one")
    assert reason in letter.reason
    assert letter.queue == f"{unique}.mailer.send"
    assert letter.size == len(body)


def test_idempotent_handler_skips_a_redelivered_event(broker_url: str, unique: str, buses: list[object]) -> None:
    """With idempotent=True, an event id that was handled is acked and skipped when it comes again."""
    got: list[str] = []
    svc = Service("mailer")
    svc.on("ocis.sharing.share_created", idempotent=True, name="send")(lambda e: got.append(e.id))
    bus = make_bus(buses, broker_url, unique)
    event = Event("ocis.sharing.share_created")
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        bus.publish(event)
        bus.publish(event)  # the same id again, as a redelivery would bring it
        sentinel = Event("ocis.sharing.share_created")
        bus.publish(sentinel)
        wait_for(lambda: sentinel.id in got, what="sentinel")
    assert got == [event.id, sentinel.id]


def test_follow_ups_carry_correlation_and_causation(broker_url: str, unique: str, buses: list[object]) -> None:
    """Events published from a handler keep the correlation id and name their cause."""
    seen: list[Event] = []
    svc = Service("chain")

    @svc.on("ocis.chain.first")
    def first(event: Event, ctx: Context) -> None:
        ctx.publish("ocis.chain.second", {"from": event.id})

    svc.on("ocis.chain.second")(seen.append)
    bus = make_bus(buses, broker_url, unique)
    origin = Event("ocis.chain.first", correlation_id="upload-42")
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        bus.publish(origin)
        (second,) = wait_for(lambda: seen, what="follow-up")
    assert second.correlation_id == "upload-42"
    assert second.causation_id == origin.id
    assert second.source == "chain"


def test_graceful_stop_finishes_and_acks_in_flight_work(broker_url: str, unique: str, buses: list[object]) -> None:
    """Stopping a worker lets the running handler finish; its event is acked and not handled again."""
    started = threading.Event()
    got: list[str] = []
    svc = Service("slow")

    @svc.on("ocis.files.uploaded")
    def process(event: Event) -> None:
        started.set()
        threading.Event().wait(0.3)  # a handler that takes a while
        got.append(event.id)

    app = App(svc, exchange=unique)
    bus = make_bus(buses, broker_url, unique)
    event = Event("ocis.files.uploaded")
    with make_worker(buses, app, broker_url).running():
        bus.publish(event)
        wait_for(started.is_set, what="handler start")
    assert got == [event.id]  # finished before the worker stopped
    with make_worker(buses, app, broker_url).running():
        sentinel = Event("ocis.files.uploaded")
        bus.publish(sentinel)
        wait_for(lambda: sentinel.id in got, what="sentinel")
    assert got == [event.id, sentinel.id]


def test_publish_validates_before_sending(broker_url: str, unique: str, buses: list[object]) -> None:
    """Invalid names and oversized events raise typed errors; an event nobody hears is fine unless
    mandatory."""
    bus = make_bus(buses, broker_url, unique, max_event_size=1000)
    with pytest.raises(InvalidEventName):
        bus.publish(Event("Bad.Name"))
    with pytest.raises(EventTooLarge, match="over the limit of 1000"):
        bus.publish(Event("ocis.files.uploaded", {"blob": "x" * 2000}))
    bus.publish(Event("ocis.nobody.listens"))
    with pytest.raises(Unroutable):
        bus.publish(Event("ocis.nobody.listens"), mandatory=True)
    assert len(encode(Event("ocis.files.uploaded", {"blob": "x" * 900}))) > 900


def test_subscribing_to_an_invalid_pattern_raises() -> None:
    """A bad pattern or option is refused when the handler is declared, with what to do."""
    svc = Service("bad")
    with pytest.raises(InvalidEventName):
        svc.on("Ocis.Files")
    with pytest.raises(ConfigurationError, match="AT_MOST_ONCE"):
        svc.on("ocis.a.b", broadcast=True)
    with pytest.raises(ConfigurationError, match="delivery must be"):
        svc.on("ocis.a.b", delivery="exactly-once")


def test_a_decorator_without_its_event_says_what_to_write() -> None:
    """`@svc.on`, `@svc.on()` and `@svc.handles` without the event name raise a ConfigurationError with an
    example, never a TypeError."""
    svc = Service("bad")
    with pytest.raises(ConfigurationError, match=r"@bad.on needs the event name or pattern.*@bad.on\('ocis"):
        svc.on(lambda event: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"@bad\.on needs the event name or pattern"):
        svc.on()
    with pytest.raises(ConfigurationError, match=r"@bad.handles needs the request type it answers"):
        svc.handles(lambda event: None)  # type: ignore[arg-type]


def test_handler_concurrency_limit(broker_url: str, unique: str, buses: list[object]) -> None:
    """A handler declared with concurrency=1 never runs twice at once, even in a worker with a larger pool."""
    lock = threading.Lock()
    running, peak, done = [0], [0], []
    svc = Service("serial")

    @svc.on("ocis.serial.work", concurrency=1)
    def work(event: Event) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.01)
        with lock:
            running[0] -= 1
            done.append(event.id)

    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, exchange=unique), broker_url, concurrency=4).running():
        bus.publish_many([Event("ocis.serial.work") for _ in range(20)])
        wait_for(lambda: len(done) == 20, what="20 handled")
    assert peak[0] == 1


def test_a_duplicate_waiting_for_a_busy_handler_does_not_strand_the_next_event(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """With concurrency=1, an event, its duplicate and another event all waiting behind a running handler
    are all settled once it finishes: the duplicate is skipped and the next event still runs."""
    release = threading.Event()
    got: list[str] = []
    svc = Service("serial")

    @svc.on("ocis.serial.work", idempotent=True, concurrency=1)
    def work(event: Event) -> None:
        if event.payload.get("block"):
            release.wait(10)
        got.append(event.payload["name"])

    bus = make_bus(buses, broker_url, unique)
    worker = make_worker(buses, App(svc, exchange=unique), broker_url, concurrency=4)
    twice = Event("ocis.serial.work", {"name": "a"})
    with worker.running():
        bus.publish(Event("ocis.serial.work", {"name": "blocker", "block": True}))
        bus.publish_many([twice, twice, Event("ocis.serial.work", {"name": "last"})])
        wait_for(lambda: worker.handlers.waiting("serial.work") == 3, what="three events waiting")
        release.set()
        wait_for(lambda: "last" in got, what="the event after the duplicate")
    assert got == ["blocker", "a", "last"]


class _Dated(StepSaga):
    """One request whose participant answers with a datetime; its deadline is far away."""

    type = "dated"
    start = Start("ocis.dated.requested", key="dated_id")
    steps = [Step("stamp", "ocis.dated.stamp", timeout=30.0)]


def test_a_reply_that_is_not_json_fails_the_saga_at_once(broker_url: str, unique: str, buses: list[object]) -> None:
    """A request handler whose reply cannot be encoded (a datetime) runs once: the saga gets a failure
    reply with the encoding error's type and reason at once, and does not wait for its deadline."""
    calls: list[int] = []
    svc = Service("stamper")

    @svc.handles("ocis.dated.stamp", retry=FAST)
    def stamp(event: Event) -> dict[str, Any]:
        calls.append(1)
        return {"when": datetime.now(UTC)}

    store = MemoryStore()
    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, sagas=[_Dated], exchange=unique), broker_url, store=store).running():
        bus.publish(Event("ocis.dated.requested", {"dated_id": "d1"}))
        saga = wait_for(
            lambda: (r := store.find_saga("dated", "d1")) is not None and r.final and r, what="the saga to end"
        )
    assert calls == [1]
    reasons = [h.reason for h in store.saga_history(saga.id)]
    assert any("InvalidEvent: the payload of" in r and "not JSON-serialisable" in r for r in reasons), reasons
    assert not any("deadline" in r for r in reasons), reasons
    assert bus.dead_letters() == []


def test_a_permanent_error_is_dead_lettered_without_retries(broker_url: str, unique: str, buses: list[object]) -> None:
    """A TypeError (in Retry.give_up_on by default) dead-letters the event after one attempt, with the
    error; an error added to give_up_on is not retried either; other errors still are."""
    calls: Counter[str] = Counter()
    svc = Service("mailer")

    class QuotaGone(Exception):
        pass

    @svc.on("ocis.sharing.share_created", retry=FAST)
    def send(event: Event) -> None:
        calls["send"] += 1
        raise TypeError("send() got an unexpected keyword argument 'to'")

    @svc.on(
        "ocis.sharing.share_removed", retry=Retry(attempts=3, initial=0.05, give_up_on=(*DEFAULT_PERMANENT, QuotaGone))
    )
    def unshare(event: Event) -> None:
        calls["unshare"] += 1
        raise QuotaGone("over quota")

    bus = make_bus(buses, broker_url, unique)
    with make_worker(buses, App(svc, exchange=unique), broker_url).running():
        bus.publish(Event("ocis.sharing.share_created", {"share_id": "s1"}))
        bus.publish(Event("ocis.sharing.share_removed", {"share_id": "s1"}))
        dead = wait_for(lambda: len(bus.dead_letters()) == 2 and bus.dead_letters(), what="two dead letters")
    assert calls == {"send": 1, "unshare": 1}
    by_type = {d.error_type: d for d in dead}
    letter = by_type["builtins.TypeError"]
    assert letter.attempts == 1
    assert letter.error_message == "send() got an unexpected keyword argument 'to'"
    assert "not retried" in letter.reason
    assert {d.attempts for d in dead} == {1}


def test_give_up_on_must_be_exception_classes() -> None:
    """Retry(give_up_on=...) takes a tuple of exception classes; anything else is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="give_up_on"):
        Retry(give_up_on=(ValueError, "KeyError"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="give_up_on"):
        Retry(give_up_on=ValueError)  # type: ignore[arg-type]
    assert Retry().gives_up(TypeError())
    assert not Retry().gives_up(ValueError())
