"""The web console (sagas.console): pages, escaping, static files, 404s, and actions guarded by the
token and CSRF, on the harness's store and bus through Starlette's TestClient."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from starlette.testclient import TestClient

from examples.postprocessing import Postprocessing
from examples.postprocessing import app as postprocessing_app
from examples.share import Share
from examples.share import app as share_app
from sagas import App, Event, Reject, Service, StoreError
from sagas.console import create_app
from sagas.console._overview import OverviewCache
from sagas.operations import Operations
from sagas.testing import Drop, Harness
from tests.helpers import wait_for

MakeHarness = Callable[..., Harness]
TOKEN = "s3cret-token"
EVIL = "<script>alert(1)</script>\"'"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    return


def _upload(h: Harness, upload_id: str, name: str = "a.txt") -> None:
    h.publish("ocis.storage.bytes_received", {"upload_id": upload_id, "name": name, "size": 10, "user": "marie"})


def _client(h: Harness, token: str | None = TOKEN, **options: Any) -> TestClient:
    ops = Operations(h.store, sagas=h.app.sagas, bus=h.client_bus(), clock=h.clock)
    return TestClient(create_app(ops, token=token, sagas=h.app.sagas, clock=h.clock, **options))


def _stuck(h: Harness, upload_id: str = "u1", name: str = "a.txt") -> str:
    """A postprocessing saga waiting in scanning: its scan request was lost."""
    h.inject(Drop(), match="ocis.antivirus.scan")
    _upload(h, upload_id, name)
    h.run()
    return h.saga(Postprocessing, upload_id).id


def _rows(html: str) -> int:
    """How many saga rows a page lists (links to a saga's page)."""
    return len(re.findall(r'href="/sagas/[0-9a-f]{32}"', html))


def _csrf(client: TestClient, path: str = "/login") -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get(path).text)
    assert match is not None
    return match.group(1)


def _login(client: TestClient) -> str:
    csrf = _csrf(client)
    response = client.post("/login", data={"csrf": csrf, "token": TOKEN}, follow_redirects=False)
    assert response.status_code == 303
    return csrf


def test_overview_shows_counts_stuck_sagas_outbox_and_time(saga_harness: MakeHarness) -> None:
    """The overview counts sagas by type and state, lists stuck ones, the outbox and the data's time."""
    h = saga_harness(postprocessing_app)
    _upload(h, "done-1")
    h.settle()
    saga_id = _stuck(h, "stuck-1")
    h.clock.advance(3600)
    page = _client(h).get("/")
    assert page.status_code == 200
    assert 'id="counts-postprocessing"' in page.text
    assert ">done<" in page.text
    assert ">scanning<" in page.text
    assert saga_id in page.text
    assert "message(s) not yet confirmed" in page.text
    assert 'id="data-time"' in page.text
    assert 'id="auto-refresh"' in page.text
    assert 'src="/static/console.js"' in page.text
    assert "http" not in page.text.split("<body")[0].lower()


def test_saga_list_filters_orders_and_pages(saga_harness: MakeHarness) -> None:
    """The list filters by type, state, key and stuck, orders newest first, and pages."""
    h = saga_harness(postprocessing_app)
    for i in range(3):
        _upload(h, f"u{i}")
        h.run()
        h.clock.advance(1)
    h.settle()
    client = _client(h)
    assert _rows(client.get("/sagas?key=u1").text) == 1
    page = client.get("/sagas?limit=2&order=newest")
    assert page.text.index("u2") < page.text.index("u1")
    assert "u0" not in page.text
    assert 'rel="next"' in page.text
    assert "u0" in client.get("/sagas?limit=2&order=newest&offset=2").text
    assert "none" in client.get("/sagas?state=scanning").text
    assert "none" in client.get("/sagas?stuck=1").text
    assert client.get("/sagas?limit=abc").status_code == 400


def test_saga_list_follows_cursors_and_filters_by_key_prefix_failed_and_time(saga_harness: MakeHarness) -> None:
    """Following the "next" links (cursors) in both orders shows every saga once; the key prefix, failed
    and time filters narrow the list; a cursor that was not given out is a 400 page."""
    h = saga_harness(postprocessing_app)
    for i in range(7):
        _upload(h, f"up-{i}")
    _upload(h, "other-1")
    h.settle()
    client = _client(h)
    for order in ("oldest", "newest"):
        seen: list[str] = []
        url: str | None = f"/sagas?limit=3&order={order}"
        while url:
            text = client.get(url).text
            seen += re.findall(r'href="/sagas/([0-9a-f]{32})"', text)
            found = re.search(r'href="(/sagas\?[^"]*cursor=[^"]+)" rel="next"', text)
            url = found.group(1).replace("&amp;", "&") if found else None
        assert len(seen) == len(set(seen)) == 8, (order, seen)
    assert _rows(client.get("/sagas?key_prefix=up-").text) == 7
    assert _rows(client.get("/sagas?key_prefix=other").text) == 1
    assert _rows(client.get("/sagas?failed=1").text) == 0
    assert _rows(client.get("/sagas?since=2000-01-01T00:00:00Z&until=2001-01-01").text) == 0
    assert _rows(client.get("/sagas?since=2000-01-01T00:00:00Z").text) == 8
    assert client.get("/sagas?cursor=not-a-cursor").status_code == 400
    assert client.get("/sagas?since=yesterday").status_code == 400
    api = client.get("/api/sagas?limit=5").json()
    assert len(api["items"]) == 5
    rest = client.get("/api/sagas", params={"limit": 5, "cursor": api["next_cursor"]}).json()
    assert len(rest["items"]) == 3
    assert rest["next_cursor"] is None
    assert {r["id"] for r in api["items"]}.isdisjoint(r["id"] for r in rest["items"])


