"""OpenTelemetry traces (sagas._tracing): spans with the SDK's in-memory exporter, one tree per saga."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from examples import postprocessing
from sagas import App, Context, Event, EventBus, Retry, Service, Worker, _cli, _tracing
from sagas._logging import configure_logging
from sagas.testing import Drop, Harness
from tests.helpers import CommitFailsOnce, wait_for

PING, BOOM = "demo.tracing.ping", "demo.tracing.boom"

svc = Service("tracer")
handled: list[dict[str, Any]] = []


@svc.on(PING, name="ping")
def ping(event: Event, ctx: Context) -> None:
    structlog.get_logger("test").info("ping.handled")
    ctx.publish(PING + "ed", {"n": event.payload["n"]})


@svc.on(BOOM, name="boom", retry=Retry(attempts=3, initial=0.5))
def boom(event: Event) -> None:
    raise RuntimeError("the handler broke")


app = App(svc)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _tracing.set_tracer_provider(None)
        provider.shutdown()


def _traced_event(type: str, payload: dict[str, Any]) -> Event:
    """An event as a traced publisher sends it: with the trace context of its publish span."""
    event = Event(type=type, payload=payload, source="test")
    return Event(type=type, payload=payload, source="test", id=event.id, headers=_tracing.outgoing(type, event.id, {}))


def _one_tree(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    """All spans share one trace id, every parent is among them, and there is one root: return it."""
    assert spans
    assert len({s.context.trace_id for s in spans}) == 1, sorted({s.name for s in spans})
    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert orphans == []
    return roots[0]


def test_a_handler_span_is_the_child_of_the_publish_span(spans: InMemorySpanExporter) -> None:
    event = _traced_event(PING, {"n": 1})
    assert event.headers["traceparent"].startswith("00-")
    with Harness(app) as h:
        h.send(event)
        h.settle()
    finished = spans.get_finished_spans()
    publish = next(s for s in finished if s.name == f"{PING} publish")
    handler = next(s for s in finished if s.name == f"{PING} process")
    follow_up = next(s for s in finished if s.name == f"{PING}ed publish")
    assert publish.kind is SpanKind.PRODUCER
    assert handler.kind is SpanKind.CONSUMER
    assert handler.parent is not None
    assert handler.parent.span_id == publish.context.span_id
    assert handler.context.trace_id == publish.context.trace_id
    assert follow_up.parent is not None
    assert follow_up.parent.span_id == handler.context.span_id
    attrs = dict(handler.attributes or {})
    assert attrs["messaging.system"] == "memory"
    assert attrs["messaging.operation"] == "process"
    assert attrs["messaging.message.id"] == event.id
    assert attrs["messaging.destination.name"]
    assert attrs["sagas.handler"] == "ping"
    assert attrs["sagas.attempt"] == 1
    assert dict(publish.attributes or {})["messaging.operation"] == "publish"
    assert handler.status.status_code is StatusCode.UNSET
    _one_tree(finished)


def test_an_async_handler_span_is_the_child_of_the_publish_span_and_its_follow_ups_its_children(
    spans: InMemorySpanExporter,
) -> None:
    """On the worker's event loop as on its pool: the handler's span is current while it awaits, so its
    follow-up and its log lines are under it; an error of a later step is recorded on it."""
    aio = Service("aio-tracer")
    lines: list[dict[str, Any]] = []

    @aio.on(PING, name="ping")
    async def ping(event: Event, ctx: Context) -> None:
        await asyncio.sleep(0)
        lines.append(_tracing.ids(trace.get_current_span()))
        ctx.publish(PING + "ed", {"n": event.payload["n"]})

    @aio.on(BOOM, name="boom", retry=Retry(attempts=1))
    async def boom(event: Event) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the async handler broke")

    exchange = f"aio-tracing-{uuid.uuid4().hex[:8]}"
    worker = Worker(App(aio, exchange=exchange), store="memory://")
    with worker.running(), EventBus("memory://", exchange=exchange) as bus:
        event = _traced_event(PING, {"n": 1})
        bus.publish_many([event, _traced_event(BOOM, {})])
        wait_for(lambda: len([s for s in spans.get_finished_spans() if s.name.endswith("process")]) == 2, what="2")
    finished = spans.get_finished_spans()
    publish = next(s for s in finished if s.name == f"{PING} publish")
    handler = next(s for s in finished if s.name == f"{PING} process")
    follow_up = next(s for s in finished if s.name == f"{PING}ed publish")
    assert handler.parent is not None
    assert handler.parent.span_id == publish.context.span_id
    assert follow_up.parent is not None
    assert follow_up.parent.span_id == handler.context.span_id
    assert lines == [{"trace_id": f"{handler.context.trace_id:032x}", "span_id": f"{handler.context.span_id:016x}"}]
    failed = next(s for s in finished if s.name == f"{BOOM} process")
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.events[0].attributes or {})["exception.type"] == "RuntimeError"


def test_a_failing_handler_sets_error_records_the_exception_and_shows_its_retries(
    spans: InMemorySpanExporter,
) -> None:
    with Harness(app) as h:
        h.send(_traced_event(BOOM, {}))
        h.settle()
        assert len(h.dead_letters()) == 1
    finished = spans.get_finished_spans()
    runs = sorted((s for s in finished if s.name == f"{BOOM} process"), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {})["sagas.attempt"] for s in runs] == [1, 2, 3]
    for run in runs:
        assert run.status.status_code is StatusCode.ERROR
        assert [e.name for e in run.events] == ["exception"]
        assert dict(run.events[0].attributes or {})["exception.type"] == "RuntimeError"
    settled = [s.name.removeprefix(f"{BOOM} ") for s in sorted(finished, key=lambda s: s.start_time or 0)]
    assert [n for n in settled if n in ("retry", "dead-letter")] == ["retry", "retry", "dead-letter"]
    assert all(s.status.status_code is StatusCode.ERROR for s in finished if s.name.endswith(("retry", "letter")))
    _one_tree(finished)


UPLOAD = "ocis.storage.bytes_received"


def test_one_saga_is_one_trace_and_one_tree_through_a_lost_reply_and_a_deadline(
    spans: InMemorySpanExporter,
) -> None:
    with Harness(postprocessing.app) as h:
        h.inject(Drop(), match="ocis.antivirus.scan.reply")  # the first reply is lost: the deadline re-sends
        h.send(_traced_event(UPLOAD, {"upload_id": "u1", "name": "a.txt", "size": 10, "user": "marie"}))
        h.settle()
        record = h.saga(postprocessing.Postprocessing, "u1")
    assert record.state == "done"
    assert record.meta["trace"]["traceparent"].startswith("00-")
    finished = spans.get_finished_spans()
    root = _one_tree(finished)
    assert root.name == f"{UPLOAD} publish"
    names = [s.name for s in finished]
    # the re-sent request is answered from the reply cache (no handler run, a span of its own): its
    # deadline is in the tree
    assert names.count("ocis.antivirus.scan process") == 2
    assert "saga postprocessing deadline" in names
    deadline = next(s for s in finished if s.name == "saga postprocessing deadline")
    scans = [s for s in finished if s.name == "ocis.antivirus.scan process"]
    # the deadline span names the request it re-sent: the same message, handled twice
    resent = dict(deadline.attributes or {})["sagas.message_ids"]
    assert isinstance(resent, tuple | list)
    assert list(resent) == [dict(scans[0].attributes or {})["messaging.message.id"]]
    assert {dict(s.attributes or {})["messaging.message.id"] for s in scans} == set(resent)
    assert "saga postprocessing - -> scanning" in names
    assert "saga postprocessing finishing -> done" in names
    assert "ocis.postprocessing.finished process" in names  # the event the saga publishes, handled
    transition = next(s for s in finished if s.name == "saga postprocessing scanning -> checking")
    assert dict(transition.attributes or {})["sagas.saga.id"] == record.id
    consumer = next(s for s in finished if s.name == f"{UPLOAD} process")
    assert dict(consumer.attributes or {})["sagas.saga.state"] == "scanning"
    # a saga message's span names the saga type's queue, as a handler's names its own
    queue = f"{postprocessing.app.exchange}.saga.postprocessing"
    assert dict(consumer.attributes or {})["messaging.destination.name"] == queue


def test_a_request_answered_from_the_reply_cache_has_a_consumer_span_and_its_reply_is_a_child(
    spans: InMemorySpanExporter,
) -> None:
    """A re-sent request answered from the reply cache gets a CONSUMER span (sagas.outcome=reply-cache),
    child of the request's publish span; the reply published again is a child of that span."""
    with Harness(postprocessing.app) as h:
        h.inject(Drop(), match="ocis.antivirus.scan.reply")  # the first reply is lost: the deadline re-sends
        h.send(_traced_event(UPLOAD, {"upload_id": "u3", "name": "a.txt", "size": 10, "user": "marie"}))
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u3").state == "done"
    finished = spans.get_finished_spans()
    request = next(s for s in finished if s.name == "ocis.antivirus.scan publish")
    runs = sorted((s for s in finished if s.name == "ocis.antivirus.scan process"), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {}).get("sagas.outcome") for s in runs] == [None, "reply-cache"]
    cached = runs[1]
    assert cached.kind is SpanKind.CONSUMER
    assert cached.parent is not None
    assert cached.parent.span_id == request.context.span_id
    attrs = dict(cached.attributes or {})
    assert (attrs["sagas.service"], attrs["sagas.handler"], attrs["messaging.operation"]) == (
        "antivirus",
        "scan",
        "process",
    )
    replies = [s for s in finished if s.name == "ocis.antivirus.scan.reply publish"]
    assert sorted(s.parent.span_id for s in replies if s.parent) == sorted(
        [runs[0].context.span_id, cached.context.span_id]
    )
    # the saga moved on the cached copy: its message span is the child of the reply published again
    moved = next(
        s
        for s in finished
        if s.name == "ocis.antivirus.scan.reply process" and dict(s.attributes or {})["sagas.outcome"] == "moved"
    )
    again = next(s for s in replies if s.parent and s.parent.span_id == cached.context.span_id)
    assert moved.parent is not None
    assert moved.parent.span_id == again.context.span_id
    _one_tree(finished)


