"""Definition versions (``sagas._versions``): fingerprints, the check of a deploy against the live
sagas, migrations, and the recipes of docs/upgrades.md, each with its unsafe and its safe version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sagas import (
    App,
    ConfigurationError,
    Event,
    Final,
    Go,
    MemoryStore,
    Saga,
    Service,
    Start,
    State,
    Step,
    StepSaga,
    Store,
    Worker,
    open_store,
)
from sagas._cli import cli
from sagas._protocol import reply_event
from sagas._queues import register, request_routes
from sagas._saga_engine import SagaEngine
from sagas._versions import (
    NO_WAY_OUT,
    REQUEST_CHANGED,
    REQUEST_UNHANDLED,
    STATE_REMOVED,
    TYPE_REMOVED,
    StrandedSagas,
    check,
    fingerprint,
    record_definitions,
)
from sagas.testing import Harness
from transport import CONTENT_TYPE, decode

#: v1 sagas are made before the harness's virtual clock starts: their requests are relayed at once
BEFORE = 1_799_999_000.0
REQUESTED, CONFIRMED = "travel.trips.requested", "travel.trips.confirmed"
HOTEL, FLIGHT, CANCEL_HOTEL = "travel.hotel.book", "travel.flight.book", "travel.hotel.cancel"
RESERVE_FLIGHT = "travel.flight.reserve"


def _trip_states(**changes: State | None) -> list[State]:
    """Version 1 of the trip saga's states, with some replaced (a State) or removed (None)."""
    states: dict[str, State | None] = {
        "booking_hotel": State("booking_hotel", sends=HOTEL, timeout=5.0, on_reply="booking_flight"),
        "booking_flight": State(
            "booking_flight", sends=FLIGHT, timeout=5.0, on_reply="confirming", on_failure="cancelling_hotel"
        ),
        "confirming": State("confirming", timeout=60.0, on={CONFIRMED: "booked"}, on_timeout="booked"),
        "cancelling_hotel": State("cancelling_hotel", sends=CANCEL_HOTEL, timeout=5.0, on_reply="cancelled"),
        "booked": Final("booked"),
        "cancelled": Final("cancelled"),
    }
    states.update(changes)
    return [s for s in states.values() if s is not None]


class TripV1(Saga):
    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states()


def _app(*sagas: type[Saga]) -> App:
    """The app with the sagas and participants that answer every request of them."""
    svc = Service("travel")
    requests = {r for s in sagas for r in s.definition().requests}
    for i, request_type in enumerate(sorted(requests)):
        svc.handles(request_type, name=f"answer_{i}")(lambda event: {"ok": True})
    return App(svc, sagas=list(sagas))


def _live(store: Store, saga: type[Saga], keys: Sequence[str], *, replies: int = 0) -> list[str]:
    """Start sagas of ``saga`` with these keys in ``store`` (as a worker of that version would), each
    moved on by ``replies`` successful replies; their ids."""
    engine = SagaEngine([saga], store, clock=lambda: BEFORE)
    d = saga.definition()
    ids = []
    for key in keys:
        applied = engine.handle(d.type, Event(type=next(iter(d.starts)), payload={"trip_id": key}, source="test"))
        assert applied.saga is not None
        for _ in range(replies):
            record = store.get_saga(applied.saga.id)
            assert record is not None
            request = decode(record.meta["request"]["body"].encode(), CONTENT_TYPE)
            engine.handle(d.type, reply_event(request, "travel.answer", "travel", ok=True))
        ids.append(applied.saga.id)
    record_definitions([d], store, BEFORE)
    return ids


