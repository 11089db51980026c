"""SagasClient: a saga's status and waiting for its outcome from asyncio, on every store backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import structlog.testing

from sagas import (
    ConfigurationError,
    MemoryStore,
    PostgresStore,
    SagaRecord,
    SagasError,
    SQLiteStore,
    Store,
    StoreError,
)
from sagas._store import HistoryEntry
from sagas.aio import SagasClient, SagaStatus, WaitTimeout


def _target(store: Store) -> str | Store:
    """What a client opens: the test's memory store itself, or its own connection to the same database."""
    if isinstance(store, SQLiteStore):
        return f"sqlite:///{store.path}"
    if isinstance(store, PostgresStore):
        return store.url
    return store


def _create(store: Store, key: str, state: str = "scanning") -> SagaRecord:
    record = SagaRecord(f"id-{key}", "upload", key, state, {"n": 1}, updated_at=time.time())
    store.save_saga(
        record, expected_version=None, history=HistoryEntry(1.0, "m", "", state, "start"), inbox=None, outbox=()
    )
    return record


def _move(store: Store, record: SagaRecord, state: str, *, final: bool = False, reason: str = "") -> None:
    record.version += 1
    record.state, record.final = state, final
    if reason:
        record.meta = {"reason": reason, "failed_from": "scanning"}
    store.save_saga(
        record,
        expected_version=record.version - 1,
        history=HistoryEntry(2.0, f"m{record.version}", "", state, "moved"),
        inbox=None,
        outbox=(),
    )


