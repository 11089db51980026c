"""Retention: the settings and their floors, pruning per table and per store, the elected pruner,
the worker's pruning thread and ``sagas prune``."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from sagas import App, ConfigurationError, Retention, Service, Start, State, Worker
from sagas._cli import cli
from sagas._retention import LEASE, STEPS, Pruner, check_retention, resend_span
from sagas._saga import Final, Saga
from sagas._store import (
    SCHEMA_VERSION,
    HistoryEntry,
    MemoryStore,
    Outgoing,
    PrunableStore,
    PruneCutoffs,
    SagaRecord,
    SQLiteStore,
    Store,
    open_store,
)

DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.fixture
def store(any_store: Store) -> Store:
    """A store of each backend, whose inbox, reply-cache and outbox timestamps follow ``clock`` (NOW)."""
    clock = [NOW]
    any_store.clock = lambda: clock[0]  # type: ignore[attr-defined]
    any_store.test_clock = clock  # type: ignore[attr-defined]
    return any_store


def at(store: Store, when: float) -> None:
    store.test_clock[0] = when  # type: ignore[attr-defined]


def saga(store: Store, key: str, *, state: str, final: bool, updated: float, **kw: object) -> SagaRecord:
    """Save a saga of type ``trip`` created and last changed at ``updated``, with two history entries."""
    r = SagaRecord(f"id-{key}", str(kw.pop("type", "trip")), key, "start", {}, created_at=updated, updated_at=updated)
    outbox = [Outgoing(f"m-{key}", "a.b", "{}", True)]
    store.save_saga(
        r,
        expected_version=None,
        history=HistoryEntry(updated, f"s-{key}", "", "start", "started"),
        inbox=None,
        outbox=outbox,
    )
    r.version, r.state, r.final = 1, state, final
    r.deadline = kw.pop("deadline", None)  # type: ignore[assignment]
    store.save_saga(
        r, expected_version=0, history=HistoryEntry(updated, f"e-{key}", "start", state, "moved"), inbox=None, outbox=[]
    )
    return r


def cutoffs(**kw: float) -> PruneCutoffs:
    base = {"finished": NOW - 30 * DAY, "inbox": NOW - 7 * DAY, "outbox_sent": NOW - DAY, "replies": NOW - 7 * DAY}
    return PruneCutoffs(**{**base, **kw})  # type: ignore[arg-type]


def prune_all(store: Store, c: PruneCutoffs, batch: int = 2) -> dict[str, int]:
    assert isinstance(store, PrunableStore)
    total: dict[str, int] = {}
    for table in STEPS:
        while True:
            done = store.prune(table, c, batch)
            for t, n in done.items():
                total[t] = total.get(t, 0) + n
            if done.get(table, 0) < batch:
                break
    return total


# -- the settings ------------------------------------------------------------------------------------


def test_defaults_are_the_documented_windows() -> None:
    """Ended sagas 30 days, inbox 7, sent outbox rows 1, cached replies 7; a timedelta is taken too."""
    r = Retention()
    assert (r.finished, r.inbox, r.outbox_sent, r.replies) == (30 * DAY, 7 * DAY, DAY, 7 * DAY)
    assert Retention(outbox_sent=timedelta(hours=2)).outbox_sent == 7200.0


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "7d", None])
def test_a_window_that_is_not_a_positive_time_is_refused(value: object) -> None:
    """Zero, negative, infinite, NaN or non-numbers: a ConfigurationError that names the setting."""
    with pytest.raises(ConfigurationError, match="retention outbox_sent="):
        Retention(outbox_sent=value)  # type: ignore[arg-type]


def test_replies_shorter_than_the_inbox_window_is_refused() -> None:
    """A request redelivered within the horizon must find its cached reply."""
    with pytest.raises(ConfigurationError, match=r"replies= .* shorter than inbox="):
        Retention(inbox=7 * DAY, replies=DAY)


def test_ended_sagas_kept_less_than_two_horizons_is_refused() -> None:
    """An ended saga dedupes its start and undoes late successes for two redelivery horizons."""
    with pytest.raises(ConfigurationError, match=r"finished= .* shorter than twice inbox="):
        Retention(finished=10 * DAY, inbox=7 * DAY)
    assert Retention(finished=14 * DAY, inbox=7 * DAY).finished == 14 * DAY


class Slow(Saga):
    type = "slow"
    start = Start("test.slow.started", key="k", to="waiting")
    states = [
        State("waiting", sends="test.slow.work", timeout=3600, retries=5, backoff=2.0, on_reply="done"),
        Final("done"),
    ]


def test_replies_shorter_than_a_sagas_resend_span_is_refused() -> None:
    """A re-sent request must still find its cached reply: the span of the saga's re-sends is a floor."""
    span = resend_span(Slow.definition())
    waits = sum(3600 * 2**n for n in range(6))
    assert span == pytest.approx(1.1 * waits + waits)
    with pytest.raises(ConfigurationError, match="saga 'slow' re-sends a request"):
        App(sagas=[Slow], retention=Retention(finished=30 * DAY, inbox=DAY, replies=span - 1))
    assert App(sagas=[Slow], retention=Retention(finished=30 * DAY, inbox=DAY, replies=span)).retention.replies == span


