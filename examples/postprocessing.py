"""oCIS upload post-processing as a saga (state-machine style).

``ocis.storage.bytes_received`` ``{upload_id, name, size, user}`` starts one saga per upload:

1. ``ocis.antivirus.scan``: a name containing ``eicar`` is infected, and the outcome is ``delete``;
2. ``ocis.policies.check``: a size over ``POLICY_MAX_SIZE`` (default 10 MiB) gives ``abort``;
3. the saga publishes ``ocis.postprocessing.finished`` ``{upload_id, outcome}`` and waits for storage's
   ``ocis.storage.upload_ready``; for ``abort`` and ``delete`` it first asks storage to revert the upload
   (the compensation).

The participants (antivirus, policies, storage) are simulated here. ``FAIL_RATE`` (0 to 1) makes them
fail transiently; ``DROP_RATE`` (0 to 1) makes them drop replies, as an at-most-once bus would, so
retries and deadlines have work to do. Every saga ends final with ``data.outcome`` one of ``continue``,
``abort`` or ``delete``.

    export SAGAS_BROKER_URL=amqp://guest:guest@localhost//   # sagas publish refuses memory://
    sagas run examples.postprocessing:app
    sagas publish ocis.storage.bytes_received '{"upload_id": "u1", "name": "a.txt", "size": 10, "user": "marie"}'
"""

from __future__ import annotations

import os
import random
from typing import Any

from sagas import (
    App,
    Context,
    Event,
    Failure,
    Final,
    Go,
    NoReply,
    Request,
    Saga,
    SagaContext,
    Service,
    Start,
    State,
    set_data,
)

FINISHED, READY = "ocis.postprocessing.finished", "ocis.storage.upload_ready"


def _rate(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _flaky() -> None:
    if random.random() < _rate("FAIL_RATE"):
        raise ConnectionError("simulated transient failure")


# -- the saga ----------------------------------------------------------------------------------------


def _infected(ctx: SagaContext) -> bool:
    return bool(ctx.result.get("infected"))


def _too_big(ctx: SagaContext) -> bool:
    return not ctx.result.get("allowed", False)


def _finish(ctx: SagaContext) -> None:
    ctx.data.setdefault("outcome", "continue")
    ctx.publish(FINISHED, {"upload_id": ctx.data["upload_id"], "outcome": ctx.data["outcome"]})


UPLOAD = ("upload_id", "name", "size")
ABORT = Go("reverting", do=set_data(outcome="abort"))


class Postprocessing(Saga):
    type = "postprocessing"
    start = Start("ocis.storage.bytes_received", key="upload_id", keep=(*UPLOAD, "user"), to="scanning")
    correlate = {READY: "upload_id"}
    # fmt: off
    states = [
        State("scanning", sends=Request("ocis.antivirus.scan", fields=UPLOAD), timeout=5.0, retries=4,
              on_reply=[Go("reverting", when=_infected, do=set_data(outcome="delete")), Go("checking")],
              on_failure=ABORT, on_timeout=ABORT, on_compensate=ABORT),
        State("checking", sends=Request("ocis.policies.check", fields=UPLOAD), timeout=5.0, retries=4,
              on_reply=[Go("reverting", when=_too_big, do=set_data(outcome="abort")), Go("finishing", do=_finish)],
              on_failure=ABORT, on_timeout=ABORT, on_compensate=ABORT),
        State("reverting", sends=Request("ocis.storage.revert", fields=UPLOAD), timeout=5.0, retries=6,
              on_reply=Go("finishing", do=_finish), on_failure="failed"),
        State("finishing", timeout=10.0, on={READY: "done"}, on_timeout="done"),
        Final("done"),
    ]
    # fmt: on


# -- the simulated participants ------------------------------------------------------------------------

antivirus = Service("antivirus")
policies = Service("policies")
storage = Service("storage")


def _maybe_drop() -> None:
    if random.random() < _rate("DROP_RATE"):
        raise NoReply("simulated lost reply")  # the saga's deadline re-sends the request


@antivirus.handles("ocis.antivirus.scan")
def scan(event: Event) -> dict[str, Any]:
    _flaky()
    _maybe_drop()
    return {"infected": "eicar" in str(event.payload.get("name", "")).lower()}


@policies.handles("ocis.policies.check")
def check(event: Event) -> dict[str, Any]:
    _flaky()
    _maybe_drop()
    limit = int(os.environ.get("POLICY_MAX_SIZE", str(10 * 1024 * 1024)))
    size = event.payload.get("size")
    if not isinstance(size, int):
        raise Failure("upload without a size")
    return {"allowed": size <= limit}


@storage.handles("ocis.storage.revert")
def revert(event: Event) -> dict[str, Any]:
    _flaky()
    return {"reverted": event.payload["upload_id"]}


@storage.on(FINISHED, name="finish_upload")
def finish_upload(event: Event, ctx: Context) -> None:
    """Storage makes the upload available (or not) and says so."""
    _flaky()
    ctx.publish(READY, {"upload_id": event.payload["upload_id"]})


app = App(antivirus, policies, storage, sagas=[Postprocessing])