def test_a_handled_message_given_back_because_the_commit_failed_ends_its_span_with_error(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """A handler ran, then the store failed to commit its inbox record: the message is given back, and
    the handler's span ends with ERROR, the exception and sagas.outcome=given-back, with a retry child."""
    notes = Service("notes")
    ran: list[str] = []
    notes.on(PING, name="note", idempotent=True, retry=Retry(attempts=3, initial=0.5))(lambda e: ran.append(e.id))
    store = CommitFailsOnce(str(tmp_path / "s.db"))
    event = _traced_event(PING, {"n": 3})
    with Harness(App(notes), store=store) as h:
        h.send(event)
        h.settle()
    assert store.failures == 0
    assert ran == [event.id, event.id]  # (the commit that failed was rolled back: it ran again)
    finished = spans.get_finished_spans()
    runs = sorted((s for s in finished if s.name == f"{PING} process"), key=lambda s: s.start_time or 0)
    assert len(runs) == 2
    first, second = runs
    assert first.status.status_code is StatusCode.ERROR
    assert (first.status.description or "").startswith("given back: ConnectionError")
    assert dict(first.attributes or {})["sagas.outcome"] == "given-back"
    assert [dict(e.attributes or {})["exception.type"] for e in first.events] == ["ConnectionError"]
    retry = next(s for s in finished if s.name == f"{PING} retry")
    assert retry.parent is not None
    assert retry.parent.span_id == first.context.span_id
    assert second.status.status_code is StatusCode.UNSET
    assert "sagas.outcome" not in dict(second.attributes or {})
    _one_tree(finished)


def test_a_saga_message_given_back_because_the_commit_failed_ends_its_span_with_error(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """A saga message applied in a group whose commit failed (rolled back) is given back: its span ends
    with ERROR, the exception and sagas.outcome=given-back; applied again, its span says moved."""
    store = CommitFailsOnce(str(tmp_path / "s.db"))
    with Harness(postprocessing.app, store=store) as h:
        h.send(_traced_event(UPLOAD, {"upload_id": "u4", "name": "a.txt", "size": 10, "user": "marie"}))
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u4").state == "done"
    assert store.failures == 0
    finished = spans.get_finished_spans()
    runs = sorted((s for s in finished if s.name == f"{UPLOAD} process"), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {})["sagas.outcome"] for s in runs] == ["given-back", "moved"]
    assert [s.status.status_code for s in runs] == [StatusCode.ERROR, StatusCode.UNSET]
    assert (runs[0].status.description or "").startswith("given back: ConnectionError")
    assert [dict(e.attributes or {})["exception.type"] for e in runs[0].events] == ["ConnectionError"]
    _one_tree(finished)


class _RecordingBus:
    """Stands in for the EventBus of `sagas publish`: keeps what it is asked to publish."""

    published: ClassVar[list[Event]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _RecordingBus:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def publish(self, event: Event, **kwargs: Any) -> None:
        self.published.append(event)


def test_sagas_publish_makes_a_producer_span_and_carries_its_context(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tracer provider, `sagas publish` builds its event as the framework builds others: a
    PRODUCER span `<type> publish`, whose context travels in the event's headers."""
    monkeypatch.setattr(_cli, "EventBus", _RecordingBus)
    monkeypatch.setattr(_RecordingBus, "published", [])
    result = CliRunner().invoke(
        _cli.cli, ["publish", "ocis.cli.poked", '{"n": 1}', "--broker", "amqp://guest:guest@127.0.0.1:5672//"]
    )
    assert result.exit_code == 0, result.output
    [event] = _RecordingBus.published
    assert result.output.strip() == event.id
    [span] = spans.get_finished_spans()
    assert (span.name, span.kind) == ("ocis.cli.poked publish", SpanKind.PRODUCER)
    assert dict(span.attributes or {})["messaging.message.id"] == event.id
    trace_id, span_id = event.headers["traceparent"].split("-")[1:3]
    assert (trace_id, span_id) == (format(span.context.trace_id, "032x"), format(span.context.span_id, "016x"))
    assert (event.payload, event.source, event.correlation_id) == ({"n": 1}, "cli", event.id)


def test_logs_carry_the_trace_and_span_ids(spans: InMemorySpanExporter, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True, level="info")
    try:
        with Harness(app) as h:
            h.send(_traced_event(PING, {"n": 2}))
            h.settle()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    line = next(line for line in lines if line["event"] == "ping.handled")
    handler = next(s for s in spans.get_finished_spans() if s.name == f"{PING} process")
    assert line["trace_id"] == format(handler.context.trace_id, "032x")
    assert line["span_id"] == format(handler.context.span_id, "016x")


@pytest.mark.parametrize("where", ["handler", "saga"])
def test_the_lines_about_an_unusual_outcome_carry_the_ids_of_the_message_span(
    spans: InMemorySpanExporter, where: str
) -> None:
    """The framework's own lines about a message are written once it is settled, outside its span
    (here: a handler's failed attempt; a saga message that finds no saga), and still carry the ids of
    its span (capture_logs runs no processor: the ids are in the line itself)."""
    if where == "handler":
        with Harness(app) as h, structlog.testing.capture_logs() as logs:
            h.send(_traced_event(BOOM, {}))
            h.run()
        line = next(line for line in logs if line["event"] == "message.failed")
        span = next(s for s in spans.get_finished_spans() if s.name == f"{BOOM} process")
    else:
        with Harness(postprocessing.app) as h, structlog.testing.capture_logs() as logs:
            h.send(_traced_event("ocis.antivirus.scan.reply", {"upload_id": "nobody"}))
            h.run()
        line = next(line for line in logs if line["event"] == "message.ignored")
        span = next(s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER)
        assert "saga_id" not in line  # (no saga was found)
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["span_id"] == format(span.context.span_id, "016x")


def test_without_opentelemetry_the_worker_runs_and_traces_nothing() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if it were not installed: importing it fails
        from sagas import _tracing
        from sagas.testing import Harness
        from examples import postprocessing
        assert not _tracing.ENABLED
        assert _tracing.outgoing("a.b", "x", {}) == {}
        assert _tracing.transition(len) is len and _tracing.saga_message(len) is len  # undecorated
        with Harness(postprocessing.app) as h:
            h.publish("ocis.storage.bytes_received", {"upload_id": "u1", "name": "a", "size": 1, "user": "m"})
            h.settle()
            record = h.saga(postprocessing.Postprocessing, "u1")
        assert record.state == "done" and "trace" not in record.meta, record
        assert not any(name.startswith("opentelemetry") for name in sys.modules if sys.modules[name] is not None)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "ok"


def test_with_the_api_and_no_provider_nothing_is_traced() -> None:
    assert _tracing.ENABLED
    assert _tracing.outgoing(PING, "x", {"a": "b"}) == {"a": "b"}
    with Harness(postprocessing.app) as h:
        h.publish(UPLOAD, {"upload_id": "u2", "name": "a.txt", "size": 10, "user": "marie"})
        h.settle()
        record = h.saga(postprocessing.Postprocessing, "u2")
    assert record.state == "done"
    assert "trace" not in record.meta


# -- head sampling: an unsampled trace costs no spans past its root ---------------------------------------


class _CountingTracer:
    """A tracer that counts the spans asked of it, made or not (an SDK tracer's spans)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.asked = 0

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        self.asked += 1
        return self.tracer.start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        self.asked += 1
        return self.tracer.start_as_current_span(*args, **kwargs)


class _CountingProvider(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        self.counting = _CountingTracer(super().get_tracer(*args, **kwargs))
        return self.counting


@pytest.fixture
def sampled() -> Iterator[Any]:
    """``sampled(sampler)``: trace with an SDK provider using ``sampler``; yields (exporter, counting tracer)."""
    made: list[TracerProvider] = []

    def trace_with(sampler: Any) -> tuple[InMemorySpanExporter, _CountingTracer]:
        exporter = InMemorySpanExporter()
        provider = _CountingProvider(sampler=sampler)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        _tracing.set_tracer_provider(provider)
        made.append(provider)
        return exporter, provider.counting

    try:
        yield trace_with
    finally:
        _tracing.set_tracer_provider(None)
        for provider in made:
            provider.shutdown()


def _upload(h: Harness, upload_id: str) -> str:
    """Send an upload as a traced client does; return its trace id (hex)."""
    event = _traced_event(UPLOAD, {"upload_id": upload_id, "name": "a.txt", "size": 10, "user": "marie"})
    h.send(event)
    return event.headers["traceparent"].split("-")[1]


def test_a_trace_the_sampler_dropped_at_its_root_makes_no_span_after_it_and_its_context_travels(sampled: Any) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    spans, tracer = sampled(ParentBased(ALWAYS_OFF))
    with Harness(postprocessing.app) as h:
        h.inject(Drop(), match="ocis.antivirus.scan.reply")  # a deadline re-sends: its span point too
        trace_id = _upload(h, "u1")
        h.settle()
        record = h.saga(postprocessing.Postprocessing, "u1")
    assert record.state == "done"
    assert spans.get_finished_spans() == ()
    # the root's span was asked of the sampler, which dropped it; no other span point asked for one
    assert tracer.asked == 1
    # the unsampled decision travels with the saga: its deadlines and operator actions keep the trace
    traceparent = record.meta["trace"]["traceparent"]
    assert traceparent.split("-")[1] == trace_id
    assert int(traceparent.split("-")[3], 16) & 1 == 0  # (not sampled)


def test_a_sampler_that_samples_under_unsampled_parents_is_asked_for_every_span(sampled: Any) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    # not the default: a message from an unsampled trace starts recording again in its consumer
    spans, tracer = sampled(ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON))
    with Harness(postprocessing.app) as h:
        trace_id = _upload(h, "u1")
        h.settle()
        assert h.saga(postprocessing.Postprocessing, "u1").state == "done"
    finished = spans.get_finished_spans()
    assert tracer.asked > 10
    assert finished
    assert {format(s.context.trace_id, "032x") for s in finished} == {trace_id}
    assert f"{UPLOAD} process" in [s.name for s in finished]


def test_with_head_sampling_each_trace_is_recorded_whole_or_not_at_all(sampled: Any) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    spans, _ = sampled(ParentBased(TraceIdRatioBased(0.5)))
    with Harness(postprocessing.app) as h:
        traces = {_upload(h, f"u{n}"): f"u{n}" for n in range(30)}
        h.settle()
        assert {h.saga(postprocessing.Postprocessing, u).state for u in traces.values()} == {"done"}
    by_trace: dict[str, list[ReadableSpan]] = {}
    for span in spans.get_finished_spans():
        by_trace.setdefault(format(span.context.trace_id, "032x"), []).append(span)
    assert set(by_trace) <= set(traces)
    assert 0 < len(by_trace) < len(traces)  # (all or none of 30 at 0.5: about 2 in a billion)
    sizes = set()
    for recorded in by_trace.values():
        assert _one_tree(recorded).name == f"{UPLOAD} publish"
        sizes.add(len(recorded))
    assert len(sizes) == 1  # every recorded saga whole: as many spans as the others
