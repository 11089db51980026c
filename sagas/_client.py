"""Reading sagas from asyncio: :class:`SagasClient` gets a saga's state and waits for its outcome.

The store is the truth: a saga's state is what its store says, whichever worker moved it and whether
or not the saga publishes anything when it ends. So the client reads the store, never the bus. Every
read runs on the client's one thread (a store's connection is used from one thread at a time), off
the event loop. All the waits of one client share one poller: each tick it reads every waited saga in
one store call (:meth:`sagas.Store.find_sagas`), resolves the waits whose saga is final, and sleeps.
The tick starts at ``min_tick`` (20 ms), doubles while no waited saga changed, up to ``max_tick``
(1 s), and starts again at ``min_tick`` when a new wait arrives or a waited saga moved. The cost is
therefore at most ``1 / min_tick`` store calls a second per client, however many waits are pending,
and none when nothing is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, TypeVar

import structlog

from ._errors import ConfigurationError, SagasError
from ._saga import FAILED, Saga
from ._store import SagaRecord, Store, open_store

log = structlog.get_logger("sagas.client")

T = TypeVar("T")

#: the first (and shortest) pause between two reads of the waited sagas, in seconds
MIN_TICK = 0.02
#: the longest pause between two reads while no waited saga changes, in seconds
MAX_TICK = 1.0


@dataclass(frozen=True, slots=True)
class SagaStatus:
    """One saga as an application sees it: its state (``final`` once it ended; ``failed`` when it was
    parked in ``failed``, with the ``reason``), its data, and when it last moved (``updated_at``,
    seconds since the epoch). ``version`` counts its moves."""

    id: str
    type: str
    key: str
    state: str
    data: dict[str, Any]
    final: bool
    failed: bool
    reason: str | None
    version: int
    updated_at: float

    @classmethod
    def from_record(cls, record: SagaRecord) -> SagaStatus:
        """The status of a stored saga."""
        reason = record.meta.get("reason")
        return cls(
            id=record.id,
            type=record.type,
            key=record.key,
            state=record.state,
            data=record.data,
            final=record.final,
            failed=record.state == FAILED,
            reason=str(reason) if reason and record.state == FAILED else None,
            version=record.version,
            updated_at=record.updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data."""
        return asdict(self)


class WaitTimeout(TimeoutError, SagasError):
    """The saga did not reach a final state within the wait's timeout. ``last`` is its status at the
    last read (None: it did not exist yet, its start event may still be queued). A ``TimeoutError``
    (``asyncio.TimeoutError``), so code that handles timeouts handles this one."""

    def __init__(self, saga_type: str, key: str, timeout: float, last: SagaStatus | None) -> None:
        where = "it does not exist yet" if last is None else f"it is in {last.state!r}"
        super().__init__(f"the {saga_type} saga {key!r} did not end within {timeout:g}s: {where}")
        self.saga_type = saga_type
        self.key = key
        self.timeout = timeout
        self.last = last