def test_saga_page_by_id_and_by_type_and_key(saga_harness: MakeHarness) -> None:
    """The saga page shows data, history, the pending request and deadline, and the diagram."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h)
    page = client.get(f"/sagas/{saga_id}")
    assert page.status_code == 200
    assert "ocis.antivirus.scan" in page.text.split('id="waiting"')[1].split("</td>")[0]
    assert "Z" in page.text.split('id="deadline"')[1].split("</td>")[0]
    assert "&#34;upload_id&#34;: &#34;u1&#34;" in page.text
    assert "→ scanning</td>" in page.text
    assert 'class="state visited current" aria-current="true"' in page.text
    assert client.get("/saga?type=postprocessing&key=u1").text == page.text


def test_saga_data_is_escaped(saga_harness: MakeHarness) -> None:
    """Saga data holding a script tag and quotes shows as text, in the list and on the saga page."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h, upload_id=EVIL, name=EVIL)
    client = _client(h)
    for path in (f"/sagas/{saga_id}", "/sagas"):
        text = client.get(path).text
        assert "<script>alert" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%252e%252e/etc/passwd",
        "/static/....//....//etc/passwd",
        "/static//etc/passwd",
    ],
)
def test_static_route_refuses_path_traversal(saga_harness: MakeHarness, path: str) -> None:
    """No path outside the package's static folder is served."""
    client = _client(saga_harness(postprocessing_app))
    response = client.get(path)
    assert "root:" not in response.text
    assert response.status_code in {400, 404}
    assert client.get("/static/console.css").status_code == 200


@pytest.mark.parametrize(
    "path", ["/sagas/0123456789abcdef0123456789abcdef", "/sagas/%3Cscript%3E", "/saga?type=postprocessing&key=nope"]
)
def test_unknown_or_malformed_ids_give_a_404_page(saga_harness: MakeHarness, path: str) -> None:
    """An id or key that is not there, or not an id at all, gives a 404 page, not a traceback."""
    response = _client(saga_harness(postprocessing_app)).get(path)
    assert response.status_code == 404
    assert "Not found" in response.text
    assert "Traceback" not in response.text
    assert "<script>" not in response.text


def test_a_store_that_is_down_gives_a_503_page(saga_harness: MakeHarness) -> None:
    """When the store fails to answer, pages say so with a 503."""
    h = saga_harness(postprocessing_app, store="sqlite:///:memory:")
    client = _client(h)
    h.store.close()
    response = client.get("/")
    assert response.status_code == 503
    assert "Store or broker unavailable" in response.text
    assert client.get("/api/sagas").status_code == 503


def test_read_only_console_has_no_buttons(saga_harness: MakeHarness) -> None:
    """Without a token there are no action buttons or bulk links (every action answers 403: see below)."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h, token=None)
    page = client.get(f"/sagas/{saga_id}")
    assert "Retry</button>" not in page.text
    assert "read-only" in page.text
    assert "Retry all matching" not in client.get("/sagas").text


def test_login_needs_the_token_and_the_csrf_token(saga_harness: MakeHarness) -> None:
    """Logging in with a wrong token or without the CSRF token answers 403; then the buttons show."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h)
    csrf = _csrf(client)
    assert client.post("/login", data={"csrf": csrf, "token": "wrong"}).status_code == 403
    assert client.post("/login", data={"token": TOKEN}).status_code == 403  # no CSRF token
    assert "Retry</button>" not in client.get(f"/sagas/{saga_id}").text
    _login(client)
    assert "Retry</button>" in client.get(f"/sagas/{saga_id}").text


#: Every form action: (path, with {saga} or {letter} for the target, extra form fields).
FORM_POSTS = [
    ("/sagas/{saga}/retry", {}),
    ("/sagas/{saga}/compensate", {}),
    ("/sagas/bulk/retry", {"type": "postprocessing", "expected": "1"}),
    ("/sagas/bulk/compensate", {"type": "postprocessing", "expected": "1"}),
    ("/dead-letters/{letter}/replay", {}),
    ("/dead-letters/{letter}/drop", {}),
    ("/dead-letters/bulk/replay", {"expected": "2"}),
    ("/dead-letters/bulk/drop", {"expected": "2"}),
]
#: Every API action: (path, JSON body).
API_POSTS = [
    ("/api/sagas/{saga}/retry", {}),
    ("/api/sagas/{saga}/compensate", {}),
    ("/api/sagas/bulk/retry", {"filter": {"type": "postprocessing"}, "expected_count": 1}),
    ("/api/sagas/bulk/compensate", {"filter": {"type": "postprocessing"}, "expected_count": 1}),
    ("/api/dead-letters/{letter}/replay", {}),
    ("/api/dead-letters/{letter}/drop", {}),
    ("/api/dead-letters/bulk/replay", {"expected_count": 2}),
    ("/api/dead-letters/bulk/drop", {"expected_count": 2}),
]


