"""The operator API's listing and overview data (``Operations.sagas`` with a cursor, ``Operations.overview``),
identical on memory, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sagas import ConfigurationError, SagaRecord, Store
from sagas._store import HistoryEntry
from sagas.operations import InvalidCursor, Operations, decode_cursor, encode_cursor
from tests.sagas.test_saga_store import BACKENDS, _opener

T0 = 1_700_000_000.0


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with _opener(request.param, request, tmp_path) as open_again:
        yield open_again()


def _add(
    store: Store,
    key: str,
    *,
    saga_id: str | None = None,
    type: str = "upload",
    state: str = "scanning",
    created_at: float = T0,
    deadline: float | None = None,
    final: bool = False,
    meta: dict[str, Any] | None = None,
) -> SagaRecord:
    record = SagaRecord(
        id=saga_id or f"{type}-{key}",
        type=type,
        key=key,
        state=state,
        data={"key": key},
        version=1,
        deadline=deadline,
        attempts=1,
        meta=meta or {},
        final=final,
        created_at=created_at,
        updated_at=created_at,
    )
    store.save_saga(
        record,
        expected_version=None,
        history=HistoryEntry(created_at, f"m-{record.id}", "-", state, "test"),
        inbox=None,
        outbox=[],
    )
    return record


def test_cursor_pages_cover_every_saga_once_in_both_orders_with_ties(store: Store) -> None:
    """Following next_cursor lists every saga exactly once, oldest or newest first, with many sagas created
    at the same moment; the last page has no cursor."""
    for i in range(17):
        _add(store, f"u{i:02d}", saga_id=f"id{(i * 5) % 17:02d}", created_at=T0 + i // 4)
    ops = Operations(store)
    everything = [r.id for r in ops.sagas(limit=100).items]
    assert len(everything) == 17
    for newest_first in (False, True):
        for limit in (1, 3, 4, 16, 17):
            seen: list[str] = []
            cursor = None
            while True:
                page = ops.sagas(limit=limit, cursor=cursor, newest_first=newest_first)
                seen += [r.id for r in page.items]
                if page.next_cursor is None:
                    assert not page.has_more
                    break
                assert page.has_more
                cursor = page.next_cursor
            assert seen == (everything[::-1] if newest_first else everything), (newest_first, limit)


def test_sagas_filters_by_key_prefix_failed_and_time_with_a_cursor(store: Store) -> None:
    """key_prefix, failed and the creation time range filter the listing, and the cursor keeps them."""
    for i in range(6):
        _add(store, f"up-{i}", state="failed" if i % 2 else "scanning", created_at=T0 + i)
    _add(store, "other", state="failed", created_at=T0 + 10)
    ops = Operations(store)
    first = ops.sagas(key_prefix="up-", failed=True, limit=2)
    assert [r.key for r in first.items] == ["up-1", "up-3"]
    rest = ops.sagas(key_prefix="up-", failed=True, limit=2, cursor=first.next_cursor)
    assert [r.key for r in rest.items] == ["up-5"]
    assert rest.next_cursor is None
    window = ops.sagas(created_after=T0 + 2, created_before=T0 + 4)
    assert [r.key for r in window.items] == ["up-2", "up-3"]
    assert [r.key for r in ops.sagas(failed=True, newest_first=True, limit=1).items] == ["other"]


def test_a_bad_cursor_is_a_clear_typed_error(store: Store) -> None:
    """A cursor this API did not make raises InvalidCursor (a ConfigurationError) that says what to pass."""
    ops = Operations(store)
    for bad in ["nope!", "", "bm90IGpzb24", encode_cursor(T0, "x")[:-3], "WyJ4IiwieSJd", "WyIxIl0"]:
        with pytest.raises(InvalidCursor, match=r"invalid cursor .*next_cursor of a previous page"):
            ops.sagas(cursor=bad)
    with pytest.raises(ConfigurationError, match="cursor or an offset, not both"):
        ops.sagas(cursor=encode_cursor(T0, "x"), offset=3)
    assert issubclass(InvalidCursor, ConfigurationError)


def test_a_cursor_round_trips_the_exact_creation_time_and_id() -> None:
    """A cursor keeps the creation time to the last bit, and any id."""
    for created_at, saga_id in [(T0 + 0.1, "a"), (1e-9, "ü/\"'"), (1234567890.123456789, "x" * 40)]:
        assert decode_cursor(encode_cursor(created_at, saga_id)) == (created_at, saga_id)
