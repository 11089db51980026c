"""Fill a PostgreSQL or SQLite store with many sagas, then time the operator API's reads on it (a benchmark).

    python scripts/gen_sagas.py --store 'postgresql://postgres@127.0.0.1/test?schema=bench' -n 1000000
    python scripts/gen_sagas.py --store sqlite:////tmp/sagas-1m.db -n 1000000

Writes ``-n`` sagas (and one history row each) with COPY on PostgreSQL, batched inserts in one transaction
on SQLite: a mix of types, of states (mostly ended, some waiting with a deadline, some parked in
``failed`` with a reason, tracebacks included), business keys and creation times over 30 days, with many
sagas created in the same millisecond. Then, ``--runs`` times each, it times ``Operations.sagas`` (first
page both orders, a page deep in the listing by cursor, an exact key, a key prefix, failed sagas),
``Operations.saga(id)`` and ``Operations.overview()``, and prints p50 and p95 in milliseconds. The
PostgreSQL schema is created if needed; ``--drop`` drops it at the end. ``sagas bench console --store
URL`` then times the console's pages over the same store (docs/performance.md, "Console").
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from sagas import open_store
from sagas.operations import Operations

TYPES = [("postprocessing", "upload", 0.6), ("share", "share", 0.2), ("payment", "pay", 0.15), ("export", "exp", 0.05)]
FAILURES = [
    "ValueError: unsupported file type\nTraceback (most recent call last):\n  File 'scan.py', line 12\nValueError",
    "timed out waiting for a reply to ocis.antivirus.scan after 3 attempts",
    "Traceback (most recent call last):\n  File 'charge.py', line 40, in charge\nKeyError: 'iban'",
    "rejected by handler payments.charge: card declined",
]
COLUMNS = "id, type, key, state, data, version, deadline, attempts, meta, final, created_at, updated_at"


def _connect(url: str) -> tuple[psycopg.Connection[tuple[object, ...]], str]:
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    schema = query.pop("schema", "public")
    rest = "&".join(f"{k}={v}" for k, v in query.items())
    conn = psycopg.connect(parts._replace(query=rest).geturl(), autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn, schema


def _rows(n: int, seed: int) -> Iterator[tuple[tuple[object, ...], tuple[object, ...], bool]]:
    """``n`` sagas: each one's row, its history row, and whether it is in the sample of ids and keys."""
    rng = random.Random(seed)
    now = time.time()
    start = now - 30 * 86400
    step = (now - start) / n
    names = [t[0] for t in TYPES]
    prefixes = {t[0]: t[1] for t in TYPES}
    weights = [t[2] for t in TYPES]
    counters = dict.fromkeys(names, 0)
    for i in range(n):
        saga_type = rng.choices(names, weights)[0]
        counters[saga_type] += 1
        key = f"{prefixes[saga_type]}-{counters[saga_type]:08d}"
        saga_id = f"{rng.getrandbits(128):032x}"
        created = round(start + i * step, 3)  # (milliseconds: neighbours share a creation time)
        roll = rng.random()
        deadline = None
        meta: dict[str, object] = {}
        if roll < 0.85:
            state, final = "done", True
        elif roll < 0.88:
            state, final = "failed", True
            meta = {"reason": rng.choice(FAILURES), "failed_from": "scanning"}
        elif roll < 0.90:
            state, final = "compensated", True
        else:
            state, final = "waiting", False
            deadline = created + rng.choice([30.0, 300.0, 3600.0, 40 * 86400.0])
            meta = {"request": {"type": "ocis.antivirus.scan", "id": f"{rng.getrandbits(64):016x}"}}
        data = json.dumps({"key": key, "name": f"file-{i}.pdf", "size": rng.randrange(1, 10**9)})
        saga = (saga_id, saga_type, key, state, data, 3, deadline, 0, json.dumps(meta), int(final), created, created)
        history = (saga_id, 3, created, f"m{i}", "scanning", state, "generated", "")
        yield saga, history, rng.random() < 2000 / n


