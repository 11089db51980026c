"""The upload API example (examples/upload_api.py) over httpx's ASGI transport, with a worker running the
post-processing saga in this process, in memory and on RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2 as httpx
import pytest

from examples import postprocessing
from examples.upload_api import MAX_WAIT, create_app
from sagas import App, Worker, open_store


@asynccontextmanager
async def _api(broker_url: str, store_url: str, exchange: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run (the ASGI transport does not run it), and an HTTP client on it."""
    app = create_app(broker_url, store_url, exchange=exchange)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http


def _serve(
    broker_url: str,
    tmp_path: Path,
    unique: str,
    buses: list[object],
    body: Callable[[httpx.AsyncClient], Awaitable[None]],
) -> None:
    """Run ``body`` against the API while a worker runs the post-processing app on the same broker and store."""
    store_url = f"sqlite:///{tmp_path}/sagas.db"
    app = postprocessing.app
    worker = Worker(
        App(*app.services, sagas=app.sagas, exchange=unique), broker=broker_url, store=store_url, timer_interval=0.05
    )
    buses.append(worker)

    async def main() -> None:
        async with _api(broker_url, store_url, unique) as http:
            await body(http)

    with worker.running():
        asyncio.run(main())


def _created_store(tmp_path: Path) -> str:
    """The URL of an SQLite store a worker has created (the API only reads it)."""
    url = f"sqlite:///{tmp_path}/sagas.db"
    open_store(url).close()
    return url


async def _post(http: httpx.AsyncClient, name: str, size: int) -> str:
    response = await http.post("/uploads", json={"name": name, "size": size, "user": "marie"})
    assert response.status_code == 202, response.text
    upload_id = response.json()["upload_id"]
    assert response.headers["location"] == f"/uploads/{upload_id}"
    return str(upload_id)


def test_an_upload_is_processed_and_the_api_reports_its_outcome(
    broker_url: str, tmp_path: Path, unique: str, buses: list[object]
) -> None:
    """POST then GET ?wait=5 sees the final state: a clean upload continues, an infected one is deleted
    (the saga reverted it), an oversized one is aborted."""

    async def body(http: httpx.AsyncClient) -> None:
        clean = await _post(http, "a.txt", 10)
        infected = await _post(http, "eicar.com", 10)
        big = await _post(http, "big.iso", 50 * 1024 * 1024)
        outcomes = {}
        for upload_id in (clean, infected, big):
            response = await http.get(f"/uploads/{upload_id}", params={"wait": "5"})
            assert response.status_code == 200, response.text
            got = response.json()
            assert (got["upload_id"], got["state"], got["final"], got["failed"]) == (upload_id, "done", True, False)
            outcomes[upload_id] = got["outcome"]
        assert outcomes == {clean: "continue", infected: "delete", big: "abort"}
        plain = await http.get(f"/uploads/{clean}")
        assert plain.status_code == 200
        assert plain.json()["outcome"] == "continue"

    _serve(broker_url, tmp_path, unique, buses, body)


def test_a_hundred_concurrent_uploads_each_wait_for_their_outcome(
    broker_url: str, tmp_path: Path, unique: str, buses: list[object]
) -> None:
    """100 concurrent POST + GET ?wait=10 all answer 200 with their own upload's final state."""

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, str]:
        upload_id = await _post(http, f"eicar-{i}.bin" if i % 10 == 0 else f"f{i}.txt", i)
        response = await http.get(f"/uploads/{upload_id}", params={"wait": "10"})
        assert response.status_code == 200, response.text
        assert response.json()["upload_id"] == upload_id
        return upload_id, response.json()["outcome"]

    async def body(http: httpx.AsyncClient) -> None:
        results = await asyncio.gather(*(one(http, i) for i in range(100)))
        assert len({upload_id for upload_id, _ in results}) == 100
        assert [outcome for _, outcome in results] == ["delete" if i % 10 == 0 else "continue" for i in range(100)]

    _serve(broker_url, tmp_path, unique, buses, body)


def test_a_wait_that_ends_before_the_saga_answers_202_with_the_current_state(tmp_path: Path, unique: str) -> None:
    """Without a worker the saga never starts: a plain GET is a 404 with a JSON error, and so is a wait
    that ends with no saga; a saga that exists but has not ended answers 202 with its state."""
    from sagas import SagaRecord, SQLiteStore
    from sagas._store import HistoryEntry

    store_url = f"sqlite:///{tmp_path}/sagas.db"
    store = SQLiteStore(f"{tmp_path}/sagas.db")
    record = SagaRecord("s1", "postprocessing", "pending-upload", "scanning", {"upload_id": "pending-upload"})
    store.save_saga(
        record, expected_version=None, history=HistoryEntry(1.0, "m", "", "scanning", "start"), inbox=None, outbox=()
    )
    store.close()

    async def main() -> None:
        async with _api("memory://", store_url, unique) as http:
            unknown = await http.get("/uploads/nope")
            assert unknown.status_code == 404
            assert "no upload 'nope'" in unknown.json()["error"]
            waited = await http.get("/uploads/nope", params={"wait": "0.2"})
            assert waited.status_code == 404
            pending = await http.get("/uploads/pending-upload", params={"wait": "0.2"})
            assert pending.status_code == 202
            assert (pending.json()["state"], pending.json()["final"], pending.json()["outcome"]) == (
                "scanning",
                False,
                None,
            )

    asyncio.run(main())


@pytest.mark.parametrize("wait", ["soon", "-1", "nan", "inf", str(MAX_WAIT + 1)])
def test_a_bad_wait_is_a_400_that_says_what_to_send(wait: str, tmp_path: Path, unique: str) -> None:
    """?wait= that is not a number of seconds from 0 to the cap answers 400 with what it accepts."""

    async def main() -> None:
        async with _api("memory://", _created_store(tmp_path), unique) as http:
            response = await http.get("/uploads/u1", params={"wait": wait})
            assert response.status_code == 400
            assert response.json()["error"] == f"wait is a number of seconds from 0 to {MAX_WAIT:g}, not {wait!r}"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json", "send a JSON object"),
        ([1, 2], "send a JSON object"),
        ({"size": 3}, "name is"),
        ({"name": "a", "size": -1}, "size is"),
        ({"name": "a", "size": True}, "size is"),
        ({"name": "a", "size": 1, "user": ""}, "user is"),
    ],
)
def test_a_bad_upload_is_a_400_that_says_what_to_send(
    payload: object, message: str, tmp_path: Path, unique: str
) -> None:
    """A body that is not an upload (not JSON, no name, a bad size or user) answers 400 with what to send."""

    async def main() -> None:
        async with _api("memory://", _created_store(tmp_path), unique) as http:
            if isinstance(payload, str):
                response = await http.post("/uploads", content=payload)
            else:
                response = await http.post("/uploads", json=payload)
            assert response.status_code == 400
            assert response.json()["error"].startswith(message)

    asyncio.run(main())
