"""The operator API (``sagas.operations``): finding sagas, acting on them with who acted kept in their
history, and dead letters, on the real worker and store through the deterministic harness."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from examples.postprocessing import Postprocessing
from examples.postprocessing import app as postprocessing_app
from examples.share import Share
from examples.share import app as share_app
from sagas import App, ConfigurationError, Event, HistoryEntry, Reject, SagaRecord, Service, Store
from sagas._store import VersionConflict
from sagas.operations import ActionRefused, NotFound, Operations
from sagas.testing import Drop, Harness

MakeHarness = Callable[..., Harness]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    return


def _upload(h: Harness, upload_id: str, name: str = "a.txt") -> None:
    h.publish("ocis.storage.bytes_received", {"upload_id": upload_id, "name": name, "size": 10, "user": "marie"})


def _ops(h: Harness, *, bus: bool = True) -> Operations:
    return Operations(h.store, sagas=h.app.sagas, bus=h.client_bus() if bus else None, clock=h.clock)


def test_sagas_pages_with_a_next_offset_and_filters_by_key(saga_harness: MakeHarness) -> None:
    """A listing is paged (has_more, next_offset), newest first on request, and filters by key."""
    h = saga_harness(postprocessing_app)
    for i in range(5):
        _upload(h, f"u{i}")
        h.run()  # each saga starts a second after the one before
        h.clock.advance(1)
    h.settle()
    ops = _ops(h)
    first = ops.sagas(limit=2)
    assert [r.key for r in first.items] == ["u0", "u1"]
    assert (first.has_more, first.next_offset) == (True, 2)
    last = ops.sagas(limit=2, offset=4)
    assert [r.key for r in last.items] == ["u4"]
    assert (last.has_more, last.next_offset) == (False, None)
    assert [r.key for r in ops.sagas(newest_first=True, limit=1).items] == ["u4"]
    assert [r.key for r in ops.sagas(key="u3").items] == ["u3"]
    assert ops.sagas(type="postprocessing", state="done", limit=10).items[0].final
    with pytest.raises(ConfigurationError, match="limit must be between 1 and"):
        ops.sagas(limit=0)


def test_saga_is_found_by_id_or_by_type_and_key(saga_harness: MakeHarness) -> None:
    """One saga is found by id or by (type, key), with its history; a missing one raises NotFound."""
    h = saga_harness(postprocessing_app)
    _upload(h, "u1")
    h.settle()
    ops = _ops(h)
    by_key = ops.saga(type="postprocessing", key="u1")
    by_id = ops.saga(by_key.record.id)
    assert by_id.record.id == by_key.record.id
    assert [e.to_state for e in by_id.history][-1] == "done"
    assert by_id.waiting_for is None
    with pytest.raises(NotFound, match="no postprocessing saga with key 'nope'"):
        ops.saga(type="postprocessing", key="nope")
    with pytest.raises(NotFound, match="no saga 'nope'"):
        ops.saga("nope")
    with pytest.raises(ConfigurationError, match="by its id, or by type and key"):
        ops.saga(by_id.record.id, type="postprocessing", key="u1")


def test_retry_resends_the_request_and_records_who_acted(saga_harness: MakeHarness) -> None:
    """Retrying a saga whose request was lost sends it again at once, and its history names the actor."""
    h = saga_harness(postprocessing_app)
    h.inject(Drop(), match="ocis.antivirus.scan")
    _upload(h, "u1")
    h.run()
    saga_id = h.saga(Postprocessing, "u1").id
    view = _ops(h).saga(saga_id)
    assert view.record.state == "scanning"
    assert view.waiting_for is not None
    assert view.waiting_for["type"] == "ocis.antivirus.scan"
    result = _ops(h).retry(saga_id, actor="marie")
    assert (result.from_state, result.to_state, result.actor) == ("scanning", "scanning", "marie")
    assert [t for t, _ in result.published] == ["ocis.antivirus.scan"]
    assert result.pending == 0
    h.run()  # no clock move: the request went out at once and was answered
    assert h.saga(Postprocessing, "u1").state == "done"
    retried = [e for e in h.history(saga_id) if e.reason == "operator: retry"]
    assert [(e.actor, e.message_id.startswith("operator:retry:")) for e in retried] == [("marie", True)]


def test_an_action_without_a_bus_leaves_its_messages_for_the_relay(saga_harness: MakeHarness) -> None:
    """Without a bus, an action commits its messages to the outbox; a worker's relay sends them."""
    h = saga_harness(postprocessing_app)
    h.inject(Drop(), match="ocis.antivirus.scan")
    _upload(h, "u1")
    h.run()
    ops = _ops(h, bus=False)
    result = ops.retry(h.saga(Postprocessing, "u1").id, actor="marie")
    assert (result.published, result.pending) == ([], 1)
    assert ops.outbox_backlog().unsent == 1
    h.settle()
    assert h.saga(Postprocessing, "u1").state == "done"
    assert ops.outbox_backlog().unsent == 0


