"""An upload API for asyncio applications (Starlette): publish an upload, read and await its post-processing.

``POST /uploads`` with ``{"name": "a.txt", "size": 10, "user": "marie"}`` publishes
``ocis.storage.bytes_received`` (which starts the :mod:`examples.postprocessing` saga for the upload) and
answers 202 with ``{"upload_id": ...}`` and a ``Location`` header. ``GET /uploads/{id}`` answers the
saga's state (404 while no saga exists). ``GET /uploads/{id}?wait=5`` waits up to 5 seconds for the
outcome: 200 with the final state, or 202 with the current one when it is not done yet.

Publishing awaits the broker's confirm without blocking the loop (:class:`sagas.aio.AsyncPublisher`); the
state comes from the saga store (:class:`sagas.aio.SagasClient`), which the workers write. Run the API
and a worker that runs the saga and its participants::

    export SAGAS_BROKER_URL=amqp://guest:guest@localhost// SAGAS_STORE_URL=sqlite:///sagas.db
    sagas run sagas.examples.postprocessing:app &   # creates the store, then runs the saga
    uvicorn sagas.examples.upload_api:app    # or: python -m sagas.examples.upload_api (HOST, PORT)
    curl -si localhost:8000/uploads -d '{"name": "a.txt", "size": 10}'
    curl -s 'localhost:8000/uploads/<upload_id>?wait=5'
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sagas.aio import AsyncPublisher, SagasClient, SagaStatus, WaitTimeout, lifespan

from .postprocessing import Postprocessing

BYTES_RECEIVED = "ocis.storage.bytes_received"
#: the longest ``?wait=`` a request may ask for, in seconds
MAX_WAIT = 30.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _upload(status: SagaStatus) -> dict[str, Any]:
    """What the API says about an upload: its saga's state and, once it ended, the outcome."""
    return {
        "upload_id": status.key,
        "state": status.state,
        "final": status.final,
        "outcome": status.data.get("outcome") if status.final else None,
        "failed": status.failed,
        "reason": status.reason,
        "updated_at": status.updated_at,
    }


def _wait_seconds(raw: str | None, max_wait: float) -> float | str:
    """The seconds of ``?wait=`` (0 without one), or what is wrong with it."""
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 <= seconds <= max_wait):
        return f"wait is a number of seconds from 0 to {max_wait:g}, not {raw!r}"
    return seconds


def create_app(broker_url: str, store_url: str, *, exchange: str = "sagas", max_wait: float = MAX_WAIT) -> Starlette:
    """The API on ``broker_url`` (publishing on ``exchange``) and the saga store at ``store_url``. The
    lifespan starts the publisher and the client and closes them."""
    publisher = AsyncPublisher(broker_url, exchange=exchange)
    client = SagasClient(store_url, sagas=[Postprocessing])

    async def create_upload(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, 'send a JSON object: {"name": "a.txt", "size": 10, "user": "marie"}')
        name, size, user = body.get("name"), body.get("size"), body.get("user", "anonymous")
        if not (isinstance(name, str) and name):
            return _error(400, "name is the uploaded file's name, a non-empty string")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            return _error(400, "size is the upload's size in bytes, an integer of 0 or more")
        if not (isinstance(user, str) and user):
            return _error(400, "user is who uploaded, a non-empty string")
        upload_id = uuid.uuid4().hex
        await publisher.publish(BYTES_RECEIVED, {"upload_id": upload_id, "name": name, "size": size, "user": user})
        location = request.url_for("upload", upload_id=upload_id).path
        return JSONResponse({"upload_id": upload_id}, status_code=202, headers={"Location": location})

    async def show_upload(request: Request) -> JSONResponse:
        upload_id = request.path_params["upload_id"]
        wait = _wait_seconds(request.query_params.get("wait"), max_wait)
        if isinstance(wait, str):
            return _error(400, wait)
        if wait:
            try:
                status: SagaStatus | None = await client.wait(Postprocessing, upload_id, timeout=wait)
            except WaitTimeout as timeout:
                status = timeout.last
        else:
            status = await client.get(Postprocessing, upload_id)
        if status is None:
            return _error(404, f"no upload {upload_id!r}: it was never posted, or its processing has not started yet")
        return JSONResponse(_upload(status), status_code=200 if status.final or not wait else 202)

    routes = [
        Route("/uploads", create_upload, methods=["POST"]),
        Route("/uploads/{upload_id}", show_upload, methods=["GET"], name="upload"),
    ]
    return Starlette(routes=routes, lifespan=lifespan(publisher, client))


def app_from_environment() -> Starlette:
    """The API configured by ``SAGAS_BROKER_URL``, ``SAGAS_STORE_URL`` and ``SAGAS_EXCHANGE``."""
    return create_app(
        os.environ.get("SAGAS_BROKER_URL", "amqp://guest:guest@localhost//"),
        os.environ.get("SAGAS_STORE_URL", "sqlite:///sagas.db"),
        exchange=os.environ.get("SAGAS_EXCHANGE", "sagas"),
    )


_built: list[Starlette] = []


def __getattr__(name: str) -> Any:
    """``sagas.examples.upload_api:app`` (for uvicorn) is built on first use, from the environment: importing
    the module reads no environment and opens nothing."""
    if name == "app":
        if not _built:
            _built.append(app_from_environment())
        return _built[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        app_from_environment(), host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000"))
    )