class SagasClient:
    """Read sagas from asyncio code: :meth:`get` one saga's status, :meth:`wait` for its outcome.

    ``store`` is a store URL (opened by :meth:`start`, closed by :meth:`close`) or an open
    :class:`~sagas.Store` the caller owns; the client reads it from its own thread only, so pass one no
    other thread uses at the same time (a :class:`~sagas.MemoryStore` may be shared: it locks). ``sagas``
    are the saga types the client reads (then a type it does not know is an error); a saga type is named
    by its class or its ``type`` string. The client only reads: it never changes a saga.

    Use it on one event loop, as ``async with SagasClient(url) as client:`` or between :meth:`start`
    and :meth:`close` (e.g. in a Starlette lifespan)."""

    def __init__(
        self,
        store: str | Store,
        *,
        sagas: Sequence[type[Saga]] = (),
        min_tick: float = MIN_TICK,
        max_tick: float = MAX_TICK,
    ) -> None:
        if not (isinstance(store, str | Store)):
            raise ConfigurationError(f"store must be a store URL or a sagas.Store, not {type(store).__name__}")
        if not (_positive(min_tick) and _positive(max_tick) and min_tick <= max_tick):
            raise ConfigurationError(
                "min_tick and max_tick are seconds above 0, with min_tick <= max_tick,"
                f" not {min_tick!r} and {max_tick!r}"
            )
        self._store_arg = store
        self._types = {s.type for s in sagas}
        self.min_tick = min_tick
        self.max_tick = max_tick
        self._store: Store | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        #: (type, key) -> the futures of the waits for that saga
        self._waits: dict[tuple[str, str], set[asyncio.Future[SagaStatus]]] = {}
        #: (type, key) -> the saga's status at the last read (only for sagas waited for)
        self._last: dict[tuple[str, str], SagaStatus] = {}
        self._reads = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (on the client's thread) and start the poller on the running loop."""
        if self._executor is not None:
            raise SagasError("the saga client is started already")
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()  # (of this loop: a client started again may run on another)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagas-client")
        try:
            # Read-only: a URL that names no store is a mistake (a typo, another folder), not a new store:
            # StoreError says to give the workers' URL (a worker creates the store when it first starts).
            self._store = await self._run(functools.partial(open_store, self._store_arg, create=False))
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._poller = asyncio.create_task(self._poll(), name="sagas-client-poller")

    async def close(self) -> None:
        """Stop the poller, end the pending waits with :class:`~sagas.SagasError`, and close the store if
        the client opened it. Closing twice does nothing."""
        if self._executor is None:
            return
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for futures in self._waits.values():
            for future in futures:
                if not future.done():
                    future.set_exception(SagasError("the saga client closed while waiting"))
        self._waits.clear()
        self._last.clear()
        store, self._store = self._store, None
        if store is not None and isinstance(self._store_arg, str):
            await self._run(store.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def __aenter__(self) -> SagasClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------------------------

    @property
    def reads(self) -> int:
        """How many store calls the client has made (each :meth:`get`, and each poller tick)."""
        return self._reads

    async def get(self, saga_type: str | type[Saga], key: str) -> SagaStatus | None:
        """The status of the saga of ``saga_type`` with business ``key``, or None if there is none (yet)."""
        name = self._type_name(saga_type)
        store = self._need_store()
        self._reads += 1
        record = await self._run(store.find_saga, name, _key(key))
        return None if record is None else SagaStatus.from_record(record)

    async def wait(self, saga_type: str | type[Saga], key: str, *, timeout: float) -> SagaStatus:
        """The status of the saga of ``saga_type`` with business ``key`` once it is final (completed,
        compensated or parked as failed), waiting up to ``timeout`` seconds. A saga that does not exist
        yet is waited for too. Raises :class:`WaitTimeout` (a ``TimeoutError``) with its last status."""
        name = self._type_name(saga_type)
        if not _positive(timeout):
            raise ConfigurationError(f"timeout is a number of seconds above 0, not {timeout!r}")
        self._need_store()
        if asyncio.get_running_loop() is not self._loop:
            raise SagasError("wait on the event loop the saga client was started on")
        ident = (name, _key(key))
        future: asyncio.Future[SagaStatus] = asyncio.get_running_loop().create_future()
        self._waits.setdefault(ident, set()).add(future)
        self._arrived.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise WaitTimeout(name, ident[1], timeout, self._last.get(ident)) from None
        finally:
            waiting = self._waits.get(ident)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waits[ident]
                    self._last.pop(ident, None)

    # -- the poller ----------------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Read every waited saga per tick; resolve the waits of final ones; back off while nothing moves."""
        tick = self.min_tick
        while True:
            if not self._waits:
                self._arrived.clear()
                await self._arrived.wait()
                tick = self.min_tick
            self._arrived.clear()
            wanted = list(self._waits)
            store = self._need_store()
            self._reads += 1
            try:
                found = await self._run(store.find_sagas, wanted)
            except Exception as exc:  # noqa: BLE001 - the store is down: the waits time out with their last status
                log.warning("client.read_failed", error=str(exc), waits=len(wanted), retry_in=tick)
                found = None
            moved = False
            for ident, record in (found or {}).items():
                status = SagaStatus.from_record(record)
                before = self._last.get(ident)
                if ident not in self._waits:
                    continue  # its waits ended while the read ran
                if before is None or before.version != status.version:
                    moved = True
                    self._last[ident] = status
                if status.final:
                    for future in self._waits.pop(ident):
                        if not future.done():
                            future.set_result(status)
                    self._last.pop(ident, None)
            tick = self.min_tick if moved else min(tick * 2, self.max_tick)
            if not self._waits:
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), tick)
                tick = self.min_tick  # a new wait: read now, and soon again
            except TimeoutError:
                pass

    # -- helpers -------------------------------------------------------------------------------------

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None or self._loop is None:
            raise SagasError("the saga client is not started: call await client.start() or use async with")
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def _need_store(self) -> Store:
        if self._store is None:
            raise SagasError("the saga client is not started: call await client.start() or use async with")
        return self._store

    def _type_name(self, saga_type: str | type[Saga]) -> str:
        if isinstance(saga_type, type) and issubclass(saga_type, Saga):
            name = saga_type.type
        elif isinstance(saga_type, str) and saga_type:
            name = saga_type
        else:
            raise ConfigurationError(f"name a saga type by its class or its type string, not {saga_type!r}")
        if self._types and name not in self._types:
            raise ConfigurationError(
                f"unknown saga type {name!r}: this client reads {', '.join(sorted(self._types))} (its sagas=)"
            )
        return name


def _key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"a saga's business key is a non-empty string, not {key!r}")
    return key


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