class _Kept:
    """A store that the workers of a test (which close their store when they stop) leave open."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def close(self) -> None:
        pass


@pytest.fixture
def store(any_store: Store) -> Store:
    """A store on memory, SQLite and PostgreSQL (a schema of its own), open until the test ends."""
    return any_store if isinstance(any_store, MemoryStore) else _Kept(any_store)


def _finish(app: App, store: Store) -> None:
    """Run ``app`` on ``store`` until every saga has ended."""
    with Harness(app, store=store) as h:
        h.settle()


# -- fingerprints ------------------------------------------------------------------------------------


def test_the_fingerprint_is_the_same_in_another_process() -> None:
    """A fingerprint is a SHA-256 of a canonical graph: another interpreter with another hash seed
    computes the same one."""
    code = "from tests.sagas.test_versions import TripV1; print(TripV1.definition().fingerprint)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == TripV1.definition().fingerprint == fingerprint(TripV1.definition())
    assert len(out.stdout.strip()) == 64


def test_the_fingerprint_follows_the_graph_not_the_code() -> None:
    """A changed transition changes the fingerprint; a changed guard or action (code) does not."""

    class Moved(Saga):
        type = "trip"
        start = Start(REQUESTED, key="trip_id", to="booking_hotel")
        correlate = {CONFIRMED: "trip_id"}
        states = _trip_states(
            confirming=State("confirming", timeout=60.0, on={CONFIRMED: "cancelled"}, on_timeout="booked")
        )

    class Guarded(Saga):
        type = "trip"
        start = Start(REQUESTED, key="trip_id", to="booking_hotel")
        correlate = {CONFIRMED: "trip_id"}
        states = _trip_states(
            confirming=State(
                "confirming", timeout=60.0, on={CONFIRMED: Go("booked", when=lambda ctx: True)}, on_timeout="booked"
            )
        )

    assert Moved.definition().fingerprint != TripV1.definition().fingerprint
    assert Guarded.definition().fingerprint == TripV1.definition().fingerprint


def test_each_saga_records_the_fingerprint_it_moved_under(store: Store) -> None:
    """A new saga is stamped with its definition's fingerprint, and the definition's graph is kept."""
    (saga_id,) = _live(store, TripV1, ["t1"])
    record = store.get_saga(saga_id)
    assert record is not None
    assert record.fingerprint == TripV1.definition().fingerprint
    graph = store.definition_graph("trip", TripV1.definition().fingerprint)
    assert graph is not None
    assert json.loads(graph)["states"]["booking_hotel"]["sends"] == HOTEL


def test_a_version_6_store_gets_the_fingerprint_column_with_unknown_values(tmp_path: Path) -> None:
    """Opening a schema-6 store adds the sagas' fingerprint column (NULL: unknown) and the definitions
    table; a saga from before reads with no fingerprint, and the check takes it as it is."""
    import sqlite3

    path = tmp_path / "old.db"
    store = open_store(f"sqlite:///{path}")
    _live(store, TripV1, ["t1"])
    store.close()
    db = sqlite3.connect(path)  # as version 6 left it
    db.executescript(
        "ALTER TABLE sagas DROP COLUMN fingerprint; DROP TABLE definitions;"
        " DELETE FROM schema_version; INSERT INTO schema_version VALUES (6);"
    )
    db.close()
    store = open_store(f"sqlite:///{path}")
    try:
        (record,) = store.list_sagas()
        assert record.fingerprint is None
        (group,) = store.live_groups()
        assert (group.type, group.state, group.fingerprint, group.awaits) == ("trip", "booking_hotel", None, HOTEL)
        assert check({"trip": TripV1.definition()}, store).compatible
    finally:
        store.close()


@pytest.mark.postgres
def test_a_version_6_postgres_store_gets_the_fingerprint_column(postgres_url: str, unique: str) -> None:
    """On PostgreSQL too, opening a schema-6 store adds the fingerprint column and the definitions table."""
    import psycopg
    from psycopg import sql

    url = f"{postgres_url}?schema={unique}"
    try:
        store = open_store(url)
        _live(store, TripV1, ["t1"])
        store.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:  # as version 6 left it
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(unique)))
            conn.execute("ALTER TABLE sagas DROP COLUMN fingerprint")
            conn.execute("DROP TABLE definitions")
            conn.execute("UPDATE schema_version SET version = 6")
        store = open_store(url)
        try:
            assert [r.fingerprint for r in store.list_sagas()] == [None]
            assert store.definition_graph("trip", TripV1.definition().fingerprint) is None
            assert check({"trip": TripV1.definition()}, store).compatible
        finally:
            store.close()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


# -- migrations at compile time ----------------------------------------------------------------------


def test_a_migration_from_a_state_that_still_exists_is_refused() -> None:
    """A migration's source must be a state this version no longer has."""

    class Wrong(Saga):
        type = "trip"
        start = Start(REQUESTED, key="trip_id", to="booking_hotel")
        correlate = {CONFIRMED: "trip_id"}
        states = _trip_states()
        migrations = {"booking_hotel": "booking_flight"}

    with pytest.raises(ConfigurationError, match="still has"):
        Wrong.definition()


