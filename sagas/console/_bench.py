"""``sagas bench console``: how fast the console's pages answer over a store, measured through HTTP.

The console is served for real (uvicorn on 127.0.0.1, a free port, in a thread of this process) over the
given store, and a keep-alive HTTP client asks for each kind of page ``requests`` times after a warm-up.
The sagas, keys and cursors asked for are sampled at random (seeded) from the store first, untimed, so
that no page is measured on one saga the database has cached. Each run reports p50, p95, p99 and max in
milliseconds per page kind; ``repeat`` runs give medians. A kind whose p95 exceeds :data:`BUDGET_MS`
is flagged (the console's target on a million sagas).
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

import uvicorn

from transport import redact_url

from .._store import SagaRecord
from ..operations import Operations, encode_cursor
from ._app import create_app

#: A page whose p95 is above this many milliseconds is flagged.
BUDGET_MS = 200.0
#: The figures of each page kind, in milliseconds.
FIGURES = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
#: The most sagas sampled for one run (requests then name them again, in turn).
MAX_SAMPLE = 5000


#: (kind, what it asks for) in report order; each path is built from a sampled saga by :func:`_paths`.
KINDS: list[tuple[str, str]] = [
    ("overview", "the overview page (counts by type and state, stuck sagas, outbox)"),
    ("list", "the saga list, first page, newest first"),
    ("list_key", "the list filtered by a business key (exact)"),
    ("list_key_prefix", "the list filtered by a key prefix (the key less its last 2 characters), newest first"),
    ("list_type_state", "the list filtered by type and state, newest first"),
    ("list_cursor", "a following page of the list through its cursor, newest first, at a random depth"),
    ("saga", "a saga's page by id (with its history)"),
    ("saga_by_key", "a saga's page by type and key"),
    ("api_sagas", "/api/sagas, first page, newest first"),
    ("api_saga", "/api/sagas/{id}"),
]
DEAD_LETTERS = ("dead_letters", "the dead-letter page (with --broker only)")


def _paths(record: SagaRecord) -> dict[str, str]:
    """The path each kind asks for, naming ``record`` (its id, key, type, state, or position)."""
    key, prefix = quote(record.key, safe=""), quote(record.key[:-2] or record.key, safe="")
    return {
        "overview": "/",
        "list": "/sagas?order=newest",
        "list_key": f"/sagas?key={key}",
        "list_key_prefix": f"/sagas?key_prefix={prefix}&order=newest",
        "list_type_state": "/sagas?" + urlencode({"type": record.type, "state": record.state, "order": "newest"}),
        "list_cursor": "/sagas?order=newest&cursor=" + encode_cursor(record.created_at, record.id),
        "saga": f"/sagas/{quote(record.id, safe='')}",
        "saga_by_key": "/saga?" + urlencode({"type": record.type, "key": record.key}),
        "api_sagas": "/api/sagas?order=newest",
        "api_saga": f"/api/sagas/{quote(record.id, safe='')}",
        "dead_letters": "/dead-letters",
    }


def sample(ops: Operations, size: int, rng: random.Random) -> list[SagaRecord]:
    """``size`` sagas picked at random: each the first saga created after a random moment between the
    oldest and the newest saga (index range scans only, on any store size)."""
    oldest = ops.sagas(limit=1).items
    newest = ops.sagas(limit=1, newest_first=True).items
    if not oldest or not newest:
        raise ValueError("the store holds no saga: fill it first (e.g. scripts/gen_sagas.py)")
    low, high = oldest[0].created_at, newest[0].created_at
    picked: list[SagaRecord] = []
    while len(picked) < size:
        moment = rng.uniform(low, high)
        # (" " sorts before every id: the first saga created at or after that moment)
        page = ops.sagas(limit=1, cursor=encode_cursor(moment, " "))
        picked.append(page.items[0] if page.items else newest[0])
    return picked


@contextmanager
def serving(ops: Operations) -> Iterator[int]:
    """The console over ``ops``, served by uvicorn on 127.0.0.1 in a thread; yields its port."""
    # (IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets whose proto says TCP, and
    # Nagle's delay with the client's delayed ACK added 40 ms to every answer sent in two writes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(create_app(ops, token=None), log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="bench-console", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the console did not start")
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Client:
    """One keep-alive HTTP/1.1 connection to the console."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(self, path: str) -> float:
        """Ask for ``path``, read the whole answer; the seconds it took. Anything but 200 is an error."""
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {body[:200].decode('utf-8', 'replace')}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _figures(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in seconds)
    return {
        "p50_ms": round(_pct(ordered, 0.50), 2),
        "p95_ms": round(_pct(ordered, 0.95), 2),
        "p99_ms": round(_pct(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2),
    }


def measure(port: int, kinds: list[str], records: list[SagaRecord], requests: int, warmup: int) -> dict[str, Any]:
    """``warmup`` untimed, then ``requests`` timed requests of each kind, the kinds taking turns (so that
    the machine's noise spreads over all of them). Each request names the next sampled saga: no two
    requests in a row ask for the same one while the sample lasts."""
    client = Client(port)
    turn = 0

    def ask(kind: str) -> float:
        nonlocal turn
        turn += 1
        return client.get(_paths(records[turn % len(records)])[kind])

    try:
        for _ in range(warmup):
            for kind in kinds:
                ask(kind)
        timings: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(requests):
            for kind in kinds:
                timings[kind].append(ask(kind))
    finally:
        client.close()
    return {kind: _figures(times) for kind, times in timings.items()}


def _progress(text: str) -> None:
    print(f"\r{text:<70}" + ("" if text else "\r"), end="", file=sys.stderr, flush=True)


def run(
    ops: Operations,
    *,
    store_url: str,
    requests: int = 200,
    repeat: int = 1,
    warmup: int = 20,
    seed: int = 1,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """Serve the console over ``ops`` and measure its pages ``repeat`` times; the report (every run, and
    the medians of each figure over the runs)."""
    if requests < 1 or repeat < 1:
        raise ValueError("requests and repeat must be 1 or more")
    kinds = [k for k, _ in KINDS] + ([DEAD_LETTERS[0]] if ops.bus is not None else [])
    rng = random.Random(seed)
    progress("console: counting the store's sagas")
    count = ops.store.count_sagas()
    runs: list[dict[str, Any]] = []
    with serving(ops) as port:
        for i in range(repeat):
            progress(f"console: run {i + 1} of {repeat}: sampling the store's sagas")
            # (a fresh sample each run, read while no request is in flight: the client asks in this thread)
            records = sample(ops, min((requests + warmup) * len(kinds), MAX_SAMPLE), rng)
            progress(f"console: run {i + 1} of {repeat}: {requests} requests of {len(kinds)} pages")
            runs.append(measure(port, kinds, records, requests, warmup))
    progress("")
    median = {k: {f: round(statistics.median(r[k][f] for r in runs), 2) for f in FIGURES} for k in kinds}
    return {
        "workload": "console",
        "store": redact_url(store_url),
        "sagas": count,
        "requests": requests,
        "warmup": warmup,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "budget_p95_ms": BUDGET_MS,
        "runs": runs,
        "median": median,
        "over_budget": [k for k in kinds if median[k]["p95_ms"] > BUDGET_MS],
    }


def table(report: dict[str, Any]) -> str:
    n_runs = len(report["runs"])
    lines = [
        f"console on {report['store']}: {report['sagas']:,} sagas, {report['requests']} requests per page"
        f" ({'median of ' + str(n_runs) + ' runs' if n_runs > 1 else '1 run'})",
        f"  {'page':<18}" + "".join(f"{f.removesuffix('_ms') + ' ms':>11}" for f in FIGURES),
    ]
    for kind, figures in report["median"].items():
        flag = f"  <- p95 over {report['budget_p95_ms']:g} ms" if kind in report["over_budget"] else ""
        lines.append(f"  {kind:<18}" + "".join(f"{figures[f]:>11.1f}" for f in FIGURES) + flag)
    return "\n".join(lines)
