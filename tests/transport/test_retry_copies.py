"""`EventBus.retry`: a copy through a delay queue raises the attempt count, or keeps it with
``count_attempt=False`` (a message held back rather than failed), on memory:// and RabbitMQ."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for
from transport import Event, EventBus, Inbound, Subscription


@pytest.mark.parametrize(("count_attempt", "attempt"), [(True, 2), (False, 1)])
def test_a_retry_copy_counts_its_attempt_unless_told_not_to(
    broker_url: str, unique: str, buses: list[object], count_attempt: bool, attempt: int
) -> None:
    """The copy comes back from the delay queue with attempt 2, or still 1 without counting."""
    bus = EventBus(broker_url, exchange=unique)
    buses.append(bus)
    got: list[Inbound] = []
    bus.consume([Subscription(f"{unique}.held.h", ("ocis.held.#",), retry_delays=(0.2,))], got.append)
    bus.publish(Event("ocis.held.made", {"n": 1}))

    def received(n: int) -> bool:
        bus.drain(0.05)
        return len(got) >= n

    wait_for(lambda: received(1), what="the first delivery")
    assert got[0].attempt == 1
    bus.retry(got[0], 0.2, count_attempt=count_attempt)
    wait_for(lambda: received(2), what="the copy back from the delay queue")
    assert got[1].attempt == attempt
    assert got[1].event is not None
    assert got[0].event is not None
    assert got[1].event.id == got[0].event.id
    bus.ack(got[1])