def test_a_migration_to_an_unknown_state_is_refused() -> None:
    """A migration's target must be a state of this version."""

    class Wrong(Saga):
        type = "trip"
        start = Start(REQUESTED, key="trip_id", to="booking_hotel")
        correlate = {CONFIRMED: "trip_id"}
        states = _trip_states()
        migrations = {"reserving": "nowhere"}

    with pytest.raises(ConfigurationError, match="unknown state 'nowhere'"):
        Wrong.definition()


def test_a_migrate_that_is_not_a_function_is_refused() -> None:
    """``migrate`` is a function of (data, from_fingerprint)."""

    class Wrong(Saga):
        type = "trip"
        start = Start(REQUESTED, key="trip_id", to="booking_hotel")
        correlate = {CONFIRMED: "trip_id"}
        states = _trip_states()
        migrate = "v2"

    with pytest.raises(ConfigurationError, match="migrate"):
        Wrong.definition()


# -- the recipes of docs/upgrades.md ------------------------------------------------------------------


class TripPaying(Saga):
    """Safe: a new state, paying, between the flight and the confirmation."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states(
        booking_flight=State(
            "booking_flight", sends=FLIGHT, timeout=5.0, on_reply="paying", on_failure="cancelling_hotel"
        ),
        paying=State("paying", sends="travel.payment.charge", timeout=5.0, on_reply="confirming"),
    )


def test_recipe_add_a_state(store: Store) -> None:
    """Adding a state strands nothing: the check passes, and sagas before it go through it."""
    before, past = _live(store, TripV1, ["t1"]), _live(store, TripV1, ["t2"], replies=2)
    report = check({"trip": TripPaying.definition()}, store)
    assert report.compatible
    assert report.live == 2
    _finish(_app(TripPaying), store)
    through = [h.to_state for h in store.saga_history(before[0])]
    assert "paying" in through
    assert "paying" not in [h.to_state for h in store.saga_history(past[0])]


class TripRenamed(Saga):
    """Unsafe: booking_hotel renamed to reserving_hotel, without a migration."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="reserving_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states(
        booking_hotel=None,
        reserving_hotel=State("reserving_hotel", sends=HOTEL, timeout=5.0, on_reply="booking_flight"),
    )


class TripRenamedMigrated(TripRenamed):
    """Safe: the same rename, with a migration."""

    migrations = {"booking_hotel": "reserving_hotel"}


def test_recipe_rename_a_state(store: Store) -> None:
    """Renaming a state strands its sagas; with ``migrations = {old: new}`` they move and finish."""
    ids = _live(store, TripV1, ["t1", "t2"])
    report = check({"trip": TripRenamed.definition()}, store)
    (stranded,) = report.stranded
    assert (stranded.kind, stranded.group.state, stranded.group.count) == (STATE_REMOVED, "booking_hotel", 2)
    assert set(stranded.examples) == set(ids)
    assert "booking_hotel" in stranded.line()
    assert ids[0] in stranded.line()

    safe = check({"trip": TripRenamedMigrated.definition()}, store)
    assert safe.compatible
    assert [m.to for m in safe.migrating] == ["reserving_hotel"]
    _finish(_app(TripRenamedMigrated), store)
    for saga_id in ids:
        record = store.get_saga(saga_id)
        assert record is not None
        assert record.state == "booked"
        moves = [(h.from_state, h.to_state) for h in store.saga_history(saga_id)]
        assert ("booking_hotel", "reserving_hotel") in moves
        (migration,) = [h for h in store.saga_history(saga_id) if h.message_id.startswith("migration:")]
        assert "migrations['booking_hotel'] = 'reserving_hotel'" in migration.reason


class TripWithoutFlight(Saga):
    """Unsafe: the flight step removed."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states(
        booking_flight=None,
        booking_hotel=State(
            "booking_hotel", sends=HOTEL, timeout=5.0, on_reply="confirming", on_compensate="cancelling_hotel"
        ),
    )


class TripWithoutFlightMigrated(TripWithoutFlight):
    """Safe: the removed step's sagas go on where it led."""

    migrations = {"booking_flight": "confirming"}