class Kept(Saga):
    type = "kept"
    start = Start("test.kept.started", key="k", to="done")
    states = [Final("done")]
    keep_finished = timedelta(days=90)


def test_a_saga_type_overrides_its_ended_sagas_window_within_the_floor() -> None:
    """``keep_finished`` on a saga type overrides ``finished``; below two inbox windows it is refused."""
    assert App(sagas=[Kept]).keep_finished == {"kept": 90 * DAY}

    class Short(Kept):
        keep_finished = DAY  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match=r"Short.keep_finished"):
        check_retention(Retention(), [Short])
    with pytest.raises(ConfigurationError, match=r"retention= takes a sagas.Retention"):
        App(sagas=[Kept], retention={"finished": 1})  # type: ignore[arg-type]


# -- pruning, per table and per store ----------------------------------------------------------------


def test_inbox_records_past_the_window_go_oldest_first_in_batches(store: Store) -> None:
    """Only records handled before the cutoff go, at most ``limit`` per batch, the oldest first."""
    assert isinstance(store, PrunableStore)
    for i, age in enumerate([10, 9, 8, 1]):
        at(store, NOW - age * DAY)
        store.remember("svc.h", f"m-{i}")
    at(store, NOW)
    assert store.prune_counts(cutoffs())["inbox"] == 3
    assert store.prune("inbox", cutoffs(), 2) == {"inbox": 2}
    assert not store.seen("svc.h", "m-0")
    assert not store.seen("svc.h", "m-1")
    assert store.seen("svc.h", "m-2")
    assert store.prune("inbox", cutoffs(), 2) == {"inbox": 1}
    assert store.prune("inbox", cutoffs(), 2) == {"inbox": 0}
    assert store.seen("svc.h", "m-3")


def test_cached_replies_past_the_window_go(store: Store) -> None:
    """A reply cached before the cutoff goes; a newer one stays."""
    assert isinstance(store, PrunableStore)
    at(store, NOW - 8 * DAY)
    store.cache_reply("svc.h", "r-old", "{}")
    at(store, NOW - 6 * DAY)
    store.cache_reply("svc.h", "r-new", '{"x": 1}')
    assert store.prune_counts(cutoffs())["reply_cache"] == 1
    assert prune_all(store, cutoffs()) == {
        "sagas": 0,
        "saga_history": 0,
        "outbox": 0,
        "inbox": 0,
        "reply_cache": 1,
        "claims": 0,
    }
    assert store.cached_reply("svc.h", "r-old") is None
    assert store.cached_reply("svc.h", "r-new") == '{"x": 1}'


