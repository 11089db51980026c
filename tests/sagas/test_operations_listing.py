"""The operator API's listing and overview data (``Operations.sagas`` with a cursor, ``Operations.overview``),
identical on memory, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sagas import ConfigurationError, SagaRecord, Store
from sagas._store import HistoryEntry, MemoryStore, Outgoing
from sagas.operations import InvalidCursor, Operations, decode_cursor, encode_cursor, first_line
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


# -- overview -------------------------------------------------------------------------------------------

NOW = T0 + 1000


def test_overview_counts_stuck_failures_outbox_and_deadlines(store: Store) -> None:
    """The overview gives counts by type and state, the oldest stuck sagas first, failures grouped by the
    first line of their reason, the outbox backlog with its age and the deadlines due in the next minute,
    as of the time given."""
    _add(store, "done", state="done", final=True, created_at=T0 - 5)
    _add(store, "a", created_at=T0)  # no deadline: stuck
    _add(store, "b", created_at=T0 + 1, deadline=NOW - 120)  # overdue by 120 s: stuck
    _add(store, "c", created_at=T0 + 2, deadline=NOW - 10)  # overdue by less than stuck_after
    _add(store, "d", state="waiting", created_at=T0 + 3, deadline=NOW + 30)  # due in the next minute
    _add(store, "e", state="waiting", created_at=T0 + 4, deadline=NOW + 90)
    boom = "ValueError: boom\nTraceback (most recent call last):\n  File 'x.py', line 1\nValueError: boom"
    tb = "Traceback (most recent call last):\n  File 'y.py', line 2, in f\nKeyError: 'size'"
    for i, reason in enumerate([boom, boom, tb]):
        meta = {"reason": reason, "failed_from": "scanning" if i < 2 else "finishing"}
        _add(store, f"f{i}", state="failed", final=True, created_at=T0 + 10 + i, meta=meta)
    _add(store, "g", type="share", state="failed", final=True, created_at=T0 + 20, meta={"reason": "gone"})
    record = _add(store, "o", state="done", final=True, created_at=T0 + 30)
    record.version += 1
    store.save_saga(
        record,
        expected_version=1,
        history=HistoryEntry(NOW - 30, "m-o-2", "done", "done", "test"),
        inbox=None,
        outbox=[Outgoing("out-1", "ocis.x", "{}", mandatory=True)],
    )

    ops = Operations(store, clock=lambda: NOW)
    view = ops.overview()
    assert view.as_of == NOW
    assert {(c.type, c.state): c.count for c in view.counts} == {
        ("upload", "done"): 2,
        ("upload", "scanning"): 3,
        ("upload", "waiting"): 2,
        ("upload", "failed"): 3,
        ("share", "failed"): 1,
    }
    assert [(s.key, s.overdue) for s in view.stuck] == [("a", None), ("b", 120.0)]
    assert not view.stuck_more
    assert [(g.type, g.reason, g.count, g.failed_from) for g in view.failures] == [
        ("upload", "ValueError: boom", 2, "scanning"),
        ("share", "gone", 1, ""),
        ("upload", "KeyError: 'size'", 1, "finishing"),
    ]
    assert view.failures[0].example_id in {"upload-f0", "upload-f1"}
    assert (view.failed_total, view.failed_read) == (4, 4)
    assert (view.outbox.unsent, view.outbox_oldest_age) == (1, 30.0)
    assert view.deadlines_next_minute == 1
    passed = [r.key for r in store.list_sagas(limit=100) if r.deadline is not None and r.deadline <= NOW]
    assert passed  # (the stuck ones at least)
    assert view.deadlines_passed == len(passed)
    assert view.dead_letters is None
    as_json = json.loads(json.dumps(view.to_dict()))
    assert as_json["outbox"] == {"unsent": 1, "oldest_created_at": NOW - 30, "oldest_age": 30.0}
    assert as_json["stuck"][1]["key"] == "b"
    assert as_json["failures"][0]["reason"] == "ValueError: boom"

    later = ops.overview(now=NOW + 100, stuck_after=5.0, stuck_limit=2)
    assert later.as_of == NOW + 100
    assert [s.key for s in later.stuck] == ["a", "b"]
    assert later.stuck_more  # c and d are overdue too by then
    assert later.deadlines_next_minute == 0
    assert ops.overview(failed_limit=2).failed_read == 2


def test_first_line_drops_a_traceback_tail_or_keeps_the_exception_line() -> None:
    """A reason's first line, or the exception line of a reason that starts with the traceback."""
    assert first_line("ValueError: x\nTraceback (most recent call last):\n  ...") == "ValueError: x"
    assert first_line("\n  timed out after 30 s  \n") == "timed out after 30 s"
    assert first_line("Traceback (most recent call last):\n  File 'a'\nKeyError: 'k'\n") == "KeyError: 'k'"
    assert first_line("") == ""


def test_memory_store_reads_never_see_half_a_save() -> None:
    """A reader on another thread (a test polling, the console) lists and reads sagas while a worker
    saves new ones: every saga it sees is whole (a save writes several maps; reads take the store's
    lock too, so none of them raises or shows a saga without its data)."""
    store = MemoryStore()
    done = threading.Event()
    problems: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            try:
                for r in store.list_sagas(limit=10_000):
                    assert r.data == {"key": r.key}
                store.count_by_state()
            except BaseException as exc:  # reported by the assertion below
                problems.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3000):
            _add(store, f"k{i}", created_at=float(i))
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert store.count_sagas() == 3000
