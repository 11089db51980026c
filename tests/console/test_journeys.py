"""Operator journeys through the console on real infrastructure: the postprocessing example
(examples/postprocessing.py) run by real ``sagas run`` worker processes on RabbitMQ (a virtual host of
the module's own on the machine's broker) with a PostgreSQL store (a schema of the module's own), and
the console served for real by uvicorn on the same virtual host and schema, driven in headless Chromium.

One world is built once for the module, in phases, each run by worker processes started with the
participants' fault rates it needs (``FAIL_RATE``, ``DROP_RATE``: the workers read them when they run):

- phase A (no faults): four uploads end ``done``, one of them with a script tag, quotes and HTML in its
  id and name;
- phase B (``FAIL_RATE=1``): an infected upload, whose scan and then revert keep failing, parks in
  ``failed``; two ``ocis.postprocessing.finished`` events, whose storage handler keeps failing, are
  dead-lettered after their retries;
- phase C (``DROP_RATE=1``): an upload whose scan reply is lost waits in ``scanning``; its worker stops,
  so its deadline passes and it is stuck.

The journeys then act on that world in file order (the retry journey starts a healthy worker, which
would also move the stuck saga on, so the compensation journey comes first). Each checks the store
(a connection of the test's own) and the broker (the dead-letter queue through the transport's API, and
a probe queue bound to the exchange that sees what is published), not only the page. The store-down
journey uses a console whose store is the session's private PostgreSQL cluster, which it stops and
starts; the machine's services are never stopped, restarted or disconnected.

``SAGAS_SCREENSHOTS=docs/images`` writes ``console-dead-letters.png`` where docs/console.md shows it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
import structlog

from examples.postprocessing import FINISHED, READY
from examples.postprocessing import app as postprocessing_app
from sagas import Event, EventBus, Store, open_store
from sagas.console import create_app
from sagas.operations import Operations
from sagas.testing import Harness
from tests.conftest import AMQP_URL, IN_CI, POSTGRES_URL, require
from tests.helpers import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page
    from private_services import PostgresCluster

pytestmark = [pytest.mark.browser, pytest.mark.rabbitmq, pytest.mark.postgres]

APP = "examples.postprocessing:app"
TYPE = "postprocessing"
TOKEN = "journeys-s3cret"
DONE = ["upload-0", "upload-1", "upload-2"]
XSS = "<b>bold</b><script>window.__xss=1</script>\"'&amp;"
PARKED = "upload-parked"
STUCK = "upload-stuck"
#: the keys of the sagas the world has, and the state each ends phase C in
EXPECTED = {**dict.fromkeys([*DONE, XSS], "done"), PARKED: "failed", STUCK: "scanning"}
REVERT = "ocis.storage.revert"
#: seconds a phase may take (phase B waits out five failed attempts with backoff, about 15 s per step)
PHASE_TIMEOUT = 90.0


# -- the broker: a virtual host of the module's own ----------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        message = "rabbitmqctl is not installed: the journeys make a virtual host of their own on the broker"
        if IN_CI:
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(message)
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def _vhost() -> Iterator[str]:
    """A new virtual host on the machine's RabbitMQ for the guest user; its URL. Deleted afterwards (which
    deletes its queues and exchanges, and closes only the connections to it)."""
    require(AMQP_URL, "RabbitMQ")
    name = f"sagas-journeys-{uuid.uuid4().hex[:10]}"
    user = urlsplit(AMQP_URL).username or "guest"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        u = urlsplit(AMQP_URL)
        yield urlunsplit((u.scheme, u.netloc, "/" + quote(name, safe=""), "", ""))
    finally:
        _rabbitmqctl("delete_vhost", name)


class Probe:
    """A queue of the test's own, bound to the exchange for some event types: what was published."""

    def __init__(self, url: str, exchange: str, *event_types: str) -> None:
        import amqp

        u = urlsplit(url)
        self.connection = amqp.Connection(
            f"{u.hostname}:{u.port or 5672}",
            userid=u.username or "guest",
            password=u.password or "guest",
            virtual_host=unquote(u.path[1:]) or "/",
            connect_timeout=5,
        )
        self.connection.connect()
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).queue
        for event_type in event_types:
            self.channel.queue_bind(self.queue, exchange, event_type)
        self.seen: list[dict[str, Any]] = []

    def events(self) -> list[dict[str, Any]]:
        """Every event the queue got so far (as the envelope's JSON)."""
        while (message := self.channel.basic_get(self.queue, no_ack=True)) is not None:
            self.seen.append(json.loads(message.body))
        return self.seen

    def has(self, event_type: str, upload_id: str) -> bool:
        return any(e["type"] == event_type and e["payload"].get("upload_id") == upload_id for e in self.events())

    def close(self) -> None:
        self.connection.close()


