"""The seed's example: sharing a file mails the grantee, once.

The ``sharing`` service publishes ``ocis.sharing.share_created``; the ``notifications`` service mails
the grantee over SMTP (``SMTP_HOST``/``SMTP_PORT``, default 127.0.0.1:8025). Delivery is at-least-once,
and the handler is idempotent: a redelivered event whose mail was already sent is skipped through the
inbox. The one window left is a crash after the SMTP server took the mail and before the inbox commit;
then the mail goes out twice.

    sagas run examples.notifications:app --broker amqp://guest:guest@localhost//
    sagas publish ocis.sharing.share_created \
        '{"share_id": "s1", "sharer": "einstein", "grantee": "marie", "path": "/Photos"}'
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage

from sagas import App, Event, EventBus, Reject, Service

SHARE_CREATED = "ocis.sharing.share_created"

sharing = Service("sharing")
notifications = Service("notifications")


def share_created(share_id: str, sharer: str, grantee: str, path: str) -> Event:
    """The event the sharing service publishes when a share is created."""
    return Event(
        SHARE_CREATED, {"share_id": share_id, "sharer": sharer, "grantee": grantee, "path": path}, source=sharing.name
    )


def publish_share(bus: EventBus, share_id: str, sharer: str, grantee: str, path: str) -> Event:
    """Create a share: publish its event and return once the broker confirmed it."""
    event = share_created(share_id, sharer, grantee, path)
    bus.publish(event)
    return event


# One mail in flight at a time: a crash can then repeat at most the one mail that the SMTP server took
# just before the crash, and nothing else.
@notifications.on(SHARE_CREATED, idempotent=True, concurrency=1)
def mail_grantee(event: Event) -> None:
    share = event.payload
    missing = [k for k in ("share_id", "sharer", "grantee", "path") if not isinstance(share.get(k), str)]
    if missing:
        raise Reject(f"share event without {', '.join(missing)}")
    mail = EmailMessage()
    mail["From"] = "noreply@ocis.example"
    mail["To"] = f"{share['grantee']}@ocis.example"
    mail["Subject"] = f"{share['sharer']} shared {share['path']} with you"
    mail["X-Share-Id"] = share["share_id"]
    mail.set_content(f"{share['sharer']} shared {share['path']} with you.")
    host = os.environ.get("SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("SMTP_PORT", "8025"))
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.send_message(mail)


app = App(sharing, notifications)