def generate(url: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Write ``n`` sagas; return a sample of their ids and of their keys."""
    open_store(url).close()  # the schema and tables, as a worker creates them
    ids: list[str] = []
    keys: list[str] = []
    if urlsplit(url).scheme == "sqlite":
        _generate_sqlite(url, n, seed, ids, keys)
        return ids, keys
    conn, _ = _connect(url)
    other, _ = _connect(url)  # (one COPY at a time on a connection: the history goes through another)
    with (
        conn.cursor() as cur,
        cur.copy(f"COPY sagas ({COLUMNS}) FROM STDIN") as sagas_copy,
        other.cursor().copy(
            "COPY saga_history (saga_id, seq, at, message_id, from_state, to_state, reason, actor) FROM STDIN"
        ) as history_copy,
    ):
        for saga, history, sampled in _rows(n, seed):
            sagas_copy.write_row(saga)
            history_copy.write_row(history)
            if sampled:
                ids.append(str(saga[0]))
                keys.append(str(saga[2]))
    conn.execute("ANALYZE sagas")
    conn.execute("ANALYZE saga_history")
    conn.close()
    other.close()
    return ids, keys


def _generate_sqlite(url: str, n: int, seed: int, ids: list[str], keys: list[str]) -> None:
    """The SQLite twin of the COPY: batches of inserts in one transaction."""
    db = sqlite3.connect(url.removeprefix("sqlite:///").split("?", 1)[0], isolation_level=None)
    db.execute("BEGIN")
    sagas: list[tuple[object, ...]] = []
    histories: list[tuple[object, ...]] = []

    def flush() -> None:
        db.executemany(f"INSERT INTO sagas ({COLUMNS}) VALUES ({', '.join('?' * 12)})", sagas)
        db.executemany(
            "INSERT INTO saga_history (saga_id, seq, at, message_id, from_state, to_state, reason, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            histories,
        )
        sagas.clear()
        histories.clear()

    for saga, history, sampled in _rows(n, seed):
        sagas.append(saga)
        histories.append(history)
        if sampled:
            ids.append(str(saga[0]))
            keys.append(str(saga[2]))
        if len(sagas) >= 10_000:
            flush()
    flush()
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def measure(label: str, runs: int, call: Callable[[int], object]) -> None:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    print(f"{label:<40} p50 {statistics.median(times):7.2f} ms   p95 {p95:7.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--store", required=True, help="postgresql://...?schema=name or sqlite:///path (created if missing)"
    )
    parser.add_argument("-n", type=int, default=1_000_000, help="sagas to write (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=200, help="timed calls of each read (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drop", action="store_true", help="drop the schema at the end")
    args = parser.parse_args()
    if urlsplit(args.store).scheme not in ("postgresql", "postgres", "sqlite"):
        parser.error("--store must be a postgresql:// or sqlite:/// URL")
    if args.drop and urlsplit(args.store).scheme == "sqlite":
        parser.error("--drop drops a PostgreSQL schema; delete a SQLite file yourself")
    t0 = time.perf_counter()
    ids, keys = generate(args.store, args.n, args.seed)
    print(f"wrote {args.n:,} sagas and their history in {time.perf_counter() - t0:.1f} s")
    rng = random.Random(args.seed + 1)
    try:
        with Operations(args.store) as ops:
            deep = ops.sagas(limit=1, offset=args.n // 2).items[0]
            from sagas.operations import encode_cursor

            deep_cursor = encode_cursor(deep.created_at, deep.id)
            runs = args.runs
            measure("sagas() first page, oldest first", runs, lambda i: ops.sagas(limit=50))
            measure("sagas() first page, newest first", runs, lambda i: ops.sagas(limit=50, newest_first=True))
            measure("sagas(cursor=) page in the middle", runs, lambda i: ops.sagas(limit=50, cursor=deep_cursor))
            measure(
                "sagas(type=, state=) newest",
                runs,
                lambda i: ops.sagas(type="share", state="waiting", newest_first=True),
            )
            measure("sagas(key=) exact", runs, lambda i: ops.sagas(key=keys[i % len(keys)]))
            measure(
                "sagas(key_prefix=) ~100 matches",
                runs,
                lambda i: ops.sagas(key_prefix=keys[i % len(keys)][:-2], limit=50),
            )
            measure("sagas(failed=True) newest", runs, lambda i: ops.sagas(failed=True, newest_first=True))
            measure("saga(id) with history", runs, lambda i: ops.saga(ids[rng.randrange(len(ids))]))
            measure("overview()", max(1, runs // 10), lambda i: ops.overview())
    finally:
        if args.drop:
            conn, schema = _connect(args.store)
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            conn.close()
            print(f"dropped schema {schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