def test_compensate_starts_the_compensations_and_records_who_acted(saga_harness: MakeHarness) -> None:
    """Compensating a waiting step saga undoes its finished steps; the history names the actor."""
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant", times=100)
    h.publish(
        "ocis.sharing.share_requested",
        {"share_id": "s1", "owner": "einstein", "grantee": "marie", "path": "/p", "size": 1},
    )
    h.run()
    saga_id = h.saga(Share, "s1").id
    result = _ops(h).compensate(saga_id, actor="richard")
    assert (result.from_state, result.actor) == ("grant", "richard")
    h.settle()
    assert h.saga(Share, "s1").state == "compensated"
    assert [e.actor for e in h.history(saga_id) if e.reason.startswith("operator: compensate")] == ["richard"]


def test_actions_that_do_not_apply_raise_typed_errors(saga_harness: MakeHarness) -> None:
    """Retrying an ended saga or compensating where nothing is declared raises ActionRefused; an unknown
    id NotFound; an action without the app's sagas or without an actor, ConfigurationError."""
    h = saga_harness(postprocessing_app)
    _upload(h, "u1")
    h.settle()
    saga_id = h.saga(Postprocessing, "u1").id
    ops = _ops(h)
    with pytest.raises(ActionRefused, match="only a failed saga can be retried"):
        ops.retry(saga_id, actor="marie")
    with pytest.raises(ActionRefused, match="nothing to compensate"):
        ops.compensate(saga_id, actor="marie")
    with pytest.raises(NotFound, match="no saga 'nope'"):
        ops.retry("nope", actor="marie")
    with pytest.raises(ConfigurationError, match="say who acts"):
        ops.retry(saga_id, actor=" ")
    with pytest.raises(ConfigurationError, match="give Operations the app's saga types"):
        Operations(h.store).retry(saga_id, actor="marie")


def test_counts_by_type_and_state(saga_harness: MakeHarness) -> None:
    """counts() gives the number of sagas per type and state."""
    h = saga_harness(postprocessing_app)
    _upload(h, "u1")
    _upload(h, "u2", name="eicar.txt")
    h.settle()
    h.inject(Drop(), match="ocis.antivirus.scan", times=100)
    _upload(h, "u3")
    h.run()
    counts = {(c.type, c.state): c.count for c in _ops(h).counts()}
    assert counts == {("postprocessing", "done"): 2, ("postprocessing", "scanning"): 1}


def test_dead_letters_are_listed_shown_and_replayed(saga_harness: MakeHarness) -> None:
    """A rejected message is listed with its reason, shown by id, and replayed on request, by whom kept in
    the log; unknown ids are reported as missing."""
    accept: list[bool] = [False]
    seen: list[str] = []
    svc = Service("picky")

    @svc.on("ocis.files.uploaded")
    def take(event: Event) -> None:
        if not accept[0]:
            raise Reject("not today")
        seen.append(event.id)

    h = saga_harness(App(svc))
    event = h.publish("ocis.files.uploaded", {"path": "/a"})
    h.run()
    ops = Operations(h.store, bus=h.client_bus())
    (letter,) = ops.dead_letters()
    assert (letter.id, letter.routing_key) == (event.id, "ocis.files.uploaded")
    assert "not today" in letter.reason
    assert ops.dead_letter(event.id).queue == letter.queue
    with pytest.raises(NotFound):
        ops.dead_letter("nope")
    accept[0] = True
    result = ops.replay_dead([event.id, "nope"], actor="marie")
    assert (result.replayed, result.missing, result.kept) == ([event.id], ["nope"], {})
    h.run()
    assert seen == [event.id]
    assert ops.dead_letters() == []


