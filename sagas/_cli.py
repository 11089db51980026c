"""The ``sagas`` command line."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import click

from transport import Event, EventBus, TransportError, redact_url

from ._errors import SagasError
from ._logging import configure_logging
from ._service import App, Service

_broker = click.option(
    "--broker", envvar="SAGAS_BROKER_URL", default="memory://", show_default=True,
    help="Broker URL: memory:// or amqp://user:pass@host:5672/vhost (amqps:// for TLS; several "
         "separated by ';'). Env: SAGAS_BROKER_URL.",
)
_exchange = click.option(
    "--exchange", envvar="SAGAS_EXCHANGE", default=None,
    help="Events exchange name (default 'sagas'; for `run`, the app's). Env: SAGAS_EXCHANGE.",
)


def _load_app(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise click.BadParameter("expected module:attribute, e.g. examples.notifications:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    obj = getattr(module, attr or "app", None)
    if isinstance(obj, Service):
        obj = App(obj)
    if not isinstance(obj, App):
        raise click.BadParameter(f"{spec!r} is not a sagas.App (found {type(obj).__name__})")
    return obj


@click.group()
@click.option("--log-json", is_flag=True, envvar="SAGAS_LOG_JSON", help="Log JSON lines instead of text.")
@click.option("--log-level", default="info", show_default=True, envvar="SAGAS_LOG_LEVEL")
def cli(log_json: bool, log_level: str) -> None:
    """Saga orchestration on events. Every command has --help with an example."""
    configure_logging(json=log_json, level=log_level)


@cli.command()
@click.argument("app")
@_broker
@_exchange
@click.option("--store", envvar="SAGAS_STORE_URL", default="sqlite:///sagas.db", show_default=True,
              help="Store URL: sqlite:///path, memory:// or postgresql://... Env: SAGAS_STORE_URL.")
@click.option("--concurrency", default=4, show_default=True, help="Handlers running at once.")
@click.option("--grace-period", default=60.0, show_default=True,
              help="Exit non-zero (3) if the broker stays unreachable this many seconds.")
def run(app: str, broker: str, exchange: str | None, store: str, concurrency: int, grace_period: float) -> None:
    """Run every service of APP (module:attribute) until SIGTERM or SIGINT.

    \b
    Example:
      sagas run examples.notifications:app --broker amqp://guest:guest@localhost//
    """
    from ._worker import Worker

    worker = Worker(_load_app(app), broker=broker, store=store, exchange=exchange,
                    concurrency=concurrency, grace_period=grace_period)
    sys.exit(worker.run(install_signals=True))


@cli.command()
@click.argument("type")
@click.argument("payload", default="{}")
@_broker
@_exchange
@click.option("--source", default="cli", show_default=True, help="Source service name in the envelope.")
@click.option("--correlation-id", default="", help="Correlation id (default: the event's own id).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the broker's confirm.")
def publish(type: str, payload: str, broker: str, exchange: str | None, source: str, correlation_id: str,
            timeout: float) -> None:
    """Publish one event and wait for the broker to confirm it; print its id.

    \b
    Example:
      sagas publish ocis.sharing.share_created '{"share_id": "s1", "grantee": "marie"}'
    """
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"PAYLOAD is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter("PAYLOAD must be a JSON object")
    event = Event(type=type, payload=data, source=source, correlation_id=correlation_id)
    with EventBus(broker, exchange=exchange or "sagas", publish_timeout=timeout) as bus:
        bus.publish(event, timeout=timeout)
    click.echo(event.id)


@cli.group()
def dead() -> None:
    """Inspect and replay dead letters."""


@dead.command("ls")
@_broker
@_exchange
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--limit", default=1000, show_default=True)
def dead_ls(broker: str, exchange: str | None, as_json: bool, limit: int) -> None:
    """List dead letters with their queue, reason and error. They stay in the dead-letter queue.

    \b
    Example:
      sagas dead ls --broker amqp://guest:guest@localhost// --json
    """
    with EventBus(broker, exchange=exchange or "sagas") as bus:
        letters = bus.dead_letters(limit)
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in letters], indent=2))
        return
    if not letters:
        click.echo("no dead letters")
        return
    for d in letters:
        click.echo(f"{d.id}  {d.routing_key or '-'}  queue={d.queue}  attempts={d.attempts}  at={d.dead_at}")
        click.echo(f"    reason: {d.reason}")
        if d.error_type:
            click.echo(f"    error:  {d.error_type}: {d.error_message}")


@dead.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@_broker
@_exchange
def dead_replay(ids: tuple[str, ...], replay_all: bool, broker: str, exchange: str | None) -> None:
    """Put dead letters back on the queue they came from, with a fresh attempt count.

    \b
    Examples:
      sagas dead replay 5f0c1d2e...      # one or more ids from 'sagas dead ls'
      sagas dead replay --all
    """
    if replay_all == bool(ids):
        raise click.UsageError("give either --all or one or more dead-letter ids")
    skipped: dict[str, str] = {}
    with EventBus(broker, exchange=exchange or "sagas") as bus:
        done = bus.replay_dead(None if replay_all else ids, skipped=skipped)
    click.echo(f"replayed {len(done)} message(s)")
    for dead_id, why in skipped.items():
        click.echo(f"kept {dead_id}: {why}", err=True)
    missing = set(ids) - set(done) - set(skipped)
    if missing:
        click.echo(f"not found: {', '.join(sorted(missing))}", err=True)
    if missing or skipped:
        sys.exit(1)


@cli.command()
@_broker
@click.option("--timeout", default=5.0, show_default=True)
def health(broker: str, timeout: float) -> None:
    """Exit 0 if the broker answers within TIMEOUT seconds, else 1.

    \b
    Example:
      sagas health --broker amqp://guest:guest@localhost// && echo healthy
    """
    bus = EventBus(broker, connect_timeout=timeout)
    ok = bus.health(timeout=timeout)
    bus.close()
    click.echo(f"{'ok' if ok else 'unreachable'}: {redact_url(broker)}")
    sys.exit(0 if ok else 1)


@cli.command()
@click.option("--shares", default=5, show_default=True, help="How many shares to create.")
def demo(shares: int) -> None:
    """Run the notifications example in memory, with an embedded SMTP sink, and print what was mailed.

    \b
    Example:
      sagas demo --shares 3
    """
    from ._demo import run_demo

    configure_logging(level="warning")
    sys.exit(run_demo(shares))


def main() -> Any:
    try:
        return cli(standalone_mode=True)
    except (SagasError, TransportError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