def test_claims_that_expired_more_than_the_inbox_window_ago_go_and_no_other(store: Store) -> None:
    """The pruner removes a claim that expired more than ``inbox`` ago (the redelivery horizon), oldest
    first in batches; a live claim, and one that expired more recently (its owner may still renew it,
    or a worker's clock may still see it live), stay. ``prune_counts`` counts them for --dry-run."""
    assert isinstance(store, PrunableStore)
    c = Retention().cutoffs(NOW)
    assert c.claims == NOW - 7 * DAY
    for key, until in [("old-1", NOW - 9 * DAY), ("old-2", NOW - 8 * DAY), ("recent", NOW - DAY), ("live", NOW + 30)]:
        assert store.claim("svc.h", key, "w-gone", until, until - 30)
    assert store.prune_counts(c)["claims"] == 2
    assert store.prune("claims", c, 1) == {"claims": 1}
    assert not store.claimed("old-1", NOW - 9 * DAY - 10)  # the oldest went first
    assert store.claimed("old-2", NOW - 8 * DAY - 10)
    assert prune_all(store, c)["claims"] == 1
    assert not store.claimed("old-2", NOW - 8 * DAY - 10)
    assert store.claimed("recent", NOW - DAY - 10)  # the row is still there
    assert store.claimed("live", NOW)
    assert store.prune_counts(c)["claims"] == 0
    # the owner of the recent one renews it: it is its own again, and live
    store.renew_claims("w-gone", NOW + 30)
    assert store.claimed("recent", NOW)
    assert not store.claim("svc.h", "recent", "w-other", NOW + 60, NOW)


def test_sent_outbox_rows_past_the_window_go_and_unsent_rows_never(store: Store) -> None:
    """Sent rows confirmed before the cutoff go, also of live sagas; unsent rows stay, however old."""
    assert isinstance(store, PrunableStore)
    live = saga(store, "live", state="waiting", final=False, updated=NOW - 40 * DAY)
    live.version = 2
    rows = store.save_saga(
        live,
        expected_version=1,
        history=HistoryEntry(NOW - 40 * DAY, "x", "waiting", "waiting", "re-sent"),
        inbox=None,
        outbox=[Outgoing("m-unsent", "a.b", "{}", True)],
    )
    sent = [o.row.id for o in store.outbox_rows(live.id) if o.row.message_id == "m-live"]
    at(store, NOW - 2 * DAY)
    store.mark_sent(sent)
    assert store.prune_counts(cutoffs())["outbox"] == 1
    assert prune_all(store, cutoffs())["outbox"] == 1
    assert [o.row.message_id for o in store.outbox_rows(live.id)] == ["m-unsent"]
    assert [r.id for r in store.unsent(NOW)] == [rows[0].id]
    assert store.get_saga(live.id) is not None
    assert len(store.saga_history(live.id)) == 3


def test_ended_sagas_past_the_window_go_with_their_history_and_outbox(store: Store) -> None:
    """An ended saga older than the window goes, with its history and sent outbox rows; what still
    matters stays: a live saga, a saga parked in failed, one with a late compensation in flight
    (a deadline), one with an unsent outbox row, and one inside the window."""
    assert isinstance(store, PrunableStore)
    old = NOW - 31 * DAY
    gone = saga(store, "done", state="completed", final=True, updated=old)
    store.mark_sent([o.row.id for o in store.outbox_rows(gone.id)])
    live = saga(store, "live", state="waiting", final=False, updated=old)
    failed = saga(store, "failed", state="failed", final=True, updated=old)
    late = saga(store, "late", state="compensated", final=True, updated=old, deadline=NOW + 60)
    unsent = saga(store, "unsent", state="completed", final=True, updated=old)
    recent = saga(store, "recent", state="completed", final=True, updated=NOW - 29 * DAY)
    for r in (live, failed, late, recent):
        store.mark_sent([o.row.id for o in store.outbox_rows(r.id)])
    at(store, NOW - 0.5 * DAY)  # (sent recently: only the ended saga's rows go with it)
    counts = store.prune_counts(cutoffs())
    expected = {"sagas": 1, "saga_history": 2, "outbox": 1, "inbox": 0, "reply_cache": 0, "claims": 0}
    assert counts == expected
    assert prune_all(store, cutoffs()) == expected
    assert store.get_saga(gone.id) is None
    assert store.find_saga("trip", "done") is None
    assert store.saga_history(gone.id) == []
    assert store.outbox_rows(gone.id) == []
    for r in (live, failed, late, unsent, recent):
        assert store.get_saga(r.id) is not None, r.key
        assert len(store.saga_history(r.id)) == 2
    assert store.prune_counts(cutoffs()) == {
        "sagas": 0,
        "saga_history": 0,
        "outbox": 0,
        "inbox": 0,
        "reply_cache": 0,
        "claims": 0,
    }