def test_recipe_remove_a_step(store: Store) -> None:
    """Removing a state strands the sagas in it; migrating them to where it led lets them finish."""
    _live(store, TripV1, ["t1"])
    (waiting,) = _live(store, TripV1, ["t2"], replies=1)
    (stranded,) = check({"trip": TripWithoutFlight.definition()}, store).stranded
    assert (stranded.kind, stranded.group.state, stranded.examples) == (STATE_REMOVED, "booking_flight", (waiting,))
    assert check({"trip": TripWithoutFlightMigrated.definition()}, store).compatible
    _finish(_app(TripWithoutFlightMigrated), store)
    assert {r.state for r in store.list_sagas()} == {"booked"}


class TripReservingFlight(Saga):
    """Unsafe: booking_flight now sends another request."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states(
        booking_flight=State(
            "booking_flight", sends=RESERVE_FLIGHT, timeout=5.0, on_reply="confirming", on_failure="cancelling_hotel"
        )
    )


class TripReservingFlightSafe(Saga):
    """Safe: the new request in a new state; the old state's sagas migrate to it (and send it)."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states(
        booking_flight=None,
        booking_hotel=State("booking_hotel", sends=HOTEL, timeout=5.0, on_reply="reserving_flight"),
        reserving_flight=State(
            "reserving_flight", sends=RESERVE_FLIGHT, timeout=5.0, on_reply="confirming", on_failure="cancelling_hotel"
        ),
    )
    migrations = {"booking_flight": "reserving_flight"}


def test_recipe_change_a_request(store: Store) -> None:
    """A state that sends another request strands the sagas waiting for the old one's reply; a new state
    for the new request, with a migration, sends it to them and lets them finish."""
    (waiting,) = _live(store, TripV1, ["t1"], replies=1)
    (stranded,) = check({"trip": TripReservingFlight.definition()}, store).stranded
    assert (stranded.kind, stranded.group.awaits, stranded.examples) == (REQUEST_CHANGED, FLIGHT, (waiting,))
    assert check({"trip": TripReservingFlightSafe.definition()}, store).compatible
    _finish(_app(TripReservingFlightSafe), store)
    record = store.get_saga(waiting)
    assert record is not None
    assert record.state == "booked"
    assert ("booking_flight", "reserving_flight") in [(h.from_state, h.to_state) for h in store.saga_history(waiting)]


class TripApproved(Saga):
    """Unsafe: confirming now waits for another event: its way out is gone."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {"travel.trips.approved": "trip_id"}
    states = _trip_states(
        confirming=State("confirming", timeout=60.0, on={"travel.trips.approved": "booked"}, on_timeout="booked")
    )


class TripApprovedSafe(Saga):
    """Safe: both events lead out of confirming until the old one's sagas are gone."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {"travel.trips.approved": "trip_id", CONFIRMED: "trip_id"}
    states = _trip_states(
        confirming=State(
            "confirming",
            timeout=60.0,
            on={"travel.trips.approved": "booked", CONFIRMED: "booked"},
            on_timeout="booked",
        )
    )


def test_recipe_replace_an_event(store: Store) -> None:
    """A state whose ways out are all gone (only its deadline is left) strands its sagas; keeping the old
    event beside the new one passes, and the old event still moves them."""
    (waiting,) = _live(store, TripV1, ["t1"], replies=2)
    (stranded,) = check({"trip": TripApproved.definition()}, store).stranded
    assert (stranded.kind, stranded.group.state, stranded.examples) == (NO_WAY_OUT, "confirming", (waiting,))
    assert f"event:{CONFIRMED}" in stranded.why
    assert check({"trip": TripApprovedSafe.definition()}, store).compatible
    with Harness(_app(TripApprovedSafe), store=store) as h:
        h.publish(CONFIRMED, {"trip_id": "t1"})
        h.run()
        assert h.saga("trip", "t1").state == "booked"


class TripFinalConfirming(Saga):
    """Unsafe: confirming made final."""

    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    states = _trip_states(confirming=Final("confirming"), booked=None)


