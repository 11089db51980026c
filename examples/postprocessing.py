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
    NoReply,
    Request,
    Saga,
    SagaContext,
    Service,
    Start,
    State,
    failure,
    reply,
    timeout,
)
from sagas import event as on_event

SCAN, CHECK, REVERT = "ocis.antivirus.scan", "ocis.policies.check", "ocis.storage.revert"
FINISHED, READY = "ocis.postprocessing.finished", "ocis.storage.upload_ready"


def _rate(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _flaky() -> None:
    if random.random() < _rate("FAIL_RATE"):
        raise ConnectionError("simulated transient failure")


# -- the saga ----------------------------------------------------------------------------------------


def _begin(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update({k: ctx.event.payload.get(k) for k in ("upload_id", "name", "size", "user")})


def _set(outcome: str) -> Any:
    def set_outcome(ctx: SagaContext) -> None:
        ctx.data["outcome"] = outcome

    return set_outcome


def _finish(ctx: SagaContext) -> None:
    ctx.data.setdefault("outcome", "continue")
    ctx.publish(FINISHED, {"upload_id": ctx.data["upload_id"], "outcome": ctx.data["outcome"]})


def _infected(ctx: SagaContext) -> bool:
    return bool(ctx.result.get("infected"))


def _too_big(ctx: SagaContext) -> bool:
    return not ctx.result.get("allowed", False)


def _upload(ctx: SagaContext) -> dict[str, Any]:
    return {"upload_id": ctx.data["upload_id"], "name": ctx.data["name"], "size": ctx.data["size"]}


class Postprocessing(Saga):
    type = "postprocessing"
    start = Start("ocis.storage.bytes_received", key="upload_id", to="scanning", action=_begin)
    correlate = {READY: "upload_id"}
    states = [
        State("scanning", Request(SCAN, _upload), timeout=5.0, retries=4, on_timeout="reverting"),
        State("checking", Request(CHECK, _upload), timeout=5.0, retries=4, on_timeout="reverting"),
        State("reverting", Request(REVERT, _upload), timeout=5.0, retries=6),
        State("finishing", timeout=10.0, on_timeout="done"),
        Final("done"),
    ]
    transitions = [
        reply(SCAN, "scanning", "reverting", guard=_infected, action=_set("delete")),
        reply(SCAN, "scanning", "checking"),
        failure(SCAN, "scanning", "reverting", action=_set("abort")),
        reply(CHECK, "checking", "reverting", guard=_too_big, action=_set("abort")),
        reply(CHECK, "checking", "finishing", action=_finish),
        failure(CHECK, "checking", "reverting", action=_set("abort")),
        reply(REVERT, "reverting", "finishing", action=_finish),
        failure(REVERT, "reverting", "failed"),
        on_event(READY, "finishing", "done"),
        timeout(["scanning", "checking"], "reverting", action=_set("abort")),
    ]


# -- the simulated participants ------------------------------------------------------------------------

antivirus = Service("antivirus")
policies = Service("policies")
storage = Service("storage")


def _maybe_drop() -> None:
    if random.random() < _rate("DROP_RATE"):
        raise NoReply("simulated lost reply")  # the saga's deadline re-sends the request


@antivirus.handles(SCAN)
def scan(event: Event) -> dict[str, Any]:
    _flaky()
    _maybe_drop()
    return {"infected": "eicar" in str(event.payload.get("name", "")).lower()}


@policies.handles(CHECK)
def check(event: Event) -> dict[str, Any]:
    _flaky()
    _maybe_drop()
    limit = int(os.environ.get("POLICY_MAX_SIZE", str(10 * 1024 * 1024)))
    size = event.payload.get("size")
    if not isinstance(size, int):
        raise Failure("upload without a size")
    return {"allowed": size <= limit}


@storage.handles(REVERT)
def revert(event: Event) -> dict[str, Any]:
    _flaky()
    return {"reverted": event.payload["upload_id"]}


@storage.on(FINISHED, name="finish_upload")
def finish_upload(event: Event, ctx: Context) -> None:
    """Storage makes the upload available (or not) and says so."""
    _flaky()
    ctx.publish(READY, {"upload_id": event.payload["upload_id"]})


app = App(antivirus, policies, storage, sagas=[Postprocessing])
