"""Sagas on RabbitMQ with a PostgreSQL store, shared by two workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from examples import postprocessing
from sagas import App, Event, EventBus, Worker, open_store
from tests.helpers import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def pg_store_url(postgres_url: str, unique: str) -> Iterator[str]:
    yield f"{postgres_url}?schema={unique}"
    import psycopg
    from psycopg import sql

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


def test_two_workers_share_sagas_through_postgresql(
    amqp_url: str, unique: str, pg_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one PostgreSQL schema, with participants failing transiently, take 40 uploads to
    the right outcome; each saga is moved by whichever worker gets its message."""
    monkeypatch.setenv("FAIL_RATE", "0.2")
    app = postprocessing.app
    workers = [
        Worker(
            App(*app.services, sagas=app.sagas, exchange=unique),
            broker=amqp_url,
            store=pg_store_url,
            timer_interval=0.05,
        )
        for _ in range(2)
    ]
    bus = EventBus(amqp_url, exchange=unique)
    store = open_store(pg_store_url)
    uploads = {
        f"u{i}": ("eicar.com" if i % 5 == 0 else f"f{i}.txt", 20 * 1024 * 1024 if i % 7 == 0 else 10) for i in range(40)
    }
    expected = {
        k: "delete" if "eicar" in name else "abort" if size > 10 * 1024 * 1024 else "continue"
        for k, (name, size) in uploads.items()
    }
    try:
        with workers[0].running(), workers[1].running():
            bus.publish_many(
                [
                    Event("ocis.storage.bytes_received", {"upload_id": k, "name": name, "size": size, "user": "marie"})
                    for k, (name, size) in uploads.items()
                ]
            )
            wait_for(
                lambda: len(store.list_sagas()) == 40 and all(s.final for s in store.list_sagas()),
                timeout=60,
                what="40 sagas final",
            )
        sagas = store.list_sagas()
        assert {s.key: s.data["outcome"] for s in sagas} == expected
        assert all(s.state == "done" for s in sagas)
        assert workers[0].handled > 0
        assert workers[1].handled > 0
    finally:
        store.close()
        queues = set().union(*(w.bus.declared_queues for w in workers))
        bus.declared_queues |= queues
        bus.delete_topology()
        bus.close()


def test_processes_creating_one_schema_at_once_take_turns(postgres_url: str, unique: str, pg_store_url: str) -> None:
    """Several stores opening a fresh schema at the same moment all succeed (they used to collide on
    CREATE ... IF NOT EXISTS with a duplicate-key error)."""
    import threading

    errors: list[BaseException] = []
    stores = []
    gate = threading.Barrier(6)

    def open_one() -> None:
        gate.wait()
        try:
            stores.append(open_store(pg_store_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for store in stores:
        store.close()
    assert errors == []
    assert len(stores) == 6