def test_a_state_made_final_strands_its_live_sagas(store: Store) -> None:
    """Live sagas in a state that became final could never move or end: stranded."""
    _live(store, TripV1, ["t1"], replies=2)
    (stranded,) = check({"trip": TripFinalConfirming.definition()}, store).stranded
    assert (stranded.kind, stranded.group.state) == (NO_WAY_OUT, "confirming")


class Holiday(Saga):
    type = "holiday"
    start = Start("travel.holidays.requested", key="trip_id", to="booking")
    states = [State("booking", sends="travel.holiday.book", timeout=5.0, on_reply="booked"), Final("booked")]


def test_recipe_remove_a_saga_type(store: Store) -> None:
    """A saga type the app no longer defines strands its live sagas, unless the store is shared with the
    app that runs it (then they are listed, not judged); keeping the type until they ended passes."""
    (saga_id,) = _live(store, TripV1, ["t1"])
    (stranded,) = check({"holiday": Holiday.definition()}, store).stranded
    assert (stranded.kind, stranded.group.type, stranded.examples) == (TYPE_REMOVED, "trip", (saga_id,))
    shared = check({"holiday": Holiday.definition()}, store, shared_store=True)
    assert shared.compatible
    assert [g.type for g in shared.others] == ["trip"]
    assert check({"holiday": Holiday.definition(), "trip": TripV1.definition()}, store).compatible


class StepTripV1(StepSaga):
    type = "steptrip"
    start = Start(REQUESTED, key="trip_id")
    steps = [Step("hotel", HOTEL, compensation=CANCEL_HOTEL), Step("flight", FLIGHT)]


class StepTripRenamed(StepSaga):
    type = "steptrip"
    start = Start(REQUESTED, key="trip_id")
    steps = [Step("lodging", HOTEL, compensation=CANCEL_HOTEL), Step("flight", FLIGHT)]


class StepTripRenamedMigrated(StepTripRenamed):
    migrations = {"hotel": "lodging", "undo_hotel": "undo_lodging"}


def test_recipe_rename_a_step(store: Store) -> None:
    """In the step style a step is a state (and its compensation an undo_ state): renaming one strands
    its sagas; migrating both names lets them finish."""
    ids = _live(store, StepTripV1, ["t1", "t2"])
    (stranded,) = check({"steptrip": StepTripRenamed.definition()}, store).stranded
    assert (stranded.kind, stranded.group.state, stranded.group.count) == (STATE_REMOVED, "hotel", 2)
    assert check({"steptrip": StepTripRenamedMigrated.definition()}, store).compatible
    _finish(_app(StepTripRenamedMigrated), store)
    assert [store.get_saga(i).state for i in ids] == ["completed", "completed"]  # type: ignore[union-attr]


def _travel(*, without: str | None = None, renamed: str | None = None) -> App:
    """The trip app (saga and participants), with the handler of one request type removed (``without``)
    or renamed (``renamed``: the same request type, handled under another name, so another queue)."""
    svc = Service("travel")
    for i, request_type in enumerate(sorted(TripV1.definition().requests)):
        if request_type == without:
            continue
        name = "reserve_seats" if request_type == renamed else f"answer_{i}"
        svc.handles(request_type, name=name)(lambda event: {"ok": True})
    return App(svc, sagas=[TripV1])


def _unhandled(store: Store, app: App) -> list[Any]:
    routes = request_routes(store, app, app.exchange)
    assert routes is not None
    return check({"trip": TripV1.definition()}, store, unhandled=routes.unhandled).stranded


def test_recipe_remove_a_requests_handler(store: Store) -> None:
    """A request type whose handler is gone strands the sagas waiting for its reply: the store's queue
    registry shows that the app's queue received it, and nothing the app or another app declares does
    now. ``check`` says ``request-unhandled``, a worker refuses to start; renaming the handler (same request
    type, another queue) passes, and the sagas finish."""
    register(store, _travel(), "sagas", BEFORE - 10)  # what the running version's workers declared
    (waiting,) = _live(store, TripV1, ["t1"], replies=1)  # waits for the flight's reply
    (stranded,) = _unhandled(store, _travel(without=FLIGHT))
    assert (stranded.kind, stranded.group.awaits, stranded.examples) == (REQUEST_UNHANDLED, FLIGHT, (waiting,))
    assert f"nothing handles {FLIGHT} any more: queue sagas.travel.answer_0 (handler travel.answer_0" in stranded.why
    assert "keep a handler of travel.flight.book" in stranded.why
    with pytest.raises(StrandedSagas, match="nothing handles travel") as info:
        Worker(_travel(without=FLIGHT), store=store).start()
    assert [s.kind for s in info.value.report.stranded] == [REQUEST_UNHANDLED]
    assert _unhandled(store, _travel(renamed=FLIGHT)) == []
    _finish(_travel(renamed=FLIGHT), store)
    record = store.get_saga(waiting)
    assert record is not None
    assert record.state == "booked"


