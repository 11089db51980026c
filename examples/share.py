"""Sharing with notification, in the step style: reserve quota, grant the share, notify the grantee.

``ocis.sharing.share_requested`` ``{share_id, owner, grantee, path, size}`` starts one saga per share.
If a later step fails, the steps that completed are undone in reverse order: the grant is revoked,
then the quota released. The participants are simulated here: the quota service refuses shares over
``QUOTA_LIMIT`` bytes (default 1 GiB), and the notifications service cannot reach a grantee called
``nobody``.

    export SAGAS_BROKER_URL=amqp://guest:guest@localhost//   # sagas publish refuses memory://
    sagas run examples.share:app
    sagas publish ocis.sharing.share_requested \
        '{"share_id": "s1", "owner": "einstein", "grantee": "marie", "path": "/Photos", "size": 1000}'
"""

from __future__ import annotations

import os
from typing import Any

from sagas import App, Event, Failure, SagaContext, Service, Start, Step, StepSaga


def _keep_share(ctx: SagaContext) -> None:
    assert ctx.event is not None
    ctx.data.update(ctx.event.payload)


class Share(StepSaga):
    type = "share"
    start = Start("ocis.sharing.share_requested", key="share_id", do=_keep_share)
    steps = [
        Step("reserve_quota", request="ocis.quota.reserve", compensation="ocis.quota.release", timeout=5),
        Step("grant", request="ocis.sharing.grant", compensation="ocis.sharing.revoke", timeout=5),
        Step("notify", request="ocis.notifications.notify", timeout=5),
    ]


quota = Service("quota")
sharing = Service("sharing")
notifications = Service("notifications")

#: What the simulated participants did, in order (for the tests and the curious).
effects: list[str] = []


@quota.handles("ocis.quota.reserve")
def reserve(event: Event) -> dict[str, Any]:
    limit = int(os.environ.get("QUOTA_LIMIT", str(1024**3)))
    if int(event.payload.get("size", 0)) > limit:
        raise Failure(f"share of {event.payload['size']} bytes is over the quota of {limit}")
    effects.append(f"reserve {event.payload['share_id']}")
    return {"reserved": event.payload["size"]}


@quota.handles("ocis.quota.release")
def release(event: Event) -> None:
    effects.append(f"release {event.payload['share_id']}")


@sharing.handles("ocis.sharing.grant")
def grant(event: Event) -> dict[str, Any]:
    effects.append(f"grant {event.payload['share_id']}")
    return {"granted_to": event.payload["grantee"]}


@sharing.handles("ocis.sharing.revoke")
def revoke(event: Event) -> None:
    effects.append(f"revoke {event.payload['share_id']}")


@notifications.handles("ocis.notifications.notify")
def notify(event: Event) -> None:
    if event.payload["grantee"] == "nobody":
        raise Failure("nobody has no address to notify")
    effects.append(f"notify {event.payload['share_id']}")


app = App(quota, sharing, notifications, sagas=[Share])