def test_dead_letters_need_a_bus(saga_harness: MakeHarness) -> None:
    """Dead-letter operations without a bus say how to give one."""
    h = saga_harness(postprocessing_app)
    with pytest.raises(ConfigurationError, match="give Operations a bus"):
        Operations(h.store).dead_letters()


def test_dead_letters_are_dropped_one_by_one_or_all(saga_harness: MakeHarness) -> None:
    """drop_dead deletes the letters named (unknown ids are reported missing), or all of them."""
    svc = Service("picky")

    @svc.on("ocis.files.uploaded")
    def take(event: Event) -> None:
        raise Reject("never")

    h = saga_harness(App(svc))
    events = [h.publish("ocis.files.uploaded", {"path": f"/{i}"}) for i in range(3)]
    h.run()
    ops = Operations(h.store, bus=h.client_bus())
    assert sorted(d.id for d in ops.dead_letters()) == sorted(e.id for e in events)
    one = ops.drop_dead([events[0].id, "nope"], actor="marie")
    assert (one.dropped, one.missing) == ([events[0].id], ["nope"])
    assert sorted(d.id for d in ops.dead_letters()) == sorted(e.id for e in events[1:])
    rest = ops.drop_dead(None, actor="marie")
    assert sorted(rest.dropped) == sorted(e.id for e in events[1:])
    assert ops.dead_letters() == []