def test_a_request_another_app_handles_is_not_unhandled(store: Store) -> None:
    """A request type a queue of another app's latest registration binds is handled there; once that
    app registers again without it, the sagas waiting for its reply are stranded, naming its old queue.
    With ``shared_store`` the same evidence is needed, and is enough."""
    flights = Service("flights")
    flights.handles(FLIGHT, name="book")(lambda event: {"ok": True})
    register(store, _travel(), "sagas", BEFORE - 20)
    register(store, App(flights), "sagas", BEFORE - 10)
    _live(store, TripV1, ["t1"], replies=1)
    assert _unhandled(store, _travel(without=FLIGHT)) == []  # the flights app's queue receives it
    report = check(
        {"trip": TripV1.definition()},
        store,
        shared_store=True,
        unhandled=request_routes(store, _travel(without=FLIGHT), "sagas").unhandled,  # type: ignore[union-attr]
    )
    assert report.compatible
    moved = Service("flights")
    moved.handles("travel.flight.change", name="change")(lambda event: {"ok": True})
    register(store, App(moved), "sagas", BEFORE - 5)  # the flights app no longer handles it
    register(store, _travel(without=FLIGHT), "sagas", BEFORE - 5)
    (stranded,) = _unhandled(store, _travel(without=FLIGHT))
    assert stranded.kind == REQUEST_UNHANDLED
    assert "queue sagas.flights.book (handler flights.book of app 'flights'" in stranded.why
    shared = check(
        {"trip": TripV1.definition()},
        store,
        shared_store=True,
        unhandled=request_routes(store, _travel(without=FLIGHT), "sagas").unhandled,  # type: ignore[union-attr]
    )
    assert [s.kind for s in shared.stranded] == [REQUEST_UNHANDLED]


def test_a_request_no_registered_queue_ever_received_is_not_judged(store: Store) -> None:
    """Without evidence (no queue in the store's registry ever bound the request type: its participant
    may run in an app with a store of its own), an unhandled request strands nothing; nor on another
    exchange than the one that bound it."""
    _live(store, TripV1, ["t1"], replies=1)
    assert _unhandled(store, _travel(without=FLIGHT)) == []
    register(store, _travel(), "other-exchange", BEFORE - 10)
    assert _unhandled(store, _travel(without=FLIGHT)) == []
    worker = Worker(_travel(without=FLIGHT), store=store)
    worker.start()
    try:
        assert worker.compatibility is not None
        assert worker.compatibility.compatible
    finally:
        worker.shutdown()


# -- data migrations -----------------------------------------------------------------------------------


def _upgrade(data: dict[str, Any], from_fingerprint: str | None) -> dict[str, Any]:
    data["traveller"] = {"name": data.pop("name", "?")}
    data["from"] = from_fingerprint
    return data


class TripV2Data(Saga):
    type = "trip"
    start = Start(REQUESTED, key="trip_id", to="booking_hotel")
    correlate = {CONFIRMED: "trip_id"}
    states = _trip_states()
    data_version = 2
    migrate = staticmethod(_upgrade)


def test_migrate_upgrades_the_data_once_and_records_it(store: Store) -> None:
    """A saga of another version is given to ``migrate`` with its fingerprint the first time a worker
    loads it; the move is in its history, and the saga is stamped with the new fingerprint."""
    ids = _live(store, TripV1, ["t1"], replies=2)
    engine = SagaEngine([TripV2Data], store, clock=lambda: BEFORE + 1)
    engine.handle("trip", Event(type=CONFIRMED, payload={"trip_id": "t1"}, source="test"))
    record = store.get_saga(ids[0])
    assert record is not None
    assert record.state == "booked"
    assert record.data["traveller"] == {"name": "?"}
    assert record.data["from"] == TripV1.definition().fingerprint
    migrations = [h for h in store.saga_history(ids[0]) if h.message_id.startswith("migration:")]
    assert len(migrations) == 1
    assert "migrate()" in migrations[0].reason
    assert record.fingerprint == TripV2Data.definition().fingerprint