def test_a_saga_types_own_window_overrides_the_default(store: Store) -> None:
    """With ``finished_by_type``, ended sagas of that type are kept by their own cutoff; the others by the default."""
    assert isinstance(store, PrunableStore)
    for key, saga_type in (("a", "trip"), ("b", "kept")):
        r = saga(store, key, state="completed", final=True, updated=NOW - 40 * DAY, type=saga_type)
        store.mark_sent([o.row.id for o in store.outbox_rows(r.id)])
    c = cutoffs(finished_by_type={"kept": NOW - 90 * DAY})  # type: ignore[arg-type]
    assert store.prune_counts(c)["sagas"] == 1
    assert prune_all(store, c)["sagas"] == 1
    assert store.find_saga("trip", "a") is None
    assert store.find_saga("kept", "b") is not None
    c = cutoffs(finished=NOW - 90 * DAY, finished_by_type={"kept": NOW - 30 * DAY})  # type: ignore[arg-type]
    assert prune_all(store, c)["sagas"] == 1
    assert store.find_saga("kept", "b") is None


def test_pruning_an_unknown_table_is_a_configuration_error(store: Store) -> None:
    """A typo names the tables that can be pruned."""
    assert isinstance(store, PrunableStore)
    with pytest.raises(ConfigurationError, match="prune sagas, outbox, inbox, reply_cache or claims"):
        store.prune("sagaz", cutoffs(), 10)


def test_a_version_6_store_gets_the_retention_indexes_when_it_opens(tmp_path: Path) -> None:
    """Schema 7 adds the indexes a prune batch reads; a version 6 store gets them, and its rows stay."""
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path))
    store.remember("svc.h", "m-1")
    store.close()
    db = sqlite3.connect(path)  # as version 6 left it
    db.executescript(
        "DROP INDEX inbox_by_handled; DROP INDEX reply_cache_by_cached; DROP INDEX outbox_by_sent;"
        " DROP INDEX sagas_ended_by_updated; DELETE FROM schema_version; INSERT INTO schema_version VALUES (6);"
    )
    db.close()
    store = SQLiteStore(str(path))
    assert store.seen("svc.h", "m-1")
    store.close()
    db = sqlite3.connect(path)
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"inbox_by_handled", "reply_cache_by_cached", "outbox_by_sent", "sagas_ended_by_updated"} <= names
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    plan = " ".join(
        str(r)
        for r in db.execute("EXPLAIN QUERY PLAN SELECT 1 FROM inbox WHERE handled_at < 1 ORDER BY handled_at LIMIT 5")
    )
    assert "inbox_by_handled" in plan
    db.close()


# -- the elected pruner ------------------------------------------------------------------------------


def test_one_pruner_per_store_holds_the_lease(store: Store) -> None:
    """Two workers' pruners: one is elected (an advisory lock on PostgreSQL, a claim elsewhere) and
    prunes; the other does nothing until the lease lapses (or the holder's connection closes)."""
    now = [NOW]
    url_or_store: str | Store = store
    if not isinstance(store, MemoryStore):
        url_or_store = store.url if hasattr(store, "url") else f"sqlite:///{store.path}"  # type: ignore[attr-defined]
    a = Pruner(url_or_store, Retention(), instance="a", interval=10, clock=lambda: now[0])
    b = Pruner(url_or_store, Retention(), instance="b", interval=10, clock=lambda: now[0])
    try:
        assert a.run_once() is not None
        assert b.run_once() is None
        assert not b.pruning
        assert a.elect() is True  # renewed by its holder
        a.stop()  # a stops: its connection closes (PostgreSQL), or its lease lapses
        now[0] += 100
        assert b.elect() is True
        if not isinstance(store, MemoryStore) and not hasattr(store, "url"):
            assert store.claimed(LEASE[1], now[0]) is True  # the lease is a row of the claims table
    finally:
        a.stop()
        b.stop()


