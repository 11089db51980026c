"""Sending back a message the worker could not finish: a retry through a delay queue, or the
dead-letter queue with the reason, so that nothing is lost, stuck or dropped in silence.

Both pipelines of the worker (handlers and sagas) decide the same way: an at-least-once message is
retried after its policy's delay until its attempts are spent, then dead-lettered with the error. A
copy the broker refuses (say the dead-letter queue's node is down) leaves the message unacked: it goes
back to its queue when the connection closes.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from transport import ConnectionLost, Event, EventBus, EventTooLarge, Inbound, InvalidEvent, TransportError, encode

from ._service import Retry

log = structlog.get_logger("sagas.worker")

#: what became of a message sent back
RETRY, DEAD_LETTER, KEPT_UNACKED = "retry", "dead-letter", "kept-unacked"


def send_back(
    bus: EventBus,
    inbound: Inbound,
    error: BaseException | None,
    delay: float | None,
    reason: str = "",
    *,
    count_attempt: bool = True,
) -> str:
    """Retry the message after ``delay`` seconds (its attempt not counted with ``count_attempt=False``),
    or (``delay`` None) dead-letter it with ``reason``. Returns the outcome: ``retry``, ``dead-letter``
    or ``kept-unacked``."""
    try:
        if delay is not None:
            bus.retry(inbound, delay, error, count_attempt=count_attempt)
            return RETRY
        bus.dead_letter(inbound, reason, error)
        return DEAD_LETTER
    except ConnectionLost:
        raise
    except TransportError as err:
        log.error("message.kept_unacked", message_id=inbound.message_id, error=str(err)[:500])
        return KEPT_UNACKED


def retry_or_dead_letter(bus: EventBus, inbound: Inbound, error: BaseException, reason: str, policy: Retry) -> str:
    """Retry an at-least-once message after ``policy``'s delay, or dead-letter it (at-most-once, its
    attempts spent, or an error the policy gives up on) with ``reason`` and the error."""
    if inbound.subscription.durable and inbound.attempt < policy.attempts and not policy.gives_up(error):
        return send_back(bus, inbound, error, policy.delay(inbound.attempt))
    return send_back(bus, inbound, error, None, f"{reason}: {error!r}")


def encode_events(events: Iterable[Event], max_size: int) -> tuple[list[bytes], TransportError | None]:
    """Encode ``events`` once, for the publish that follows: their bodies, or the error of the first
    that cannot be encoded (not JSON, or too large). A handler whose follow-up or reply cannot be
    encoded has failed, and no other attempt can fix it."""
    bodies: list[bytes] = []
    for event in events:
        try:
            bodies.append(encode(event, max_size))
        except (InvalidEvent, EventTooLarge) as exc:
            return [], exc
    return bodies, None
