"""The ids the protocol derives (requests, replies, a saga's events, follow-ups) never change: a re-sent
request, a redelivered reply and a worker of the next version all derive the same ones."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from sagas._protocol import name_id

_NAMESPACES = st.one_of(st.uuids(), st.just(uuid.UUID("0b5c8a4e-54c4-4f7e-9a0f-6a3d8f1f2e11")))


@given(_NAMESPACES, st.text())
def test_a_derived_id_is_the_uuid5_of_its_name(namespace: uuid.UUID, name: str) -> None:
    assert name_id(namespace, name) == uuid.uuid5(namespace, name).hex


def test_derived_ids_are_the_ones_earlier_versions_derived() -> None:
    saga_ids = uuid.UUID("0b5c8a4e-54c4-4f7e-9a0f-6a3d8f1f2e11")
    # (written down once from uuid.uuid5, which derived them before name_id existed)
    assert name_id(saga_ids, "0123456789abcdef0123456789abcdef/3/request") == "6095b1aaf3c459668431c8fbfa1d4150"