# -- the world -------------------------------------------------------------------------------------------


@dataclass
class World:
    """The example's sagas and dead letters on a virtual host and a schema, and the workers that run it."""

    amqp_url: str
    store_url: str
    exchange: str
    logs: Path
    probe: Probe | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: the ids of the two dead-lettered events: one to replay, one to drop
    letters: tuple[str, str] = ("", "")

    def store(self) -> closing[Store]:
        """A connection of the test's own to the store the console reads."""
        return closing(open_store(self.store_url, create=False))

    @contextmanager
    def bus(self) -> Iterator[EventBus]:
        bus = EventBus(self.amqp_url, exchange=self.exchange)
        try:
            yield bus
        finally:
            bus.close()

    def publish(self, *events: Event) -> None:
        with self.bus() as bus:
            bus.publish_many(events, mandatory=True)

    def states(self) -> dict[str, str]:
        with self.store() as store:
            return {r.key: r.state for r in store.list_sagas(limit=100)}

    def published(self, event_type: str, upload_id: str) -> bool:
        """Whether an event of ``event_type`` about ``upload_id`` went out on the broker (seen by the probe
        queue, bound from phase A on)."""
        assert self.probe is not None
        return self.probe.has(event_type, upload_id)

    def dead_letter_ids(self) -> list[str]:
        with self.bus() as bus:
            return [d.id for d in bus.dead_letters()]

    # -- workers

    def start_worker(self, name: str, *, fail_rate: float = 0.0, drop_rate: float = 0.0) -> None:
        """Start ``sagas run`` with the participants' fault rates; return once it consumes every queue."""
        env = {"FAIL_RATE": str(fail_rate), "DROP_RATE": str(drop_rate)}
        worker = kit.start_worker(APP, self.exchange, self.logs / name, self.store_url, url=self.amqp_url, **env)
        self.workers.append(worker)
        for queue in ("saga.postprocessing", "antivirus.scan", "policies.check", "storage.revert"):

            def consuming(q: str = f"{self.exchange}.{queue}") -> bool:
                if worker.poll() is not None:
                    log = (self.logs / name).with_suffix(".log").read_text(errors="replace")
                    raise AssertionError(f"worker {name} exited with {worker.returncode}:\n{log[-3000:]}")
                return kit.consumers(q, self.amqp_url) >= 1

            wait_for(consuming, 60, f"worker {name} consuming {queue}")

    def stop_workers(self) -> None:
        """SIGTERM the workers and wait for them to finish what they hold (kill -9 after 30 s)."""
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(30)
        self.workers.clear()

    def healthy_worker(self) -> None:
        """A worker without faults, started unless one runs (journeys that need messages handled)."""
        if not any(w.poll() is None for w in self.workers):
            self.start_worker("healthy")