def _run(client: SagasClient, body: Callable[[SagasClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with client:
            await body(client)

    asyncio.run(main())


def test_get_reads_a_saga_status(any_store: Store) -> None:
    """get returns None for a saga that does not exist and the status (state, data, final) of one that does."""
    record = _create(any_store, "u1")
    _move(any_store, record, "failed", final=True, reason="scan failed")

    async def body(client: SagasClient) -> None:
        assert await client.get("upload", "nope") is None
        status = await client.get("upload", "u1")
        assert status is not None
        assert (status.id, status.state, status.final, status.failed, status.reason) == (
            "id-u1",
            "failed",
            True,
            True,
            "scan failed",
        )
        assert status.data == {"n": 1}
        assert status.version == 1
        assert status.to_dict()["state"] == "failed"

    _run(SagasClient(_target(any_store)), body)


def test_wait_returns_once_the_saga_is_final(any_store: Store) -> None:
    """Waits return the final status: of a saga that moves through states, and of one created after the wait began."""
    moving = _create(any_store, "moving")

    async def body(client: SagasClient) -> None:
        waits = [asyncio.create_task(client.wait("upload", k, timeout=10)) for k in ("moving", "later", "later")]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(_move, any_store, moving, "checking")
        later = await asyncio.to_thread(_create, any_store, "later")
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(_move, any_store, moving, "done", final=True)
        await asyncio.to_thread(_move, any_store, later, "done", final=True)
        results = await asyncio.gather(*waits)
        assert [(s.key, s.state, s.final, s.failed) for s in results] == [
            ("moving", "done", True, False),
            ("later", "done", True, False),
            ("later", "done", True, False),
        ]

    _run(SagasClient(_target(any_store)), body)


def test_wait_times_out_with_the_last_status() -> None:
    """A saga that does not end in time raises WaitTimeout, a TimeoutError carrying its last status."""
    store = MemoryStore()
    _create(store, "stuck")

    async def body(client: SagasClient) -> None:
        with pytest.raises(WaitTimeout) as stuck:
            await client.wait("upload", "stuck", timeout=0.2)
        assert isinstance(stuck.value, TimeoutError)
        assert isinstance(stuck.value.last, SagaStatus)
        assert stuck.value.last.state == "scanning"
        assert "in 'scanning'" in str(stuck.value)
        with pytest.raises(asyncio.TimeoutError) as missing:
            await client.wait("upload", "never", timeout=0.1)
        assert isinstance(missing.value, WaitTimeout)
        assert missing.value.last is None

    _run(SagasClient(store), body)


def test_concurrent_waits_share_one_read_per_tick(tmp_path: Path) -> None:
    """1,000 concurrent waits on an SQLite store cost a few batched reads per second, not one read per wait,
    and all of them return once their sagas end."""
    store = SQLiteStore(f"{tmp_path}/s.db")
    records = [_create(store, f"k{i}") for i in range(1000)]
    client = SagasClient(f"sqlite:///{tmp_path}/s.db", min_tick=0.02, max_tick=1.0)

    async def body(client: SagasClient) -> None:
        waits = [asyncio.create_task(client.wait("upload", r.key, timeout=20)) for r in records]
        await asyncio.sleep(0.6)  # nothing moves: the tick backs off 20, 40, 80, 160, 320 ms
        idle_reads = client.reads
        assert 1 <= idle_reads <= 8

        def end_all() -> None:
            with store.group():  # (one commit: the next read sees all of them final)
                for r in records:
                    _move(store, r, "done", final=True)

        await asyncio.to_thread(end_all)
        results = await asyncio.gather(*waits)
        assert {s.key for s in results if s.final} == {r.key for r in records}
        assert client.reads - idle_reads <= 5  # the next tick (at most 1 s away) saw them all final

    _run(client, body)
    store.close()


def test_a_new_wait_resets_the_backed_off_tick() -> None:
    """After the tick has backed off to its cap, a new wait for a saga that ended is answered at once."""
    store = MemoryStore()
    done = _create(store, "done")
    _move(store, done, "done", final=True)
    _create(store, "pending")

    async def body(client: SagasClient) -> None:
        pending = asyncio.create_task(client.wait("upload", "pending", timeout=10))
        await asyncio.sleep(1.0)  # 20, 40, ... 640 ms: the next read is up to 2 s away
        started = time.monotonic()
        status = await client.wait("upload", "done", timeout=5)
        assert status.state == "done"
        assert time.monotonic() - started < 0.5
        pending.cancel()

    _run(SagasClient(store, min_tick=0.02, max_tick=2.0), body)


def test_close_ends_pending_waits() -> None:
    """Closing the client ends the waits in progress with a SagasError instead of leaving them hanging."""

    async def main() -> None:
        client = SagasClient(MemoryStore())
        await client.start()
        wait = asyncio.create_task(client.wait("upload", "x", timeout=10))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(SagasError, match="closed while waiting"):
            await wait
        await client.close()  # (twice: nothing)

    asyncio.run(main())


def test_bad_input_is_refused_with_what_to_do() -> None:
    """A bad timeout, an unknown saga type, an empty key, a client not started: typed errors that say what to do."""
    from examples.postprocessing import Postprocessing

    with pytest.raises(ConfigurationError, match=r"store URL or a sagas\.Store"):
        SagasClient(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="min_tick <= max_tick"):
        SagasClient("memory://", min_tick=2, max_tick=1)

    async def main() -> None:
        client = SagasClient("memory://", sagas=[Postprocessing])
        with pytest.raises(SagasError, match="not started"):
            await client.get(Postprocessing, "u1")
        async with client:
            assert await client.get(Postprocessing, "u1") is None
            with pytest.raises(ConfigurationError, match="unknown saga type 'share'"):
                await client.get("share", "u1")
            with pytest.raises(ConfigurationError, match="timeout is a number of seconds above 0"):
                await client.wait(Postprocessing, "u1", timeout=0)
            with pytest.raises(ConfigurationError, match="timeout is a number"):
                await client.wait(Postprocessing, "u1", timeout=float("nan"))
            with pytest.raises(ConfigurationError, match="non-empty string"):
                await client.wait(Postprocessing, "", timeout=1)

    asyncio.run(main())


class _FailsTwice(MemoryStore):
    """A memory store whose first two batched reads fail, as a database that is restarting."""

    failures = 2

    def find_sagas(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SagaRecord]:
        if self.failures:
            self.failures -= 1
            raise StoreError("the database is restarting")
        return super().find_sagas(keys)


def test_a_failed_read_is_logged_and_the_wait_goes_on() -> None:
    """A store read that fails is logged as client.read_failed, and the waits get their answer from a later read."""
    store = _FailsTwice()
    record = _create(store, "u1")
    _move(store, record, "done", final=True)

    async def body(client: SagasClient) -> None:
        with structlog.testing.capture_logs() as logs:
            status = await client.wait("upload", "u1", timeout=5)
        assert status.state == "done"
        failed = [e for e in logs if e["event"] == "client.read_failed"]
        assert len(failed) == 2
        assert failed[0]["error"] == "the database is restarting"
        assert failed[0]["log_level"] == "warning"

    _run(SagasClient(store), body)


def test_a_closed_client_starts_again_on_another_loop() -> None:
    """A client closed on one event loop starts again, and waits, on another."""
    store = MemoryStore()
    record = _create(store, "u1")
    _move(store, record, "done", final=True)
    client = SagasClient(store)

    async def once() -> str:
        async with client:
            return (await client.wait("upload", "u1", timeout=5)).state

    assert asyncio.run(once()) == "done"
    assert asyncio.run(once()) == "done"


@pytest.mark.postgres
def test_a_store_url_that_names_no_store_is_refused_at_start(tmp_path: Path, postgres_url: str, unique: str) -> None:
    """The client only reads: a URL that names no store (a typo, another folder, a schema the workers do
    not use) raises StoreError at start, saying to give the workers' URL, instead of creating an empty
    store whose sagas never come."""

    async def start(url: str) -> None:
        async with SagasClient(url, sagas=[]):
            pass

    for url in (f"sqlite:///{tmp_path}/typo.db", f"{postgres_url}?schema={unique}"):
        with pytest.raises(StoreError, match="give the store URL the workers use"):
            asyncio.run(start(url))
    assert not (tmp_path / "typo.db").exists()