class _MovedMeanwhile:
    """A store on which another worker moves the saga between the action's read and its write: the write
    meets a version conflict, as it would."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def save_saga(self, record: SagaRecord, **kwargs: Any) -> Any:
        raise VersionConflict(f"saga {record.id} is not at version {kwargs.get('expected_version')}")


def _strand(h: Harness, saga_id: str) -> None:
    """Move a saga into a state its type does not have, as a deploy that renamed the state would."""
    record = h.store.get_saga(saga_id)
    assert record is not None
    record.state, record.version = "renamed_away", record.version + 1
    moved = HistoryEntry(h.clock(), "m", "grant", "renamed_away", "as if a deploy removed the state")
    h.store.save_saga(record, expected_version=record.version - 1, history=moved, inbox=None, outbox=[])


@pytest.mark.parametrize("action", ["retry", "compensate"])
@pytest.mark.parametrize("case", ["stranded", "finished", "changed meanwhile"])
def test_every_operator_action_refuses_cleanly(saga_harness: MakeHarness, action: str, case: str) -> None:
    """Retry and compensate, on a stranded saga, a finished one, or one that another worker moves while
    the action is applied: ActionRefused with the reason, and the saga is left as it was."""
    h = saga_harness(share_app)
    if case != "finished":
        h.inject(Drop(), match="ocis.sharing.grant", times=100)  # the saga waits in grant
    h.publish(
        "ocis.sharing.share_requested",
        {"share_id": "s1", "owner": "einstein", "grantee": "marie", "path": "/p", "size": 1},
    )
    if case == "finished":
        h.settle()
    else:
        h.run()
    saga_id = h.saga(Share, "s1").id
    if case == "stranded":
        _strand(h, saga_id)
    before = h.store.get_saga(saga_id)
    assert before is not None
    store: Any = _MovedMeanwhile(h.store) if case == "changed meanwhile" else h.store
    ops = Operations(store, sagas=h.app.sagas, bus=h.client_bus(), clock=h.clock)
    expected = {
        "stranded": "no longer has|defines no compensation from state 'renamed_away'",
        "finished": "has ended in completed",
        "changed meanwhile": "changed while the .* was being applied",
    }[case]
    with pytest.raises(ActionRefused, match=expected):
        ops.retry(saga_id, actor="marie") if action == "retry" else ops.compensate(saga_id, actor="marie")
    after = h.store.get_saga(saga_id)
    assert after is not None
    assert (after.state, after.version) == (before.state, before.version)


def test_overview_groups_dead_letters_by_queue_and_error_type(saga_harness: MakeHarness) -> None:
    """With a bus, the overview groups the dead letters by queue and error type, most first; without one
    it has none to show."""
    svc = Service("picky")

    @svc.on("ocis.files.uploaded")
    def take(event: Event) -> None:
        if event.payload["path"].startswith("/bad"):
            raise ValueError(f"bad path {event.payload['path']}\nmore detail")
        raise Reject("never")

    h = saga_harness(App(svc))
    for path in ["/a", "/bad1", "/b", "/c"]:
        h.publish("ocis.files.uploaded", {"path": path})
    h.settle()
    ops = Operations(h.store, bus=h.client_bus(), clock=h.clock)
    letters = ops.dead_letters()
    view = ops.overview()
    assert view.dead_letters is not None
    assert [(g.queue, g.count) for g in view.dead_letters] == [(letters[0].queue, 3), (letters[0].queue, 1)]
    assert [g.error_type for g in view.dead_letters] == ["sagas.Reject", "builtins.ValueError"]
    (value_error,) = [g for g in view.dead_letters if g.count == 1]
    assert value_error.example_message.startswith("bad path /bad1")
    assert "\n" not in value_error.example_message
    assert value_error.oldest_dead_at
    assert view.to_dict()["dead_letters"][0]["count"] == 3
    assert Operations(h.store).overview().dead_letters is None


def test_select_counts_a_filter_up_to_a_cap_and_bulk_acts_on_each(saga_harness: MakeHarness) -> None:
    """select gives what a filter matches (over_cap when more than the cap); bulk retries each saga,
    records who acted in each history, and lists the refused ones grouped by why."""
    h = saga_harness(postprocessing_app)
    _upload(h, "done-1")
    h.settle()
    h.inject(Drop(), match="ocis.antivirus.scan", times=3)
    for i in range(3):
        _upload(h, f"s{i}")
    h.run()
    ops = _ops(h)
    everything = ops.select(type="postprocessing")
    assert (everything.count, everything.over_cap) == (4, False)
    assert ops.select(type="postprocessing", cap=3).over_cap
    assert ops.select(type="postprocessing", cap=4).count == 4
    assert ops.select(state="scanning").count == 3
    assert ops.select(key_prefix="s").count == 3
    result = ops.bulk("retry", [r.id for r in everything.items], actor="marie")
    done_id = h.saga(Postprocessing, "done-1").id
    assert sorted(r.saga_id for r in result.done) == sorted(r.id for r in everything.items if r.id != done_id)
    assert list(result.refused) == [done_id]
    (why,) = result.refused_by_reason()
    assert why.startswith("the saga has ended in done")
    for r in result.done:
        assert [e.actor for e in h.history(r.saga_id) if e.reason == "operator: retry"] == ["marie"]
    assert all(e.actor == "" for e in h.history(done_id))
    assert result.to_dict()["done"] == [r.saga_id for r in result.done]
    assert ops.bulk("retry", ["nope"], actor="marie").refused == {"nope": "no saga 'nope'"}
    with pytest.raises(ConfigurationError, match="no bulk action"):
        ops.bulk("delete", [], actor="marie")
    with pytest.raises(ConfigurationError, match="cap must be"):
        ops.select(cap=0)


def test_select_dead_filters_by_queue_and_error_type(saga_harness: MakeHarness) -> None:
    """select_dead filters the dead letters by queue and by error type (as the overview groups them)."""
    svc = Service("picky")

    @svc.on("ocis.files.uploaded")
    def take(event: Event) -> None:
        if event.payload["path"].startswith("/bad"):
            raise ValueError("bad path")
        raise Reject("never")

    h = saga_harness(App(svc))
    for path in ["/a", "/bad1", "/b"]:
        h.publish("ocis.files.uploaded", {"path": path})
    h.settle()
    ops = _ops(h)
    queue = ops.dead_letters()[0].queue
    assert ops.select_dead().count == 3
    assert ops.select_dead(queue=queue, kind="sagas.Reject").count == 2
    assert ops.select_dead(kind="builtins.ValueError").count == 1
    assert ops.select_dead(queue="other").count == 0
    assert ops.select_dead(cap=2).over_cap
    assert ops.select_dead(browse=2).over_cap  # a queue longer than what was read cannot be counted