def _target(saga_harness: MakeHarness, path: str) -> tuple[Harness, str, Callable[[], object]]:
    """A harness with a target for ``path`` (a stuck saga, or two dead letters), the path filled in, and
    a snapshot of what an action would change (to compare before and after)."""
    if "{saga}" in path or path.startswith(("/sagas", "/api/sagas")):
        h = saga_harness(postprocessing_app)
        saga_id = _stuck(h)
        return h, path.format(saga=saga_id), lambda: (h.store.get_saga(saga_id), h.history(saga_id))
    h, events, _ = _dead_harness(saga_harness)
    bus = h.client_bus()
    return h, path.format(letter=events[0].id), lambda: sorted(d.id for d in bus.dead_letters())


@pytest.mark.parametrize("case", ["read-only", "not logged in", "no csrf", "wrong csrf", "other browser's csrf"])
@pytest.mark.parametrize(("path", "fields"), FORM_POSTS)
def test_every_form_action_needs_the_login_and_the_csrf_token(
    saga_harness: MakeHarness, path: str, fields: dict[str, str], case: str
) -> None:
    """A form action on a read-only console, without the login, or with a missing, wrong or another
    browser's CSRF token answers 403 (a page, not a traceback) and changes nothing."""
    h, url, snapshot = _target(saga_harness, path)
    before = snapshot()
    client = _client(h, token=None if case == "read-only" else TOKEN)
    csrf = "0" * 64 if case == "read-only" else _csrf(client)  # (a read-only console has no login form)
    if case not in ("read-only", "not logged in"):
        csrf = _login(client)
    data = dict(fields)
    if case == "wrong csrf":
        data["csrf"] = "0" * 64
    elif case == "other browser's csrf":
        data["csrf"] = _csrf(TestClient(client.app))
    elif case != "no csrf":
        data["csrf"] = csrf
    response = client.post(url, data=data)
    assert response.status_code == 403
    assert 'id="error"' in response.text
    assert "Traceback" not in response.text
    assert snapshot() == before


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", "read-only"])
@pytest.mark.parametrize(("path", "body"), API_POSTS)
def test_every_api_action_needs_the_bearer_token(
    saga_harness: MakeHarness, path: str, body: dict[str, Any], auth: str | None
) -> None:
    """An API action without the bearer token, with a wrong one, or on a read-only console answers 403
    as JSON and changes nothing."""
    h, url, snapshot = _target(saga_harness, path)
    before = snapshot()
    client = _client(h, token=None if auth == "read-only" else TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}" if auth == "read-only" else auth} if auth else {}
    response = client.post(url, json=body, headers=headers)
    assert response.status_code == 403
    assert "error" in response.json()
    assert snapshot() == before


def test_retry_and_compensate_from_the_page_record_who_acted(saga_harness: MakeHarness) -> None:
    """With the login and the CSRF token, retry works and the history names the actor; a refusal shows why."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h)
    csrf = _login(client)
    response = client.post(f"/sagas/{saga_id}/retry", data={"csrf": csrf, "actor": "marie"})
    assert response.status_code == 200
    assert "retry by marie: scanning → scanning" in response.text
    h.run()
    assert h.saga(Postprocessing, "u1").state == "done"
    assert [e.actor for e in h.history(saga_id) if e.reason == "operator: retry"] == ["marie"]
    refused = client.post(f"/sagas/{saga_id}/compensate", data={"csrf": csrf})
    assert refused.status_code == 409
    assert 'id="error"' in refused.text


def test_compensate_from_the_page_records_the_default_actor(saga_harness: MakeHarness) -> None:
    """Compensating a waiting step saga from its page undoes its steps; with no name, the actor is console."""
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant", times=100)
    h.publish(
        "ocis.sharing.share_requested",
        {"share_id": "s1", "owner": "einstein", "grantee": "marie", "path": "/p", "size": 1},
    )
    h.run()
    saga_id = h.saga(Share, "s1").id
    client = _client(h)
    csrf = _login(client)
    response = client.post(f"/sagas/{saga_id}/compensate", data={"csrf": csrf, "actor": "  "})
    assert response.status_code == 200
    assert "compensate by console: grant" in response.text
    h.settle()
    assert h.saga(Share, "s1").state == "compensated"
    assert [e.actor for e in h.history(saga_id) if e.reason.startswith("operator: compensate")] == ["console"]


def test_the_message_after_an_action_cannot_be_forged(saga_harness: MakeHarness) -> None:
    """A link cannot make a page show a message of its choosing."""
    text = _client(saga_harness(postprocessing_app)).get("/sagas?message=call+555&sig=00").text
    assert "call 555" not in text


def _dead_harness(saga_harness: MakeHarness) -> tuple[Harness, list[Event], list[bool]]:
    accept = [False]
    svc = Service("picky")

    @svc.on("ocis.files.uploaded")
    def take(event: Event) -> None:
        if not accept[0]:
            raise Reject(f"not today {EVIL}")

    h = saga_harness(App(svc))
    events = [h.publish("ocis.files.uploaded", {"path": f"/{i}", "note": EVIL}) for i in range(2)]
    h.run()
    return h, events, accept


def test_dead_letters_page_replays_and_drops(saga_harness: MakeHarness) -> None:
    """The dead letters page lists letters (escaped) and replays one and drops another."""
    h, events, accept = _dead_harness(saga_harness)
    client = _client(h)
    page = client.get("/dead-letters")
    assert all(e.id in page.text for e in events)
    assert "<script>alert" not in page.text
    assert "not today &lt;script&gt;" in page.text
    csrf = _login(client)
    accept[0] = True
    assert client.post(f"/dead-letters/{events[0].id}/replay", data={"csrf": csrf}).status_code == 200
    assert client.post(f"/dead-letters/{events[1].id}/drop", data={"csrf": "bad"}).status_code == 403
    assert client.post(f"/dead-letters/{events[1].id}/drop", data={"csrf": csrf}).status_code == 200
    assert client.post(f"/dead-letters/{events[1].id}/drop", data={"csrf": csrf}).status_code == 404
    assert client.get("/api/dead-letters").json() == {"items": []}


def test_json_api_reads(saga_harness: MakeHarness) -> None:
    """The JSON API gives the overview, a page of sagas, one saga and the dead letters."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    h.clock.advance(3600)  # (its deadline long past, and no worker ran)
    client = _client(h)
    overview = client.get("/api/overview").json()
    assert overview["counts"] == [{"type": "postprocessing", "state": "scanning", "final": False, "count": 1}]
    assert overview["outbox"]["unsent"] == 0
    assert [s["id"] for s in overview["stuck"]] == [saga_id]
    listing = client.get("/api/sagas?type=postprocessing").json()
    assert [s["id"] for s in listing["items"]] == [saga_id]
    assert listing["next_offset"] is None
    one = client.get(f"/api/sagas/{saga_id}").json()
    assert one["waiting_for"]["type"] == "ocis.antivirus.scan"
    assert one["history"][0]["to_state"] == "scanning"
    assert client.get("/api/saga?type=postprocessing&key=u1").json()["id"] == saga_id
    assert client.get("/api/sagas/nope").json() == {"error": "no saga 'nope'"}
    assert client.get("/api/dead-letters").json() == {"items": []}


