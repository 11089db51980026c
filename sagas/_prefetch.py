"""The reads of a group of saga messages, done together before the group.

The saga pipeline applies a group of messages to the sagas of one type in one store transaction. Each
message needs its inbox record (is it a duplicate?) and its saga (by id for a reply, by key for a start
or correlated event): a store read each, a round trip each on PostgreSQL. :class:`GroupReads` reads
them for the whole group with one statement each (:meth:`Store.answers`, :meth:`Store.get_sagas`,
:meth:`Store.find_sagas`) and gives each answer once: a second read of the same message or saga (a
duplicate in the group, a second message of one saga, the retry after a version conflict) goes to the
store, which by then holds what the group wrote so far.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._store import SagaRecord, Store


class GroupReads:
    """Reads done ahead for a group of messages to the sagas of one type (see the module docstring).
    ``consumer`` is the inbox consumer of the type's messages, ``message_ids`` the group's messages,
    ``saga_ids`` the sagas its replies are for, ``keys`` the (type, key) pairs of its other messages."""

    def __init__(
        self,
        store: Store,
        consumer: str,
        message_ids: Sequence[str],
        saga_ids: Sequence[str],
        keys: Sequence[tuple[str, str]],
    ) -> None:
        self._store = store
        self._consumer = consumer
        seen, _ = store.answers([(consumer, m) for m in message_ids], []) if message_ids else (set(), {})
        self._seen = {m: (consumer, m) in seen for m in message_ids}
        found = store.get_sagas(saga_ids) if saga_ids else {}
        self._by_id: dict[str, SagaRecord | None] = {i: found.get(i) for i in saga_ids}
        by_key = store.find_sagas(keys) if keys else {}
        self._by_key: dict[tuple[str, str], SagaRecord | None] = {k: by_key.get(k) for k in keys}

    def seen(self, consumer: str, message_id: str) -> bool:
        """:meth:`Store.seen`, answered from the read ahead the first time."""
        if consumer == self._consumer and message_id in self._seen:
            return self._seen.pop(message_id)
        return self._store.seen(consumer, message_id)

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        """:meth:`Store.get_saga`, answered from the read ahead the first time."""
        if saga_id in self._by_id:
            return self._given(self._by_id.pop(saga_id))
        return self._store.get_saga(saga_id)

    def find_saga(self, saga_type: str, key: str) -> SagaRecord | None:
        """:meth:`Store.find_saga`, answered from the read ahead the first time."""
        if (saga_type, key) in self._by_key:
            return self._given(self._by_key.pop((saga_type, key)))
        return self._store.find_saga(saga_type, key)

    def _given(self, record: SagaRecord | None) -> SagaRecord | None:
        """A saga handed out is read from the store from now on, however it is asked for."""
        if record is not None:
            self._by_id.pop(record.id, None)
            self._by_key.pop((record.type, record.key), None)
        return record