def _broken(data: dict[str, Any], from_fingerprint: str | None) -> dict[str, Any]:
    raise KeyError("name")


class TripBrokenMigrate(TripV2Data):
    migrate = staticmethod(_broken)


def test_a_migrate_that_raises_parks_the_saga_with_its_data_unchanged(store: Store) -> None:
    """A ``migrate`` that raises is the saga's own code failing: the saga is parked in ``failed``, its
    data as it was, the error in its history."""
    (saga_id,) = _live(store, TripV1, ["t1"], replies=2)
    engine = SagaEngine([TripBrokenMigrate], store, clock=lambda: BEFORE + 1)
    engine.handle("trip", Event(type=CONFIRMED, payload={"trip_id": "t1"}, source="test"))
    record = store.get_saga(saga_id)
    assert record is not None
    assert record.state == "failed"
    assert record.data == {"trip_id": "t1"}
    assert "migrate function" in store.saga_history(saga_id)[-1].reason


# -- the worker and the CLI ------------------------------------------------------------------------------

#: the modules `sagas run` and `sagas check` import the apps from
_MODULE = """
from tests.sagas.test_versions import _app, _travel, FLIGHT, TripV1, TripRenamed, TripRenamedMigrated
v1 = _app(TripV1)
renamed = _app(TripRenamed)
migrated = _app(TripRenamedMigrated)
unhandled = _travel(without=FLIGHT)
"""


