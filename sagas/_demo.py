"""``sagas demo``: the notifications example in memory, with an embedded SMTP sink."""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
import threading
import time
from email import message_from_bytes
from typing import Any

import click

from transport import EventBus

from ._errors import ConfigurationError


class MailSink:
    """A local SMTP server (aiosmtpd) that keeps what it receives."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            from aiosmtpd.controller import Controller
        except ImportError:
            raise ConfigurationError("MailSink needs aiosmtpd: pip install 'kombu-sagas[demo]'") from None
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.mails: list[Any] = []
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname=host, port=port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.mails.append(message_from_bytes(envelope.content))
        return "250 OK"

    def __enter__(self) -> MailSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def example(name: str) -> Any:
    """The example module ``name``: the repository's ``examples/`` folder, installed as ``sagas.examples``."""
    try:
        return importlib.import_module(f"sagas.examples.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "sagas.examples":
            raise
    # sagas imported from a source tree that is not installed (``python -m sagas`` in the top folder)
    return importlib.import_module(f"examples.{name}")


def run_demo(shares: int = 5) -> int:
    notifications = example("notifications")
    app, publish_share, share_created = notifications.app, notifications.publish_share, notifications.share_created

    from ._worker import Worker

    with MailSink() as sink, tempfile.TemporaryDirectory() as tmp:
        os.environ["SMTP_HOST"], os.environ["SMTP_PORT"] = sink.host, str(sink.port)
        exchange = f"demo{os.getpid()}"
        worker = Worker(app, broker="memory://", store=f"sqlite:///{tmp}/sagas.db", exchange=exchange)
        bus = EventBus("memory://", exchange=exchange)
        click.echo(f"notifications demo: memory:// bus, SQLite store, SMTP sink on {sink.host}:{sink.port}")
        with worker.running():
            first = None
            for i in range(shares):
                event = publish_share(bus, f"share-{i}", "einstein", f"user{i}", f"/Photos/{i}.jpg")
                first = first or event
            if first is not None:
                # The same event delivered again (as at-least-once may do): the inbox skips it.
                again = share_created(**first.payload)
                bus.publish(
                    type(again)(
                        type=first.type, payload=first.payload, source=first.source, id=first.id, time=first.time
                    )
                )
            deadline = time.monotonic() + 10
            while len(sink.mails) < shares and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # let a duplicate mail, if the inbox failed, arrive and be counted
        bus.close()
        click.echo(f"\n{len(sink.mails)} mail(s) sent for {shares} share(s), the event of share-0 delivered twice:")
        for mail in sink.mails:
            click.echo(f"  to {mail['To']:<24} {mail['Subject']}")
        ok = len(sink.mails) == shares
        click.echo("\nevery share mailed exactly once" if ok else "\nMISMATCH: see above")
        return (0 if ok else 1) | run_postprocessing(f"{tmp}/postprocessing.db")


def run_postprocessing(store_path: str) -> int:
    """The post-processing saga on memory with SQLite: a few uploads, and each one's outcome."""
    from transport import Event

    from ._service import App
    from ._worker import Worker

    app = example("postprocessing").app
    exchange = f"demo{os.getpid()}pp"
    uploads = [("report.pdf", 120_000), ("eicar-test.com", 68), ("holiday.mov", 50 * 1024 * 1024), ("notes.txt", 2_000)]
    expected = {"report.pdf": "continue", "eicar-test.com": "delete", "holiday.mov": "abort", "notes.txt": "continue"}
    worker = Worker(
        App(*app.services, sagas=app.sagas, exchange=exchange),
        broker="memory://",
        store=f"sqlite:///{store_path}",
        timer_interval=0.05,
    )
    bus = EventBus("memory://", exchange=exchange)
    click.echo("\npost-processing saga: antivirus scan, policy check, then finish (or revert the upload)")
    with worker.running():
        for i, (name, size) in enumerate(uploads):
            bus.publish(
                Event(
                    "ocis.storage.bytes_received",
                    {"upload_id": f"upload-{i}", "name": name, "size": size, "user": "marie"},
                )
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sagas = worker.store.list_sagas(saga_type="postprocessing")
            if len(sagas) == len(uploads) and all(s.final for s in sagas):
                break
            time.sleep(0.02)
        by_name = {s.data.get("name"): s for s in worker.store.list_sagas(saga_type="postprocessing")}
        ok = True
        for name, _size in uploads:
            saga = by_name.get(name)
            outcome = saga.data.get("outcome") if saga else None
            ok &= outcome == expected[name] and bool(saga and saga.final)
            steps = " -> ".join(h.to_state for h in worker.store.saga_history(saga.id)) if saga else "-"
            click.echo(f"  {name:<16} outcome={outcome!s:<9} {steps}")
    bus.close()
    click.echo("every upload ended with the expected outcome" if ok else "MISMATCH: see above")
    return 0 if ok else 1