def test_a_prune_logs_its_counts(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """``retention.pruned`` at info, with the rows deleted per table."""
    at(store, NOW - 8 * DAY)
    store.remember("svc.h", "m-1")
    with pytest.MonkeyPatch.context() as m:
        records: list[tuple[str, dict[str, object]]] = []
        import sagas._retention as retention_module

        m.setattr(retention_module.log, "info", lambda event, **kw: records.append((event, kw)))
        counts = Pruner(store, Retention(), instance="a", clock=lambda: NOW, pause=0).prune_once()
    assert counts["inbox"] == 1
    assert records[0][0] == "retention.pruned"
    assert records[0][1]["inbox"] == 1
    assert records[0][1]["sagas"] == 0


svc = Service("pruned")


@svc.on("test.pruned.happened", idempotent=True)
def happened(event: object) -> None:
    pass


def test_a_worker_prunes_in_the_background(tmp_path: Path) -> None:
    """A running worker's pruner thread deletes rows past their window from its store (SQLite, its own
    connection); with ``prune=False`` it does not."""
    url = f"sqlite:///{tmp_path}/w.db"
    store = open_store(url)
    store.clock = lambda: time.time() - 8 * DAY  # type: ignore[attr-defined]
    store.remember("svc.h", "old")
    store.close()
    app = App(svc)
    idle = Worker(app, store=url, prune=False, prune_interval=0.05)
    with idle.running():
        assert idle.pruner is None
    check = open_store(url)
    assert check.seen("svc.h", "old")
    worker = Worker(app, store=url, prune_interval=0.05)
    with worker.running():
        deadline = time.monotonic() + 10
        while check.seen("svc.h", "old") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.pruner is not None
        assert worker.pruner.pruning
    assert not check.seen("svc.h", "old")
    check.close()


# -- sagas prune ---------------------------------------------------------------------------------------


def test_sagas_prune_dry_run_counts_and_deletes_nothing_then_prunes(tmp_path: Path) -> None:
    """``--dry-run`` prints per table what would go and deletes nothing; without it, the rows go."""
    url = f"sqlite:///{tmp_path}/c.db"
    store = open_store(url)
    store.clock = lambda: time.time() - 8 * DAY  # type: ignore[attr-defined]
    for i in range(3):
        store.remember("svc.h", f"m-{i}")
    store.cache_reply("svc.h", "r-1", "{}")
    store.close()
    runner = CliRunner()
    dry = runner.invoke(cli, ["prune", "tests.sagas.test_retention:retained", "--store", url, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "inbox         3" in dry.output
    assert "reply_cache   1" in dry.output
    assert "would delete" in dry.output
    check = open_store(url)
    assert check.seen("svc.h", "m-0")
    done = runner.invoke(cli, ["prune", "tests.sagas.test_retention:retained", "--store", url])
    assert done.exit_code == 0, done.output
    assert "deleted" in done.output
    assert "inbox         3" in done.output
    assert not check.seen("svc.h", "m-0")
    assert check.cached_reply("svc.h", "r-1") is None
    check.close()


retained = App(svc)


def test_sagas_prune_mistakes_exit_2(tmp_path: Path) -> None:
    """A store that does not exist, or an app that is not one: ``error: ...`` on stderr, exit 2."""
    runner = CliRunner()
    missing = runner.invoke(
        cli, ["prune", "tests.sagas.test_retention:retained", "--store", f"sqlite:///{tmp_path}/no.db"]
    )
    assert missing.exit_code == 2
    assert "error: no SQLite store" in missing.output
    wrong = runner.invoke(cli, ["prune", "tests.sagas.test_retention:svc_none", "--store", "memory://"])
    assert wrong.exit_code == 2
    assert "error:" in wrong.output
    assert "Traceback" not in wrong.output


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[str]:
    """The URL of a fresh SQLite or PostgreSQL store (a schema of its own, dropped after the test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/lease.db"
        open_store(url).close()
        yield url
        return
    base = request.getfixturevalue("postgres_url")
    url = f"{base}?schema={unique}"
    open_store(url).close()
    try:
        yield url
    finally:
        import psycopg

        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')


def test_sagas_prune_takes_the_pruner_lease_and_exits_3_while_another_holds_it(store_url: str) -> None:
    """``sagas prune`` takes the pruner lease a worker's pruner takes (an advisory lock on PostgreSQL, a
    claim on SQLite). While another pruner holds it, it deletes nothing, says so, and exits 3, at once
    or after ``--wait``; once the holder gives it up, it prunes, and gives it up in turn (a worker's
    pruner takes it at once, not when it lapses)."""
    store = open_store(store_url)
    store.clock = lambda: time.time() - 8 * DAY  # type: ignore[attr-defined]
    store.remember("svc.h", "old")
    store.close()
    holder = Pruner(store_url, Retention(), instance="worker-a")
    runner = CliRunner()
    args = ["prune", "tests.sagas.test_retention:retained", "--store", store_url]
    check = open_store(store_url)
    try:
        assert holder.elect()
        busy = runner.invoke(cli, args)
        assert busy.exit_code == 3, busy.output
        assert "another pruner holds the store's pruner lease" in busy.output
        assert "Traceback" not in busy.output
        started = time.monotonic()
        waited = runner.invoke(cli, [*args, "--wait", "0.3"])
        assert waited.exit_code == 3, waited.output
        assert time.monotonic() - started >= 0.3
        assert "lease (a worker's, or another `sagas prune`) after waiting 0.3 s" in waited.output
        assert "or pass a longer --wait)" in waited.output
        assert check.seen("svc.h", "old")
        dry = runner.invoke(cli, [*args, "--dry-run"])  # takes no lease
        assert dry.exit_code == 0, dry.output
        assert "inbox         1" in dry.output
        holder.stop()  # gives the lease up
        done = runner.invoke(cli, args)
        assert done.exit_code == 0, done.output
        assert not check.seen("svc.h", "old")
        worker = Pruner(store_url, Retention(), instance="worker-b")
        try:
            assert worker.elect(), "sagas prune kept the lease after it finished"
        finally:
            worker.stop()
    finally:
        holder.stop()
        check.close()


def test_sagas_prune_wait_takes_the_lease_when_the_holder_gives_it_up(store_url: str) -> None:
    """With ``--wait``, ``sagas prune`` waits for a pruner that gives the lease up, then prunes."""
    store = open_store(store_url)
    store.clock = lambda: time.time() - 8 * DAY  # type: ignore[attr-defined]
    store.remember("svc.h", "old")
    store.close()
    holder = Pruner(store_url, Retention(), instance="worker-a")
    assert holder.elect()
    release = threading.Timer(0.3, holder.stop)
    release.start()
    try:
        done = CliRunner().invoke(
            cli, ["prune", "tests.sagas.test_retention:retained", "--store", store_url, "--wait", "60"]
        )
    finally:
        release.join()
        holder.stop()
    assert done.exit_code == 0, done.output
    assert "inbox         1" in done.output
    check = open_store(store_url)
    assert not check.seen("svc.h", "old")
    check.close()


def test_a_long_prune_renews_its_lease_and_stops_when_it_lost_it(tmp_path: Path) -> None:
    """An elected pruner renews its lease between batches (every third of its interval), so that a prune
    longer than the lease is not joined by a second pruner; one that finds the lease taken stops."""
    url = f"sqlite:///{tmp_path}/long.db"
    store = open_store(url)
    store.clock = lambda: NOW - 8 * DAY  # type: ignore[attr-defined]
    for i in range(6):
        store.remember("svc.h", f"m-{i}")
    store.close()
    now = [NOW]
    a = Pruner(url, Retention(), instance="a", interval=1e-6, batch=2, pause=0, clock=lambda: now[0])
    b = Pruner(url, Retention(), instance="b", interval=1e-6, batch=2, pause=0, clock=lambda: now[0])
    try:
        assert a.elect()
        until = NOW + a.lease_seconds
        now[0] = until + 1  # a's lease lapsed (a long prune) and b took it
        assert b.elect()
        assert a.prune_once()["inbox"] == 0  # a finds the lease taken at its renewal, and stops
        assert not a.pruning
        assert b.prune_once()["inbox"] == 6
    finally:
        a.stop()
        b.stop()
