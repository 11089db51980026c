"""What waiting for sagas from asyncio costs the store: ``SagasClient.wait`` measured (docs/asyncio.md).

For a store URL, it creates N sagas that never end, starts N concurrent waits on one client and lets them
time out; it prints how many store reads the client made (one batched read per tick, the tick backing
off while nothing moves) and how long one batched read of the N sagas takes on that store::

    python scripts/wait_cost.py sqlite:////tmp/wait-cost.db --waits 1000 --seconds 10
    python scripts/wait_cost.py 'postgresql://postgres@127.0.0.1/test?schema=wait_cost' --waits 1000

The sagas it creates stay in the store: give it a store of its own (a file, a schema) and drop it after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from sagas import HistoryEntry, SagaRecord, open_store
from sagas.aio import SagasClient, WaitTimeout

TYPE = "wait_cost"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a store URL of the measurement's own")
    parser.add_argument("--waits", type=int, default=1000, help="concurrent waits (and sagas)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the waits last")
    parser.add_argument("--reads", type=int, default=50, help="batched reads to time")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    keys = [f"{run}-{i}" for i in range(args.waits)]
    store = open_store(args.store)
    now = time.time()
    with store.group():
        for key in keys:
            record = SagaRecord(f"{TYPE}-{key}", TYPE, key, "waiting", {}, created_at=now, updated_at=now)
            store.save_saga(
                record,
                expected_version=None,
                history=HistoryEntry(now, key, "", "waiting", "start"),
                inbox=None,
                outbox=(),
            )
    durations = []
    for _ in range(args.reads):
        started = time.perf_counter()
        found = store.find_sagas([(TYPE, k) for k in keys])
        durations.append(time.perf_counter() - started)
        assert len(found) == len(keys)
    store.close()

    async def waits() -> int:
        async with SagasClient(args.store) as client:
            results = await asyncio.gather(
                *(client.wait(TYPE, k, timeout=args.seconds) for k in keys), return_exceptions=True
            )
            assert all(isinstance(r, WaitTimeout) for r in results)
            return client.reads

    reads = asyncio.run(waits())
    print(
        f"{args.waits} waits for {args.seconds:g} s: {reads} store reads ({reads / args.seconds:.1f}/s);"
        f" one batched read of {args.waits} sagas: median {statistics.median(durations) * 1000:.2f} ms,"
        f" max {max(durations) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
