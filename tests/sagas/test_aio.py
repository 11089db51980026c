"""`sagas.aio`: the AsyncPublisher in a Starlette application through `lifespan`, driven in memory through
httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sagas.aio import AsyncPublisher, PublisherClosed, lifespan
from tests.helpers import wait_for
from transport import EventBus, Inbound, Subscription


def test_a_starlette_route_publishes_through_the_lifespan_publisher(
    broker_url: str, unique: str, buses: list[object]
) -> None:
    """lifespan(pub) starts the publisher with the app; a route awaits publish and answers 202 with the
    event id; the event reaches a consumer; the publisher is closed when the app stops."""
    consumer = EventBus(broker_url, exchange=unique)
    buses.append(consumer)
    consumer.declare(Subscription(f"{unique}.uploads", ("ocis.storage.#",)))
    pub = AsyncPublisher(broker_url, exchange=unique, source="uploads")
    buses.append(pub)

    async def upload(request: Request) -> JSONResponse:
        body = await request.json()
        event = await pub.publish("ocis.storage.bytes_received", {"upload_id": body["id"]}, mandatory=True)
        return JSONResponse({"event": event.id}, status_code=202)

    app = Starlette(routes=[Route("/uploads", upload, methods=["POST"])], lifespan=lifespan(pub))

    async def main() -> list[str]:
        async with app.router.lifespan_context(app):
            assert pub.started
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                answers = await asyncio.gather(*(client.post("/uploads", json={"id": f"u{i}"}) for i in range(20)))
        assert not pub.started
        assert all(a.status_code == 202 for a in answers)
        return [a.json()["event"] for a in answers]

    ids = asyncio.run(main())
    got: list[Inbound] = []
    consumer.consume([Subscription(f"{unique}.uploads", ("ocis.storage.#",))], got.append)

    def step() -> bool:
        while len(got) < 20 and consumer.drain(0.05):
            pass
        return len(got) >= 20

    wait_for(step, what="the 20 uploads' events")
    assert sorted(i.event.id for i in got if i.event is not None) == sorted(ids)
    with pytest.raises(PublisherClosed):
        asyncio.run(pub.publish("ocis.storage.bytes_received", {}))


class _Resource:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def start(self) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")


def test_lifespan_closes_what_it_started_in_reverse_order_also_when_a_start_fails() -> None:
    """Resources start in order and close in reverse; when one fails to start, those before it are closed."""
    log: list[str] = []

    async def main() -> None:
        async with lifespan(_Resource("a", log), _Resource("b", log))(None):
            log.append("serving")
        with pytest.raises(RuntimeError, match="c cannot start"):
            async with lifespan(_Resource("a", log), _Resource("c", log, fail=True))(None):
                log.append("never")

    asyncio.run(main())
    assert log == ["start a", "start b", "serving", "close b", "close a", "start a", "close a"]
