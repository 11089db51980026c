"""Store.find_sagas: many sagas by (type, key) in one call, on every backend."""

from __future__ import annotations

from sagas import SagaRecord, Store
from sagas._store import HistoryEntry


def _save(store: Store, saga_type: str, key: str, *, state: str = "running", final: bool = False) -> SagaRecord:
    record = SagaRecord(f"{saga_type}-{key}", saga_type, key, state, {"k": key}, final=final, updated_at=1.0)
    store.save_saga(
        record, expected_version=None, history=HistoryEntry(1.0, "m", "", state, "start"), inbox=None, outbox=()
    )
    return record


def test_find_sagas_returns_the_existing_ones_by_type_and_key(any_store: Store) -> None:
    """Existing sagas come back whole under their (type, key); missing ones and other types are absent."""
    _save(any_store, "upload", "a")
    _save(any_store, "upload", "b", state="done", final=True)
    _save(any_store, "share", "a")
    found = any_store.find_sagas([("upload", "a"), ("upload", "b"), ("upload", "nope"), ("share", "a"), ("x", "a")])
    assert sorted(found) == [("share", "a"), ("upload", "a"), ("upload", "b")]
    assert found[("upload", "b")].state == "done"
    assert found[("upload", "b")].final is True
    assert found[("upload", "a")].data == {"k": "a"}
    assert found[("share", "a")].id == "share-a"
    assert any_store.find_sagas([]) == {}


def test_find_sagas_reads_more_keys_than_one_statement_holds(any_store: Store) -> None:
    """1,200 keys (three statements' worth), repeated keys among them, all come back."""
    for i in range(0, 1200, 2):
        _save(any_store, "upload", f"k{i}")
    keys = [("upload", f"k{i}") for i in range(1200)]
    found = any_store.find_sagas(keys + keys[:10])
    assert sorted(found) == sorted(("upload", f"k{i}") for i in range(0, 1200, 2))