def _upload(upload_id: str, name: str = "a.txt") -> Event:
    return Event("ocis.storage.bytes_received", {"upload_id": upload_id, "name": name, "size": 10, "user": "marie"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Build the world (phases A, B and C of the module's docstring); afterwards kill the workers and
    delete the schema and the virtual host."""
    require(POSTGRES_URL, "PostgreSQL")
    schema = f"t{uuid.uuid4().hex[:12]}"
    with _vhost() as amqp_url:
        w = World(amqp_url, f"{POSTGRES_URL}?schema={schema}", schema, tmp_path_factory.mktemp("journeys"))
        try:
            open_store(w.store_url).close()  # creates the schema before workers race to
            _build(w)
            yield w
        finally:
            for p in w.workers:
                p.kill()
                p.wait(30)
            if w.probe is not None:
                w.probe.close()
            kit.drop_schema(schema, POSTGRES_URL)


def _build(w: World) -> None:
    # A: no faults; four uploads end done.
    w.start_worker("a")
    w.probe = Probe(w.amqp_url, w.exchange, REVERT, READY)
    w.publish(*[_upload(k) for k in DONE], _upload(XSS, name=XSS))
    wait_for(lambda: w.states() == dict.fromkeys([*DONE, XSS], "done"), PHASE_TIMEOUT, "phase A: four uploads done")
    w.stop_workers()

    # B: every participant fails: the infected upload's scan fails (abort), then its revert (failed);
    # storage's handler of two finished events fails past its retries (dead letters).
    w.start_worker("b", fail_rate=1)
    replay, drop = (Event(FINISHED, {"upload_id": f"upload-letter-{n}", "outcome": "continue"}) for n in (1, 2))
    w.letters = (replay.id, drop.id)
    w.publish(_upload(PARKED, name="eicar.txt"), replay, drop)

    def phase_b_done() -> bool:
        return w.states().get(PARKED) == "failed" and set(w.letters) <= set(w.dead_letter_ids())

    wait_for(phase_b_done, PHASE_TIMEOUT, "phase B: the infected upload failed and two dead letters")
    w.stop_workers()

    # C: replies are lost; the worker takes the scan request and drops the reply, then stops.
    w.start_worker("c", drop_rate=1)
    w.publish(_upload(STUCK))

    def scan_taken() -> bool:
        with w.store() as store:
            stuck = store.find_saga(TYPE, STUCK)
            sent = store.outbox_backlog().unsent == 0
        return (
            stuck is not None
            and stuck.state == "scanning"
            and sent
            and kit.depth(f"{w.exchange}.antivirus.scan", w.amqp_url) == 0
        )

    wait_for(scan_taken, PHASE_TIMEOUT, "phase C: the stuck upload's scan request taken")
    w.stop_workers()
    assert w.states() == EXPECTED


# -- the console -----------------------------------------------------------------------------------------


@dataclass
class Console:
    url: str
    ops: Operations


@pytest.fixture
def console(world: World, serve: Callable[[Any], str], browser: object) -> Iterator[Console]:
    """The console over the world's store and broker, with a token, served by uvicorn."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    bus = EventBus(world.amqp_url, exchange=world.exchange)
    ops = Operations(world.store_url, sagas=postprocessing_app.sagas, bus=bus)
    try:
        yield Console(serve(create_app(ops, token=TOKEN, sagas=postprocessing_app.sagas)), ops)
    finally:
        ops.close()
        bus.close()


def _log_in(page: Page, url: str) -> None:
    page.goto(url + "/login")
    page.locator("input[name=token]").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(url + "/")


def _find(page: Page, url: str, key: str) -> None:
    """Open the saga of ``key`` from the list's key filter."""
    page.goto(url + "/sagas")
    page.locator("#filters input[name=key]").fill(key)
    page.locator("#filters button[type=submit]").click()
    page.wait_for_url("**/sagas?*key=*")
    links = page.locator("#saga-rows a[href^='/sagas/']")
    assert len(set(links.evaluate_all("links => links.map(a => a.pathname)"))) == 1
    links.first.click()
    page.wait_for_url("**/sagas/*")


def _shot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SAGAS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"console-{name}.png"), full_page=True)


# -- the journeys ----------------------------------------------------------------------------------------


def test_the_overview_counts_what_the_store_holds(world: World, console: Console, page: Page) -> None:
    """Journey 1: the overview's counts by state are the store's, and its dead letters the broker's."""
    page.goto(console.url + "/")
    shown = {}
    for row in page.locator(f"#counts-{TYPE} tr").all()[1:]:
        cells = row.locator("td").all_inner_texts()
        shown[cells[0].split()[0]] = int(cells[1])
    with world.store() as store:
        counted = {c.state: c.count for c in store.count_by_state() if c.type == TYPE}
    assert shown == counted == {"done": 4, "failed": 1, "scanning": 1}
    letters = world.dead_letter_ids()
    assert set(world.letters) <= set(letters)
    assert page.get_by_role("link", name=f"{len(letters)} dead letter(s)", exact=True).count() == 1
    grouped = sum(
        int(row.locator("td").nth(2).inner_text()) for row in page.locator("#dead-letter-groups tr").all()[1:]
    )
    assert grouped == len(letters)


def test_find_a_parked_saga_and_read_why_it_failed(world: World, console: Console, page: Page) -> None:
    """Journey 2: find the parked upload by its id from the list's key filter; its page says where and
    why it failed, as its history in the store does."""
    _find(page, console.url, PARKED)
    assert page.locator("#state").inner_text() == "failed (final)"
    failure = page.locator("#failure").inner_text()
    assert failure == "in reverting: ConnectionError: simulated transient failure"
    with world.store() as store:
        record = store.find_saga(TYPE, PARKED)
        assert record is not None
        history = store.saga_history(record.id)
    assert page.url.endswith(f"/sagas/{record.id}")
    last = history[-1]
    assert (last.from_state, last.to_state) == ("reverting", "failed")
    assert f"in {last.from_state}: {last.reason}" == failure
    assert "ConnectionError: simulated transient failure" in page.locator("#history").inner_text()


def test_without_login_nothing_can_be_done_and_data_runs_no_script(world: World, console: Console, page: Page) -> None:
    """Journey 6: without logging in there are no action buttons and a forged action is refused (403);
    logged in, an action without the CSRF token is refused too, and the store is unchanged; saga data with
    a script tag, quotes and HTML shows as text and runs nothing."""
    with world.store() as store:
        stuck = store.find_saga(TYPE, STUCK)
        assert stuck is not None
        version = stuck.version
    page.goto(f"{console.url}/sagas/{stuck.id}")
    assert page.locator("#state").inner_text() == "scanning"
    assert page.get_by_role("button").filter(has_text="Compensate").count() == 0
    assert page.locator("form[action*='/compensate'], form[action*='/retry']").count() == 0
    page.goto(console.url + "/dead-letters")
    assert page.locator("form[action*='/replay'], form[action*='/drop']").count() == 0

    forged = page.request.post(f"{console.url}/sagas/{stuck.id}/compensate", form={"actor": "mallory"})
    assert forged.status == 403
    assert "log in" in forged.text() or "CSRF" in forged.text()
    _log_in(page, console.url)
    forged = page.request.post(f"{console.url}/sagas/{stuck.id}/compensate", form={"actor": "mallory"})
    assert forged.status == 403
    assert "CSRF token is missing or wrong" in forged.text()
    letter = world.letters[0]
    forged = page.request.post(f"{console.url}/dead-letters/{letter}/drop", form={"actor": "mallory"})
    assert forged.status == 403
    with world.store() as store:
        after = store.get_saga(stuck.id)
        assert after is not None
        assert (after.state, after.version) == ("scanning", version)
        assert all(e.actor != "mallory" for e in store.saga_history(stuck.id))
    assert letter in world.dead_letter_ids()

    page.goto(console.url + "/")
    page.goto(console.url + f"/sagas?key={quote(XSS)}")
    assert XSS in page.locator("table").inner_text()
    page.locator("#saga-rows a[href^='/sagas/']").first.click()
    page.wait_for_url("**/sagas/*")
    assert page.locator("h1 code").inner_text() == XSS
    assert json.loads(page.locator("#data").inner_text())["name"] == XSS
    assert page.locator("b", has_text="bold").count() == 0
    assert page.evaluate("window.__xss") is None


def test_compensate_a_stuck_saga(world: World, console: Console, page: Page, serve: Callable[[Any], str]) -> None:
    """Journey 4: the stuck upload (its scan reply was lost, and no worker runs to re-send the request)
    is listed as stuck; compensating it moves it to reverting in the store, with who acted, and its
    revert request goes out on the broker."""
    with world.store() as store:
        stuck = store.find_saga(TYPE, STUCK)
        assert stuck is not None
        assert stuck.deadline is not None
        deadline = stuck.deadline
    wait_for(lambda: time.time() > deadline, 10, "the stuck upload's deadline to pass")
    # The console calls a saga stuck once its deadline is a minute overdue: look as of two minutes on,
    # through a read-only console whose clock is ahead (the store is the same).
    later = Operations(world.store_url, sagas=postprocessing_app.sagas, clock=lambda: time.time() + 120)
    try:
        ahead = serve(create_app(later, token=None, sagas=postprocessing_app.sagas, clock=later.clock))
        page.goto(ahead + "/sagas?stuck=1")
        listed = page.locator("#saga-rows a[href^='/sagas/']").evaluate_all("links => links.map(a => a.pathname)")
        assert set(listed) == {f"/sagas/{stuck.id}"}
        page.goto(ahead + "/")
        assert page.locator(f"a[href='/sagas/{stuck.id}']").count() == 1
    finally:
        later.close()
    assert not world.published(REVERT, STUCK)

    _log_in(page, console.url)
    page.goto(f"{console.url}/sagas/{stuck.id}")
    form = page.locator(f"form[action='/sagas/{stuck.id}/compensate']")
    form.locator("input[name=actor]").fill("paul")
    form.get_by_role("button", name="Compensate").click()
    page.wait_for_url(f"**/sagas/{stuck.id}?*")
    assert page.locator(".message").inner_text() == "compensate by paul: scanning → reverting"
    assert page.locator("#state").inner_text() == "reverting"
    assert page.locator("#waiting").inner_text().startswith(REVERT)
    with world.store() as store:
        after = store.get_saga(stuck.id)
        assert after is not None
        assert after.state == "reverting"
        assert after.data["outcome"] == "abort"
        acted = [(e.actor, e.from_state, e.to_state) for e in store.saga_history(stuck.id) if e.actor]
        assert store.outbox_backlog().unsent == 0
    assert acted == [("paul", "scanning", "reverting")]
    wait_for(lambda: world.published(REVERT, STUCK), 10, "the compensation's revert request on the broker")


def test_retry_a_parked_saga_once_the_participant_works(world: World, console: Console, page: Page) -> None:
    """Journey 3: log in with the token, retry the parked upload; a worker without faults takes the
    re-sent request and the page, reloaded, shows it done; so does the store, whose history names who
    retried. The saga compensated before ends done too."""
    with world.store() as store:
        parked = store.find_saga(TYPE, PARKED)
        assert parked is not None
        assert parked.state == "failed"
    _log_in(page, console.url)
    page.goto(f"{console.url}/sagas/{parked.id}")
    form = page.locator(f"form[action='/sagas/{parked.id}/retry']")
    form.locator("input[name=actor]").fill("marie")
    form.get_by_role("button", name="Retry").click()
    page.wait_for_url(f"**/sagas/{parked.id}?*")
    assert page.locator(".message").inner_text() == "retry by marie: failed → reverting"
    with world.store() as store:
        moved = store.get_saga(parked.id)
        assert moved is not None
        assert moved.state == "reverting"

    world.healthy_worker()

    def shown_done() -> bool:
        page.goto(f"{console.url}/sagas/{parked.id}")
        return page.locator("#state").inner_text() == "done (final)"

    wait_for(shown_done, 30, "the retried saga shown done")
    assert "marie" in page.locator("#history").inner_text()
    with world.store() as store:
        done = store.get_saga(parked.id)
        assert done is not None
        assert done.state == "done"
        acted = [(e.actor, e.from_state, e.to_state) for e in store.saga_history(parked.id) if e.actor]
    assert acted == [("marie", "failed", "reverting")]
    wait_for(lambda: world.states() == {**EXPECTED, PARKED: "done", STUCK: "done"}, 30, "every saga done")


def test_replay_one_dead_letter_and_drop_another(world: World, console: Console, page: Page, tmp_path: Path) -> None:
    """Journey 5 (and 8, the screenshot): the two dead letters are listed with their error; replaying one
    takes it off the dead-letter queue and a worker handles it again (storage says the upload is ready);
    dropping the other deletes it from the queue."""
    replay, drop = world.letters
    assert {replay, drop} <= set(world.dead_letter_ids())
    world.healthy_worker()
    _log_in(page, console.url)
    page.goto(console.url + "/dead-letters")
    for letter in (replay, drop):
        section = page.locator("section.letter", has=page.locator(f"h2 code:text-is('{letter}')"))
        assert "ConnectionError: simulated transient failure" in section.inner_text()
        assert f"{world.exchange}.storage.finish_upload" in section.inner_text()
    _shot(page, "dead-letters", tmp_path)

    section = page.locator("section.letter", has=page.locator(f"h2 code:text-is('{replay}')"))
    section.locator("form[action$='/replay'] input[name=actor]").fill("marie")
    section.get_by_role("button", name="Replay").click()
    page.wait_for_url("**/dead-letters?*")
    assert page.locator(".message").inner_text() == f"replayed {replay} (by marie)"
    assert replay not in world.dead_letter_ids()
    wait_for(lambda: world.published(READY, "upload-letter-1"), 30, "the replayed event handled again")

    section = page.locator("section.letter", has=page.locator(f"h2 code:text-is('{drop}')"))
    section.get_by_role("button", name="Drop").click()
    page.wait_for_url("**/dead-letters?*")
    assert page.locator(".message").inner_text() == f"dropped {drop} (by console)"
    assert page.locator(f"h2 code:text-is('{drop}')").count() == 0
    remaining = world.dead_letter_ids()
    assert replay not in remaining
    assert drop not in remaining
    assert not world.published(READY, "upload-letter-2")


# -- the store goes down ---------------------------------------------------------------------------------


def test_the_store_goes_down_and_comes_back(
    private_postgres: PostgresCluster, serve: Callable[[Any], str], page: Page
) -> None:
    """Journey 7: a console whose store is the private PostgreSQL cluster: while the cluster is stopped
    its pages are a clear 503 "store unavailable" page, not a traceback; started again, the same page
    works without restarting the console."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    schema = f"t{uuid.uuid4().hex[:12]}"
    store_url = f"{private_postgres.url}?schema={schema}"
    h = Harness(postprocessing_app, store=store_url)
    try:
        upload = _upload("upload-down")
        h.publish(upload.type, upload.payload)
        h.settle()
    finally:
        h.close()
    ops = Operations(store_url, sagas=postprocessing_app.sagas)
    try:
        url = serve(create_app(ops, token=TOKEN, sagas=postprocessing_app.sagas))
        store = open_store(store_url, create=False)
        try:
            record = store.find_saga(TYPE, "upload-down")
        finally:
            store.close()
        assert record is not None
        assert record.state == "done"
        saga_page = f"{url}/sagas/{record.id}"
        assert page.goto(saga_page).status == 200  # type: ignore[union-attr]
        assert page.locator("#state").inner_text() == "done (final)"

        private_postgres.stop()
        try:
            for path in (saga_page, url + "/", url + "/sagas"):
                response = page.goto(path)
                assert response is not None
                assert response.status == 503, path
                assert page.locator("h1").inner_text() == "Store or broker unavailable"
                assert page.locator("#error").inner_text().startswith("the console cannot read its data now")
                assert "Traceback" not in page.content()
            api = page.request.get(url + "/api/overview")
            assert api.status == 503
            assert "error" in api.json()
        finally:
            private_postgres.start()
        kit.await_postgres(private_postgres.url, 60)

        def page_works() -> bool:
            response = page.goto(saga_page)
            return response is not None and response.status == 200

        wait_for(page_works, 30, "the console to read the store again")
        assert page.locator("#state").inner_text() == "done (final)"
    finally:
        ops.close()
        kit.drop_schema(schema, private_postgres.url)
