"""Fixtures for the console's browser tests: the console served for real by uvicorn (in a thread, on a
free port) and a headless Chromium driven by Playwright.

Playwright's own browser download cannot work here: the tests launch the system's Chromium (Debian's
``chromium`` package, which ``.ci/run`` installs), or the executable ``SAGAS_CHROMIUM`` names. Tests marked
``browser`` skip outside CI when Playwright or Chromium is missing, and fail in CI (``CI`` set), as the
tests that need a service do (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import IN_CI

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

VIEWPORT = {"width": 1200, "height": 800}


def _need(ok: bool, message: str) -> None:
    """Skip (outside CI) or fail (in CI) when what a browser test needs is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it (.ci/run installs chromium, '.[dev]' installs playwright)")
    pytest.skip(message)


def chromium_path() -> str | None:
    """The Chromium to drive: ``SAGAS_CHROMIUM``, or ``chromium`` on the PATH."""
    return os.environ.get("SAGAS_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium for the module (the system's, not Playwright's download). Not for the session:
    Playwright's sync API keeps an event loop running on the main thread until it stops, and the asyncio
    tests that come later (asyncio.run) refuse to start beside it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed: pip install -e '.[browser]'")
        raise
    executable = chromium_path()
    _need(
        executable is not None and os.access(executable, os.X_OK),
        "chromium is not installed (apt-get install chromium, or set SAGAS_CHROMIUM)",
    )
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies) and page, about 1200x800, that fails on page errors."""
    context = browser.new_context(viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]})
    context.set_default_timeout(10_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """``serve(asgi_app)``: serve the app with uvicorn in a background thread on a free port of
    127.0.0.1; returns its base URL. Stopped at the end of the test."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any) -> str:
        port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"console-{port}", daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start on port {port}")
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