@pytest.fixture
def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``versions_apps`` with the apps v1, renamed and migrated; returns the store URL."""
    (tmp_path / "versions_apps.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"sqlite:///{tmp_path}/sagas.db"


def test_a_worker_that_would_strand_live_sagas_exits_4_and_names_them(apps: str, tmp_path: Path) -> None:
    """``sagas run`` with a definition that would strand live sagas refuses to start: exit 4, and the
    report on stderr names the type, the state, the count and the sagas."""
    store = open_store(apps)
    ids = _live(store, TripV1, ["t1", "t2"])
    store.close()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    done = subprocess.run(
        [sys.executable, "-m", "sagas", "run", "versions_apps:renamed", "--broker", "memory://", "--store", apps],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert "trip/booking_hotel: 2 saga(s)" in done.stderr
    assert all(i in done.stderr for i in ids)
    assert "worker.stranded_sagas" in done.stderr
    store = open_store(apps)
    try:
        assert {r.state for r in store.list_sagas()} == {"booking_hotel"}  # nothing was changed
    finally:
        store.close()


def test_allow_stranded_parks_the_stranded_sagas_in_failed_with_the_reason(store: Store) -> None:
    """With ``allow_stranded`` the worker starts, and the stranded sagas are parked in ``failed`` with why
    in their history; without it, it raises StrandedSagas."""
    ids = _live(store, TripV1, ["t1", "t2"])
    with pytest.raises(StrandedSagas, match="booking_hotel"):
        Worker(_app(TripRenamed), store=store).start()
    worker = Worker(_app(TripRenamed), store=store, allow_stranded=True)
    worker.start()
    try:
        for saga_id in ids:
            record = store.get_saga(saga_id)
            assert record is not None
            assert record.state == "failed"
            assert record.final
            last = store.saga_history(saga_id)[-1]
            assert (last.from_state, last.to_state) == ("booking_hotel", "failed")
            assert "state 'booking_hotel' no longer exists" in last.reason
        assert worker.compatibility is not None
        assert not worker.compatibility.compatible
    finally:
        worker.shutdown()


def test_sagas_check_exits_0_when_compatible_and_4_naming_the_stranded(apps: str) -> None:
    """``sagas check APP --store URL``: the report, exit 0 when compatible, 4 when sagas would be stranded."""
    store = open_store(apps)
    ids = _live(store, TripV1, ["t1"])
    store.close()
    runner = CliRunner()
    ok = runner.invoke(cli, ["check", "versions_apps:migrated", "--store", apps])
    assert ok.exit_code == 0, ok.output
    assert "compatible" in ok.output
    assert "migrates trip/booking_hotel -> reserving_hotel: 1" in ok.output
    bad = runner.invoke(cli, ["check", "versions_apps:renamed", "--store", apps, "--json"])
    assert bad.exit_code == 4
    out = json.loads(bad.output)
    assert out["compatible"] is False
    assert out["stranded"][0]["examples"] == ids


def test_sagas_check_and_run_refuse_a_request_no_longer_handled(apps: str, tmp_path: Path) -> None:
    """``sagas check`` reports ``request-unhandled`` (exit 4; with ``--exchange`` another exchange, whose
    registry has no evidence, passes), ``sagas run`` exits 4 naming the sagas, and ``--allow-stranded``
    parks them in ``failed`` with the reason."""
    store = open_store(apps)
    register(store, _travel(), "sagas", BEFORE - 10)
    ids = _live(store, TripV1, ["t1"], replies=1)
    store.close()
    runner = CliRunner()
    bad = runner.invoke(cli, ["check", "versions_apps:unhandled", "--store", apps, "--json"])
    assert bad.exit_code == 4, bad.output
    (stranded,) = json.loads(bad.output)["stranded"]
    assert (stranded["kind"], stranded["awaits"], stranded["examples"]) == (REQUEST_UNHANDLED, FLIGHT, ids)
    text = runner.invoke(cli, ["check", "versions_apps:unhandled", "--store", apps])
    assert text.exit_code == 4
    assert f"STRANDED trip/booking_flight: 1 saga(s) ({ids[0]}): they wait for the reply to {FLIGHT}" in text.output
    other = runner.invoke(cli, ["check", "versions_apps:unhandled", "--store", apps, "--exchange", "elsewhere"])
    assert other.exit_code == 0, other.output
    # (a deploy check run without the workers' exchange is told so: nothing to judge requests by there)
    assert "note: the store's queue registry holds no queue of exchange 'elsewhere', only of 'sagas'" in other.output
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    run = [sys.executable, "-m", "sagas", "run", "versions_apps:unhandled", "--broker", "memory://", "--store", apps]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 4, done.stderr
    assert f"nothing handles {FLIGHT} any more" in done.stderr
    store = open_store(apps)
    try:
        worker = Worker(_travel(without=FLIGHT), store=store, allow_stranded=True)
        worker.start()
        worker.shutdown()
    finally:
        store.close()
    store = open_store(apps)
    try:
        record = store.get_saga(ids[0])
        assert record is not None
        assert (record.state, record.final) == ("failed", True)
        assert f"nothing handles {FLIGHT} any more" in store.saga_history(ids[0])[-1].reason
    finally:
        store.close()


def test_sagas_check_usage_mistakes_exit_2(apps: str, tmp_path: Path) -> None:
    """A store that does not exist, or an app that cannot be imported: ``error: ...`` and exit 2."""
    runner = CliRunner()
    missing = runner.invoke(cli, ["check", "versions_apps:v1", "--store", f"sqlite:///{tmp_path}/none.db"])
    assert missing.exit_code == 2
    assert "error: no SQLite store" in missing.output
    wrong = runner.invoke(cli, ["check", "versions_apps:nothing", "--store", apps])
    assert wrong.exit_code == 2
    assert "error:" in wrong.output


def test_a_migration_at_a_deadline_sends_the_new_request_once_and_returns_it(store: Store) -> None:
    """A deadline that meets a saga of an old version migrates it into the new state, whose request is
    sent once (in the rows to publish at once) with a fresh deadline: not re-sent on top of it."""
    (saga_id,) = _live(store, TripV1, ["t1"], replies=1)
    engine = SagaEngine([TripReservingFlightSafe], store, clock=lambda: BEFORE + 3600)
    rows = engine.fire_due()
    assert [r.routing_key for r in rows] == [RESERVE_FLIGHT]
    record = store.get_saga(saga_id)
    assert record is not None
    assert (record.state, record.attempts) == ("reserving_flight", 1)
    assert record.deadline is not None
    assert record.deadline > BEFORE + 3600
