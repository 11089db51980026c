"""Issue 13's done-when test for traces: the post-processing example on RabbitMQ, two ``sagas run`` worker
processes, replies lost (``DROP_RATE``): every span of one upload shares one trace id, and their parent
links form one tree, across the test process and both workers."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagas import Event, EventBus, _tracing, open_store
from tests.observability.spanfile import span_record

ROOT = Path(__file__).resolve().parents[2]
UPLOADS = 8
WORKERS = 2
#: seconds for every saga to end, with room for two of an upload's steps to run out of retries
FINAL_WITHIN = 360

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _queues(prefix: str) -> list[str]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60, check=False
    )
    return [q for q in listed.stdout.split() if q.startswith(f"{prefix}.")]


@pytest.fixture
def workers(tmp_path: Path, unique: str, amqp_url: str) -> Iterator[tuple[str, Path, list[subprocess.Popen[bytes]]]]:
    store_url = f"sqlite:///{tmp_path / 'sagas.db'}"
    open_store(store_url).close()  # the schema, before the workers race to create it
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAGAS_TEST_SPANS": str(tmp_path / "spans"),
        "DROP_RATE": "0.3",  # a reply in three is lost: the saga's deadline re-sends the request
    }
    app = "tests.observability.traced_app:app"
    command = [sys.executable, "-m", "sagas", "--log-level", "warning", "run", app, "--broker", amqp_url]
    command += ["--store", store_url, "--exchange", unique]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(WORKERS):
            with open(tmp_path / f"worker-{i}.log", "ab") as log:
                procs.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=log,
                        stderr=log,
                        cwd=ROOT,
                    )
                )
        yield store_url, tmp_path, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        cleaner = EventBus(amqp_url, exchange=unique)
        cleaner.declared_queues.update(_queues(unique))
        cleaner.delete_topology()
        cleaner.close()


def _wait(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                tail = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("worker-*.log")))
                raise AssertionError(f"worker {p.pid} exited with {p.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def test_every_span_of_one_upload_is_in_one_trace_and_one_tree_across_two_workers(
    workers: tuple[str, Path, list[subprocess.Popen[bytes]]], unique: str, amqp_url: str
) -> None:
    store_url, tmp, procs = workers
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = open_store(store_url)
    bus = EventBus(amqp_url, exchange=unique)
    _tracing.set_tracer_provider(provider)
    try:
        queue = f"{unique}.saga.postprocessing"
        _wait(lambda: queue in _queues(unique), 60, f"the workers' queue {queue}", procs, tmp)
        time.sleep(1.0)  # (both workers consuming: the second declares its queues shortly after the first)
        uploads: dict[str, str] = {}  # upload id -> trace id
        for i in range(UPLOADS):
            payload: dict[str, Any] = {"upload_id": f"up-{i}", "name": f"file-{i}.txt", "size": 1000 + i, "user": "m"}
            start = Event("ocis.storage.bytes_received", payload, source="test")
            headers = _tracing.outgoing(start.type, start.id, {})
            bus.publish(Event(start.type, payload, source="test", id=start.id, headers=headers))
            uploads[payload["upload_id"]] = headers["traceparent"].split("-")[1]

        def final() -> bool:
            sagas = store.list_sagas()
            return len(sagas) == UPLOADS and all(s.final for s in sagas)

        # Usually about 20 s. A request whose reply is dropped at all of its 5 attempts (0.3 ** 5 each, so
        # about one run in 25 for 16 requests) ends only when its step's retries run out, which the
        # example's schedule (5 s, backing off) puts about 160 s after the step began; then the saga
        # reverts and finishes. Waiting for that keeps the run from failing on the dice.
        _wait(final, FINAL_WITHIN, f"{UPLOADS} sagas final", procs, tmp)
        time.sleep(1.0)  # (the last spans of the last handlers are written after their settle)
    finally:
        _tracing.set_tracer_provider(None)
        bus.close()
        store.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(60) for p in procs] == [0] * WORKERS

    spans: list[dict[str, Any]] = [span_record(s) for s in exporter.get_finished_spans()]
    for path in tmp.glob("spans.*"):
        spans += [json.loads(line) for line in path.read_text().splitlines()]
    by_trace: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for span in spans:
        by_trace[span["trace_id"]].append(span)
    assert sorted(by_trace) == sorted(uploads.values()), "a span outside the uploads' traces"
    pids: set[int] = set()
    resent = 0
    for upload, trace_id in uploads.items():
        tree = by_trace[trace_id]
        ids = {s["span_id"] for s in tree}
        roots = [s["name"] for s in tree if s["parent_id"] is None]
        assert roots == ["ocis.storage.bytes_received publish"], (upload, roots)
        assert [s["name"] for s in tree if s["parent_id"] is not None and s["parent_id"] not in ids] == [], upload
        names = collections.Counter(s["name"] for s in tree)
        for expected in [
            "ocis.storage.bytes_received process",
            "saga postprocessing - -> scanning",
            "ocis.antivirus.scan process",
            "ocis.policies.check process",
            "ocis.postprocessing.finished process",
            "saga postprocessing finishing -> done",
        ]:
            assert names[expected] >= 1, (upload, expected, sorted(names))
        saga_ids = {s["attributes"].get("sagas.saga.id") for s in tree} - {None}
        assert len(saga_ids) == 1, (upload, saga_ids)
        resent += names["saga postprocessing deadline"]
        pids |= {s["pid"] for s in tree if s["name"].endswith(" process")}
    assert len(pids) == WORKERS, "every handler ran in one worker"
    assert resent >= 1, "no reply was lost, so no deadline re-sent a request"
