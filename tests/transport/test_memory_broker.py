"""The in-process broker (``memory://``): a message routed to several queues is a message of each."""

from __future__ import annotations

from kombu.connection import Connection

from transport import isolated_transport


def test_a_message_routed_to_two_queues_is_its_own_message_in_each() -> None:
    """Each queue's copy has its own delivery tag and source queue: requeueing it in one queue leaves
    the other alone, and neither sees it twice."""
    with Connection("memory://", transport=isolated_transport()) as conn:  # type: ignore[no-untyped-call]
        ch = conn.channel()
        ch.exchange_declare("x", "topic")
        for queue in ("a", "b"):
            ch.queue_declare(queue)
            ch.queue_bind(queue, "x", "k.#")
        ch.basic_publish(ch.prepare_message(b"one"), "x", "k.1")
        in_a, in_b = ch.basic_get("a"), ch.basic_get("b")
        assert in_a is not None
        assert in_b is not None
        assert in_a.body == in_b.body == b"one"
        assert in_a.delivery_tag != in_b.delivery_tag
        ch.basic_reject(in_a.delivery_tag, requeue=True)
        ch.basic_ack(in_b.delivery_tag)
        assert ch.basic_get("b") is None
        again = ch.basic_get("a")
        assert again is not None
        assert again.body == b"one"
        assert ch.basic_get("a") is None