def test_json_api_acts_with_the_bearer_token(saga_harness: MakeHarness) -> None:
    """API actions need the bearer token (no CSRF token) and record the actor given in the body."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h)
    url = f"/api/sagas/{saga_id}/retry"
    assert client.post(url).status_code == 403
    assert client.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
    response = client.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"actor": "ops-bot"})
    assert response.status_code == 200
    assert response.json()["published"][0]["type"] == "ocis.antivirus.scan"
    h.run()
    assert [e.actor for e in h.history(saga_id) if e.actor] == ["ops-bot"]
    h2, events, accept = _dead_harness(saga_harness)
    api = _client(h2)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert api.post(f"/api/dead-letters/{events[0].id}/drop", headers=auth).json()["dropped"] == [events[0].id]
    accept[0] = True
    assert api.post(f"/api/dead-letters/{events[1].id}/replay", headers=auth).json()["replayed"] == [events[1].id]


# -- the worker thread, the overview, the list's columns, the saga's outbox --------------------------


def test_operations_run_on_one_worker_thread_that_stops_with_the_app(saga_harness: MakeHarness) -> None:
    """Every store read of the console runs on one thread of its own (not the event loop's), and that
    thread stops when the app shuts down."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    threads: set[threading.Thread] = set()
    store = h.store
    for name in ("get_saga", "list_sagas", "count_by_state", "last_reasons", "outbox_rows", "saga_history"):
        real = getattr(store, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            threads.add(threading.current_thread())
            return _real(*args, **kwargs)

        setattr(store, name, spy)
    app = _client(h).app
    with TestClient(app) as client:  # (runs the lifespan: startup, then shutdown at the end)
        loop_thread = client.portal.call(threading.current_thread)  # type: ignore[union-attr]
        for path in ("/", "/sagas", f"/sagas/{saga_id}", "/api/overview", "/api/sagas", f"/api/sagas/{saga_id}"):
            assert client.get(path).status_code == 200, path
    assert len(threads) == 1, threads
    (worker,) = threads
    assert worker.name.startswith("sagas-console-ops")
    assert worker is not loop_thread
    assert not worker.is_alive()


def test_overview_shows_failures_dead_letters_deadlines_and_is_cached(
    saga_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overview groups failed sagas by type and reason with links, lists stuck sagas with how long
    overdue, dead letters by queue and error type with a link to them, the deadlines of the next minute
    and the data's time; it is read again only after its time to live."""
    h = saga_harness(postprocessing_app)
    monkeypatch.setenv("FAIL_RATE", "1")
    _upload(h, "bad-1", name="eicar.txt")  # infected: reverting, where storage keeps failing
    _upload(h, "bad-2", name="eicar2.txt")
    h.settle()
    monkeypatch.setenv("FAIL_RATE", "0")
    failed = [r for r in h.store.list_sagas(failed=True)]
    assert len(failed) == 2
    stuck_id = _stuck(h, "stuck-1")
    h.clock.advance(600)
    client = _client(h, overview_ttl=5.0)
    data = client.get("/api/overview").json()
    assert data["as_of"] == h.clock()
    (group,) = data["failures"]
    assert (group["type"], group["count"], group["failed_from"]) == ("postprocessing", 2, "reverting")
    assert [s["id"] for s in data["stuck"]] == [stuck_id]
    assert data["stuck"][0]["overdue"] > 500
    page = client.get("/").text
    assert f'href="/sagas/{group["example_id"]}"' in page
    assert 'href="/sagas?type=postprocessing&amp;failed=1"' in page
    assert "overdue 9m" in page
    assert 'id="deadlines"' in page
    # cached: a new saga shows only once the overview is older than its time to live, and then after
    # a read in the background (the page that finds it due still gets the old one, without waiting)
    _upload(h, "new-1")
    h.run()
    assert client.get("/api/overview").json() == data
    h.clock.advance(5)
    assert client.get("/api/overview").json() == data
    fresh = wait_for(
        lambda: (o := client.get("/api/overview").json())["as_of"] == h.clock() and o, what="the background read"
    )
    assert sum(c["count"] for c in fresh["counts"]) == sum(c["count"] for c in data["counts"]) + 1


def test_overview_cache_reads_less_often_when_reading_costs_more() -> None:
    """The overview is served for its time to live, or ten times what its read took if longer; a
    failed read is kept for the next page, and a clock that went back makes it due."""
    now = [1000.0]
    cost = [0.1]

    def read() -> Any:
        if cost[0] < 0:
            raise StoreError("the store is down")
        now[0] += cost[0]
        return SimpleNamespace(as_of=now[0])

    cache = OverviewCache(read, ttl=2.0, clock=lambda: now[0])
    assert cache.due()
    cache.refresh()
    assert cache.cost == pytest.approx(0.1)
    assert cache.lifetime == 2.0
    now[0] += 1.9
    assert not cache.due()
    now[0] += 0.2
    assert cache.due()
    cost[0] = 3.0  # a slow store: read at most every 30 s
    cache.refresh()
    assert cache.lifetime == pytest.approx(30.0)
    now[0] += 29
    assert not cache.due()
    now[0] += 30
    assert cache.due()
    assert not cache.stale()  # shown while a newer one is read
    now[0] += 40
    assert cache.stale()  # older than three lifetimes: read before it is shown
    now[0] -= 60  # the clock went back
    assert cache.due()
    kept = cache.last
    cost[0] = -1
    cache.refresh_quietly()
    assert cache.failure == "the store is down"
    assert cache.last is kept
    cost[0] = 0.1
    cache.refresh()
    assert cache.failure is None


def test_overview_after_a_failed_background_read_shows_the_error_then_recovers(saga_harness: MakeHarness) -> None:
    """When the background read fails (the store is down), the next page does not show the old
    overview as if all were well: it reads itself and shows the 503 page; once the store answers, the
    overview is back."""
    h = saga_harness(postprocessing_app)
    _upload(h, "u1")
    h.settle()
    client = _client(h, overview_ttl=1.0)
    assert client.get("/").status_code == 200
    real = h.store.count_by_state
    down = [True]

    def count_by_state() -> Any:
        if down[0]:
            raise StoreError("connection refused")
        return real()

    h.store.count_by_state = count_by_state  # type: ignore[method-assign]
    h.clock.advance(2)
    assert client.get("/").status_code == 200  # (the old overview; the read in the background fails)
    page = wait_for(lambda: (r := client.get("/")).status_code == 503 and r, what="the error page")
    assert "connection refused" in page.text
    down[0] = False
    assert client.get("/").status_code == 200


def test_overview_groups_dead_letters_with_a_link_to_them(saga_harness: MakeHarness) -> None:
    """Dead letters show by queue and error type, escaped, each group linking to the filtered page."""
    h, _, _ = _dead_harness(saga_harness)
    letter = h.client_bus().dead_letters()[0]
    page = _client(h).get("/").text
    assert "<script>alert" not in page
    assert f'href="/dead-letters?queue={letter.queue}&amp;error_type=sagas.Reject"' in page
    assert "not today &lt;script&gt;" in page


def test_saga_list_shows_the_next_deadline_and_the_last_reason(saga_harness: MakeHarness) -> None:
    """The list shows each saga's next deadline relative to now and its latest history reason, escaped;
    the API items carry the last reason too."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h, upload_id="w1", name=EVIL)
    record = h.store.get_saga(saga_id)
    assert record is not None
    assert record.deadline is not None
    last = h.history(saga_id)[-1].reason
    client = _client(h)
    text = client.get("/sagas").text
    assert f"in {int(record.deadline - h.clock())}s" in text
    assert last.split()[0] in text
    h.clock.advance(record.deadline - h.clock() + 180)
    assert "overdue 3m" in client.get("/sagas").text
    items = client.get("/api/sagas").json()["items"]
    assert [(i["id"], i["last_reason"]) for i in items] == [(saga_id, last)]
    # an operator's action with a hostile name shows, escaped, as the last reason's actor
    csrf = _login(client)
    client.post(f"/sagas/{saga_id}/retry", data={"csrf": csrf, "actor": EVIL})
    text = client.get("/sagas").text
    assert "operator: retry" in text
    assert "<script>alert" not in text
    assert client.get("/api/sagas").json()["items"][0]["last_reason"] == "operator: retry"


def test_saga_page_lists_its_outbox_rows_escaped(saga_harness: MakeHarness) -> None:
    """A saga's page lists the messages it committed: message id, routing key, sent or pending, and a
    short, escaped preview of the body; the API gives them too."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h, name=EVIL)
    rows = h.store.outbox_rows(saga_id)
    assert rows
    client = _client(h)
    text = client.get(f"/sagas/{saga_id}").text
    section = text.split('id="outbox"')[1].split("</table>")[0]
    assert rows[0].row.message_id in section
    assert "ocis.antivirus.scan" in section
    assert ("pending" in section) == any(o.sent_at is None for o in rows)
    assert "&lt;script&gt;" in section
    assert "<script>alert" not in text
    api = client.get(f"/api/sagas/{saga_id}").json()["outbox"]
    assert [o["message_id"] for o in api] == [o.row.message_id for o in rows]
    assert json.loads(api[0]["body"])["payload"]["name"] == EVIL


def test_the_signing_secret_comes_from_the_token(saga_harness: MakeHarness) -> None:
    """A restarted console with the same token accepts the login cookie and the CSRF token of open
    forms; one with another token does not."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    first = _client(h)
    csrf = _login(first)
    again = _client(h)
    again.cookies = first.cookies
    response = again.post(f"/sagas/{saga_id}/retry", data={"csrf": csrf, "actor": "marie"})
    assert response.status_code == 200
    assert [e.actor for e in h.history(saga_id) if e.actor] == ["marie"]
    other = _client(h, token="another-token")
    other.cookies = first.cookies
    assert other.post(f"/sagas/{saga_id}/retry", data={"csrf": csrf}).status_code == 403
    assert [e.actor for e in h.history(saga_id) if e.actor] == ["marie"]


# -- bulk actions --------------------------------------------------------------------------------------


def _stuck_many(h: Harness, n: int, prefix: str = "s") -> list[str]:
    """``n`` postprocessing sagas waiting in scanning (their scan requests lost)."""
    h.inject(Drop(), match="ocis.antivirus.scan", times=n)
    for i in range(n):
        _upload(h, f"{prefix}{i}")
    h.run()
    return [h.saga(Postprocessing, f"{prefix}{i}").id for i in range(n)]


def _field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match is not None, name
    return match.group(1)


def test_bulk_retry_confirms_the_count_then_acts_and_records_who(saga_harness: MakeHarness) -> None:
    """Retry all matching: the confirmation counts the matching sagas and lists them; a confirmation
    whose count no longer holds is shown again with the new count, and nothing is done; the confirmed one
    retries each saga (history: who), lists the refused ones grouped by why, and links them."""
    h = saga_harness(postprocessing_app)
    _upload(h, "done-1")
    h.settle()
    done_id = h.saga(Postprocessing, "done-1").id
    ids = _stuck_many(h, 2)
    client = _client(h)
    csrf = _login(client)
    listing = client.get("/sagas?type=postprocessing&key_prefix=").text
    assert 'href="/sagas/bulk/retry?type=postprocessing"' in listing
    confirm = client.get("/sagas/bulk/retry?type=postprocessing")
    assert confirm.status_code == 200
    assert "This will retry <strong>3</strong> sagas (type postprocessing)" in confirm.text
    assert all(i in confirm.text for i in [*ids, done_id])
    assert _field(confirm.text, "expected") == "3"
    assert _field(confirm.text, "type") == "postprocessing"
    form = {"csrf": csrf, "type": "postprocessing", "expected": "3", "actor": "marie"}
    ids += _stuck_many(h, 1, prefix="late")  # one more matches now
    again = client.post("/sagas/bulk/retry", data=form)
    assert again.status_code == 409
    assert "4 sagas match this filter, not the 3 confirmed" in again.text
    assert _field(again.text, "expected") == "4"
    assert all(e.actor == "" for i in ids for e in h.history(i))
    result = client.post("/sagas/bulk/retry", data={**form, "expected": "4"})
    assert result.status_code == 200
    assert '<strong id="done">3</strong> done, <strong id="refused">1</strong> refused' in result.text
    assert "the saga has ended in done" in result.text
    assert f'href="/sagas/{done_id}"' in result.text
    for saga_id in ids:
        assert [e.actor for e in h.history(saga_id) if e.reason == "operator: retry"] == ["marie"]
    assert all(e.actor == "" for e in h.history(done_id))
    h.run()
    assert all(h.store.get_saga(i).state == "done" for i in ids)  # type: ignore[union-attr]


def test_bulk_compensate_by_state_and_over_the_cap_refuses(saga_harness: MakeHarness) -> None:
    """More sagas than the cap: the confirmation says to narrow the filter, has no Confirm button, and a
    POST acts on none; under the cap, compensate all matching acts on each."""
    h = saga_harness(share_app)
    h.inject(Drop(), match="ocis.sharing.grant", times=100)
    for i in range(3):
        h.publish(
            "ocis.sharing.share_requested",
            {"share_id": f"s{i}", "owner": "einstein", "grantee": "marie", "path": "/p", "size": 1},
        )
    h.run()
    ids = [h.saga(Share, f"s{i}").id for i in range(3)]
    client = _client(h, bulk_cap=2)
    csrf = _login(client)
    page = client.get("/sagas/bulk/compensate?type=share")
    assert page.status_code == 409
    assert "more than 2 sagas match; narrow the filter" in page.text
    assert 'id="confirm"' not in page.text
    refused = client.post("/sagas/bulk/compensate", data={"csrf": csrf, "type": "share", "expected": "2"})
    assert refused.status_code == 409
    assert all(e.actor == "" for i in ids for e in h.history(i))
    narrow = client.get(f"/sagas/bulk/compensate?type=share&key={'s1'}")
    assert "This will compensate <strong>1</strong> sagas (type share, key s1)" in narrow.text
    done = client.post("/sagas/bulk/compensate", data={"csrf": csrf, "type": "share", "key": "s1", "expected": "1"})
    assert done.status_code == 200
    h.run()
    assert h.saga(Share, "s1").state == "compensated"
    assert [e.actor for e in h.history(ids[1]) if e.reason.startswith("operator: compensate")] == ["console"]
    assert all(e.actor == "" for i in (ids[0], ids[2]) for e in h.history(i))


def test_bulk_pages_refuse_a_wrong_call_with_a_clear_page(saga_harness: MakeHarness) -> None:
    """An unknown bulk action is a 404 page, a missing or bad count or time a 400 page: never a traceback."""
    h = saga_harness(postprocessing_app)
    _stuck_many(h, 1)
    client = _client(h)
    csrf = _login(client)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        (client.get("/sagas/bulk/delete"), 404),
        (client.post("/sagas/bulk/delete", data={"csrf": csrf, "expected": "1"}), 404),
        (client.post("/sagas/bulk/retry", data={"csrf": csrf}), 400),
        (client.post("/sagas/bulk/retry", data={"csrf": csrf, "expected": "many"}), 400),
        (client.get("/sagas/bulk/retry?since=yesterday"), 400),
        (client.post("/api/sagas/bulk/retry", headers=auth, json={"filter": []}), 400),
        (client.post("/api/sagas/bulk/retry", headers=auth, content=b"{nope"), 400),
        (client.post("/api/sagas/bulk/retry", headers=auth, json={"filter": {}}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert "Traceback" not in response.text


def test_bulk_over_the_json_api_needs_the_expected_count(saga_harness: MakeHarness) -> None:
    """GET /api/sagas/bulk/ACTION counts; POST acts only with that expected_count (409 with the new
    count otherwise) and records the actor of the body."""
    h = saga_harness(postprocessing_app)
    ids = _stuck_many(h, 2)
    client = _client(h)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    counted = client.get("/api/sagas/bulk/retry?state=scanning").json()
    assert (counted["count"], counted["over_cap"], sorted(counted["ids"])) == (2, False, sorted(ids))
    body = {"filter": {"state": "scanning"}, "expected_count": 3, "actor": "ops-bot"}
    changed = client.post("/api/sagas/bulk/retry", headers=auth, json=body)
    assert changed.status_code == 409
    assert changed.json()["count"] == 2
    assert all(e.actor == "" for i in ids for e in h.history(i))
    done = client.post("/api/sagas/bulk/retry", headers=auth, json={**body, "expected_count": 2})
    assert done.status_code == 200
    assert sorted(done.json()["done"]) == sorted(ids)
    assert done.json()["refused"] == {}
    for saga_id in ids:
        assert [e.actor for e in h.history(saga_id) if e.actor] == ["ops-bot"]


def test_dead_letters_filter_show_payloads_escaped_and_bulk_replay_and_drop(saga_harness: MakeHarness) -> None:
    """The dead letters page filters by queue and error type and shows each letter's event type, error,
    traceback and payload (pretty JSON, escaped); replay all of the queue and drop all matching ask to
    confirm the count and then act; the API does the same with expected_count."""
    h, events, accept = _dead_harness(saga_harness)
    bus = h.client_bus()
    queue = bus.dead_letters()[0].queue
    client = _client(h)
    page = client.get(f"/dead-letters?queue={queue}&error_type=sagas.Reject").text
    assert all(e.id in page for e in events)
    assert "&#34;path&#34;: &#34;/0&#34;" in page  # the payload, indented JSON, escaped
    assert "&#34;note&#34;: &#34;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    assert "<details><summary>traceback</summary>" in page
    assert "sagas.Reject" in page
    assert events[0].id not in client.get("/dead-letters?error_type=builtins.ValueError").text
    csrf = _login(client)
    confirm = client.get(f"/dead-letters/bulk/replay?queue={queue}")
    assert "This will replay <strong>2</strong> dead letters (queue " in confirm.text
    accept[0] = True
    refused = client.post("/dead-letters/bulk/replay", data={"csrf": csrf, "queue": queue, "expected": "1"})
    assert refused.status_code == 409
    assert len(bus.dead_letters()) == 2
    done = client.post("/dead-letters/bulk/replay", data={"csrf": csrf, "queue": queue, "expected": "2"})
    assert done.status_code == 200
    assert '<strong id="done">2</strong> done' in done.text
    assert bus.dead_letters() == []
    h2, events2, _ = _dead_harness(saga_harness)
    api = _client(h2)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert api.get("/api/dead-letters/bulk/drop?error_type=sagas.Reject").json()["count"] == 2
    assert api.get("/api/dead-letters?error_type=nope").json() == {"items": []}
    body = {"filter": {"error_type": "sagas.Reject"}, "expected_count": 2}
    dropped = api.post("/api/dead-letters/bulk/drop", headers=auth, json=body).json()
    assert sorted(dropped["done"]) == sorted(e.id for e in events2)
    assert h2.client_bus().dead_letters() == []


def test_saga_page_offers_compensate_only_where_the_type_defines_it(saga_harness: MakeHarness) -> None:
    """Compensate shows on a saga whose state has a compensation (scanning: storage reverts the upload),
    not on one whose state has none (finishing, waiting for storage's upload_ready), where the
    operator API would refuse it; Retry shows on both."""
    h = saga_harness(postprocessing_app)
    scanning = _stuck(h, "u-scan")
    h.inject(Drop(), match="ocis.storage.upload_ready")
    _upload(h, "u-finish")
    h.run()
    finishing = h.saga(Postprocessing, "u-finish")
    assert finishing.state == "finishing"
    client = _client(h)
    _login(client)
    scan_page = client.get(f"/sagas/{scanning}").text
    finish_page = client.get(f"/sagas/{finishing.id}").text
    assert f'action="/sagas/{scanning}/compensate"' in scan_page
    assert f'action="/sagas/{finishing.id}/compensate"' not in finish_page
    assert f'action="/sagas/{finishing.id}/retry"' in finish_page


def test_a_zero_in_a_filter_is_a_value(saga_harness: MakeHarness) -> None:
    """``since=0`` (the epoch) is kept in the bulk links and the API's filter, not dropped as unset."""
    h = saga_harness(postprocessing_app)
    _stuck(h)
    client = _client(h)
    assert "since=0" in client.get("/sagas?since=0").text
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    before_epoch = client.post(
        "/api/sagas/bulk/retry", json={"filter": {"until": 0}, "expected_count": 0}, headers=bearer
    )
    assert before_epoch.status_code == 200, before_epoch.text
    since_epoch = client.post(
        "/api/sagas/bulk/retry", json={"filter": {"since": 0}, "expected_count": 0}, headers=bearer
    )
    assert since_epoch.status_code == 409, since_epoch.text


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("limit=0", "limit must be from 1 to 500"),
        ("limit=-5", "limit must be from 1 to 500"),
        ("offset=-1", "offset must be from 0"),
        ("order=sideways", "order must be oldest or newest"),
        ("stuck=maybe", "stuck must be 1 or 0"),
        ("type=nope", "the app has no saga type 'nope'"),
        ("type=postprocessing&state=bogus", "saga type postprocessing has no state 'bogus'"),
        ("state=bogus", "no saga type of the app has a state 'bogus'"),
        ("stat=failed", "unknown parameter 'stat'"),
    ],
)
def test_a_list_filter_that_cannot_be_right_is_a_400_not_an_answer(
    saga_harness: MakeHarness, query: str, says: str
) -> None:
    """A misspelt parameter, a type or state the app does not have, or a value out of range is refused
    with what to give instead, on the page and the API: an empty or clamped list would look like an
    answer."""
    h = saga_harness(postprocessing_app)
    _stuck(h)
    client = _client(h)
    api = client.get(f"/api/sagas?{query}")
    assert api.status_code == 400, api.text
    assert says in api.json()["error"]
    page = client.get(f"/sagas?{query}")
    assert page.status_code == 400
    assert "Traceback" not in page.text


def test_a_misspelt_bulk_filter_is_refused_not_read_as_every_saga(saga_harness: MakeHarness) -> None:
    """A bulk action's filter with a field it does not know is a 400 (a typo for ``state`` must not
    compensate every saga), on the count and on the action; nothing moves."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    client = _client(h)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    count = client.get("/api/sagas/bulk/compensate?stat=scanning")
    assert count.status_code == 400
    assert "unknown parameter 'stat'" in count.json()["error"]
    act = client.post(
        "/api/sagas/bulk/compensate", json={"filter": {"stat": "scanning"}, "expected_count": 1}, headers=bearer
    )
    assert act.status_code == 400
    assert "unknown filter field 'stat'" in act.json()["error"]
    record = h.store.get_saga(saga_id)
    assert record is not None
    assert record.state == "scanning"
    assert [e.actor for e in h.store.saga_history(saga_id) if e.actor] == []


def test_overview_warns_of_passed_deadlines_before_they_count_as_stuck(saga_harness: MakeHarness) -> None:
    """A deadline that passed and was not fired (no worker runs) shows on the overview at once, with
    what it means, though the saga is not yet stuck (60 s); the saga's page says how long overdue."""
    h = saga_harness(postprocessing_app)
    saga_id = _stuck(h)
    record = h.store.get_saga(saga_id)
    assert record is not None
    assert record.deadline is not None
    client = _client(h, overview_ttl=0.0)
    calm = client.get("/").text
    assert "0 deadline(s) passed and not fired yet." in calm
    h.clock.advance(record.deadline - h.clock() + 7)  # 7 s overdue; no worker fires it in this test
    page = wait_for(lambda: "1 deadline(s) passed" in (t := client.get("/").text) and t, what="the count")
    assert 'id="deadlines-passed" class="warning"' in page
    assert "no worker of the app is running" in page
    assert client.get("/api/overview").json()["deadlines_passed"] == 1
    assert "(overdue 7s)" in client.get(f"/sagas/{saga_id}").text


def test_a_wrong_token_shows_the_login_form_again(saga_harness: MakeHarness) -> None:
    """A wrong token is refused (403) on the login page itself, with the form to try again."""
    h = saga_harness(postprocessing_app)
    client = _client(h)
    csrf = _csrf(client)
    wrong = client.post("/login", data={"csrf": csrf, "token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 403
    assert "wrong token: try again" in wrong.text
    assert 'action="/login"' in wrong.text
    assert "sagas_console_auth" not in wrong.headers.get("set-cookie", "")
