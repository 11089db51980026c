"""The late-success bookkeeping in a saga's metadata (sagas/_late.py), on its own: what the saga stopped
waiting for, which steps are undone, and the deadlines of a late success's compensation."""

from __future__ import annotations

import random

from sagas._late import (
    AWAITED_META,
    awaited,
    awaited_but,
    late_but,
    late_compensation,
    mark_not_undone,
    mark_undone,
    sent_again,
    spent,
)
from sagas._saga import COMPENSATION_META, LateUndo, Request

UNDO = LateUndo(Request("t.hotel.cancel"), timeout=2.0, retries=2, backoff=3.0, step="hotel")


def test_a_compensation_is_sent_again_with_the_wait_its_undo_gives_the_next_attempt() -> None:
    entry = late_compensation("r1", "t.hotel.cancel", "{}", "booking", "t.hotel.book", UNDO, 100.0, random.Random(7))
    assert entry["due"] == 100.0 + UNDO.deadline_after(1, random.Random(7))
    again = sent_again(entry, 150.0, random.Random(8))
    assert again["attempts"] == 2
    assert again["due"] == 150.0 + UNDO.deadline_after(2, random.Random(8))
    assert entry["attempts"] == 1  # (a new entry: the one in the metadata is left as it was)
    assert not spent(again)
    assert spent(sent_again(again, 160.0, random.Random(9)))  # 1 + retries sends


def test_a_step_not_undone_goes_last_and_an_undone_one_keeps_its_place() -> None:
    meta = {COMPENSATION_META: {"undone": ["car", "hotel"], "not_undone": ["flight"]}}
    assert mark_not_undone(meta, "car") == {"undone": ["hotel"], "not_undone": ["flight", "car"]}
    assert mark_undone(meta, "car") == {"undone": ["car", "hotel"], "not_undone": ["flight"]}
    assert mark_undone(meta, "flight") == {"undone": ["car", "hotel", "flight"], "not_undone": []}
    assert mark_not_undone({}, "hotel") == {"undone": [], "not_undone": ["hotel"]}


def test_what_the_saga_stopped_waiting_for_is_found_and_dropped_by_the_same_match() -> None:
    entries = [
        {"id": "r1", "what": "t.hotel.book"},
        {"id": None, "what": "t.paid"},
        {"id": "r2", "what": "t.hotel.book"},
        {"id": None, "what": "t.paid", "n": 2},
    ]
    meta = {AWAITED_META: entries}
    assert awaited(meta, request_id="r2") is entries[2]
    assert awaited(meta, what="t.paid") is entries[3]  # the latest
    assert awaited(meta, what="t.hotel.book") is None  # (a request's type is no event)
    assert awaited_but(meta, request_id="r1") == [entries[1], entries[2], entries[3]]
    assert awaited_but(meta, what="t.paid") == [entries[0], entries[2]]
    assert late_but({"late": [{"id": "a"}, {"id": "b"}]}, "a") == [{"id": "b"}]
