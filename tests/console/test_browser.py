"""The console in a real browser (headless Chromium, Playwright), used as an operator would, on a SQLite
store that the postprocessing example filled. Each journey checks the store as well as the page.

The journeys take screenshots; ``SAGAS_SCREENSHOTS=docs/images`` writes them where docs/console.md
shows them (``console-overview.png``, ``console-sagas.png``, ``console-saga.png``); by default they go
to the test's temporary folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog

from examples.postprocessing import Postprocessing
from examples.postprocessing import app as postprocessing_app
from sagas import Store, open_store
from sagas.console import create_app
from sagas.console._format import iso
from sagas.operations import Operations
from sagas.testing import Drop, Harness

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

TOKEN = "browser-s3cret"
PARKED = "upload-parked"
XSS = "<script>window.__xss=1</script>\"'"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


@dataclass
class Console:
    """The console under test: its URL, the harness that runs the example, and the store's file."""

    url: str
    harness: Harness
    store_url: str

    def store(self) -> closing[Store]:
        """A connection of the test's own to the store the console reads (what is on disk)."""
        return closing(open_store(self.store_url, create=False))


def _upload(h: Harness, upload_id: str, name: str = "a.txt") -> None:
    h.publish("ocis.storage.bytes_received", {"upload_id": upload_id, "name": name, "size": 10, "user": "marie"})


@pytest.fixture
def console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[[Any], str], browser: object
) -> Iterator[Console]:
    """The postprocessing example run on a SQLite file: three uploads done, one parked in ``failed``
    (its storage kept failing, ``FAIL_RATE=1``), one stuck in scanning (its scan request was lost), one
    whose data holds a script tag; and the console, with a token, serving that file for real."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    store_url = f"sqlite:///{tmp_path / 'sagas.db'}"
    h = Harness(postprocessing_app, store=store_url)
    monkeypatch.setenv("FAIL_RATE", "0")
    monkeypatch.setenv("DROP_RATE", "0")
    for i in range(3):
        _upload(h, f"upload-{i}")
    _upload(h, XSS, name=XSS)
    h.settle()
    monkeypatch.setenv("FAIL_RATE", "1")
    _upload(h, PARKED, name="eicar.txt")  # infected: reverting, where storage keeps failing
    h.settle()
    monkeypatch.setenv("FAIL_RATE", "0")
    h.inject(Drop(), match="ocis.antivirus.scan", times=100)
    _upload(h, "upload-stuck")
    h.run()
    h.clock.advance(3)
    ops = Operations(store_url, sagas=postprocessing_app.sagas, bus=h.client_bus(), clock=h.clock)
    url = serve(create_app(ops, token=TOKEN, sagas=postprocessing_app.sagas, clock=h.clock))
    try:
        yield Console(url, h, store_url)
    finally:
        ops.close()
        h.close()


def _shot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SAGAS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"console-{name}.png"))


def test_the_overview_shows_the_counts_and_the_time_of_the_data(console: Console, page: Page, tmp_path: Path) -> None:
    """The overview counts the sagas of each state as the store does, and says when its data is from."""
    page.goto(console.url + "/")
    assert page.title()
    shown = {}
    for row in page.locator("#counts-postprocessing tr").all()[1:]:
        cells = row.locator("td").all_inner_texts()
        shown[cells[0].split()[0]] = int(cells[1])
    with console.store() as store:
        counted = {c.state: c.count for c in store.count_by_state() if c.type == "postprocessing"}
    assert shown == counted == {"done": 4, "failed": 1, "scanning": 1}
    assert page.locator("#data-time").inner_text() == iso(console.harness.clock())
    _shot(page, "overview", tmp_path)


def test_find_a_parked_saga_read_why_log_in_and_retry_it(console: Console, page: Page, tmp_path: Path) -> None:
    """Find the parked upload by its id from the list's filter, read why it failed on its page, log in
    with the token, retry it: the page and the store show it moved, and its history names who acted."""
    page.goto(console.url + "/sagas")
    page.locator("#filters input[name=key]").fill(PARKED)
    page.locator("#filters button[type=submit]").click()
    page.wait_for_url("**/sagas?*key=upload-parked*")
    links = page.locator("#saga-rows a[href^='/sagas/']")
    assert links.count() == 1
    _shot(page, "sagas", tmp_path)
    links.first.click()
    assert page.locator("#state").inner_text() == "failed (final)"
    failure = page.locator("#failure").inner_text()
    assert failure == "in reverting: ConnectionError: simulated transient failure"
    with console.store() as store:
        record = store.find_saga("postprocessing", PARKED)
        assert record is not None
        assert record.state == "failed"
        assert f"in {record.meta['failed_from']}: {record.meta['reason']}" == failure
    saga_url = page.url
    assert page.get_by_role("button", name="Retry").count() == 0  # not logged in yet
    _shot(page, "saga", tmp_path)

    page.get_by_role("link", name="Log in to act").click()
    page.locator("input[name=token]").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.goto(saga_url)
    retry = page.locator(f"form[action='/sagas/{record.id}/retry']")
    retry.locator("input[name=actor]").fill("marie")
    retry.get_by_role("button", name="Retry").click()
    assert page.locator(".message").inner_text() == "retry by marie: failed → reverting"
    assert page.locator("#state").inner_text() == "reverting"
    with console.store() as store:
        moved = store.get_saga(record.id)
        assert moved is not None
        assert moved.state == "reverting"
        acted = [(e.actor, e.from_state, e.to_state) for e in store.saga_history(record.id) if e.actor]
    assert acted == [("marie", "failed", "reverting")]

    console.harness.settle()  # the workers take the re-sent request; storage no longer fails
    page.reload()
    assert page.locator("#state").inner_text() == "done (final)"
    assert "marie" in page.locator("#history").inner_text()
    with console.store() as store:
        done = store.get_saga(record.id)
        assert done is not None
        assert done.state == "done"
    assert console.harness.saga(Postprocessing, PARKED).state == "done"


def test_saga_data_with_a_script_tag_shows_as_text_and_runs_nothing(console: Console, page: Page) -> None:
    """An upload whose id and name hold a script tag and quotes: the list and its page show them as
    text, and no script of theirs runs."""
    page.goto(console.url + "/sagas")
    page.locator("#filters input[name=key]").fill(XSS)
    page.locator("#filters button[type=submit]").click()
    page.wait_for_load_state()
    assert page.evaluate("window.__xss") is None
    assert XSS in page.locator("table").inner_text()
    page.locator("#saga-rows a[href^='/sagas/']").first.click()
    page.wait_for_load_state()
    assert page.evaluate("window.__xss") is None
    with console.store() as store:
        record = store.find_saga("postprocessing", XSS)
        assert record is not None
    assert page.url.endswith(f"/sagas/{record.id}")
    assert record.data["name"] == XSS
    shown = page.locator("#data").inner_text()
    assert '"name": "<script>window.__xss=1</script>\\"\'"' in shown
    assert page.locator("h1 code").inner_text() == XSS
    assert page.locator("script:not([src])").count() == 0
