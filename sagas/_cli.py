"""The ``sagas`` command line."""

from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import importlib
import json
import math
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from transport import (
    DEFAULT_MAX_EVENT_SIZE,
    DeadLetter,
    EventBus,
    QueueInUse,
    TransportError,
    Unroutable,
    encode,
    is_memory_url,
    redact_url,
)

from ._errors import NotFound, SagasError
from ._logging import configure_logging
from ._protocol import start_event
from ._saga import FAILED, Saga
from ._service import App, Service
from ._store import PRUNED_TABLES, MemoryStore, PrunableStore, QueueRegistry, Store, open_store
from .operations import MAX_PAGE, InvalidCursor, Operations, SagaView, encode_cursor

_broker = click.option(
    "--broker",
    envvar="SAGAS_BROKER_URL",
    default="memory://",
    show_default=True,
    help="Broker URL: memory:// or amqp://user:pass@host:5672/vhost (amqps:// for TLS; several "
    "separated by ';'). Env: SAGAS_BROKER_URL.",
)
_exchange = click.option(
    "--exchange",
    envvar="SAGAS_EXCHANGE",
    default=None,
    help="Events exchange name (default 'sagas'; for `run` and `check`, the app's). Env: SAGAS_EXCHANGE.",
)
_PEM = click.Path(exists=True, dir_okay=False, readable=True)
_TLS_OPTIONS = [
    click.option(
        "--ssl-ca",
        envvar="SAGAS_SSL_CA",
        type=_PEM,
        default=None,
        help="CA bundle (PEM) that signed the broker's certificate; default: the system CAs. Implies "
        "TLS. Env: SAGAS_SSL_CA.",
    ),
    click.option(
        "--ssl-cert",
        envvar="SAGAS_SSL_CERT",
        type=_PEM,
        default=None,
        help="Client certificate (PEM), for brokers that ask for one. Env: SAGAS_SSL_CERT.",
    ),
    click.option(
        "--ssl-key",
        envvar="SAGAS_SSL_KEY",
        type=_PEM,
        default=None,
        help="Private key (PEM) of --ssl-cert, unless that file holds it. Env: SAGAS_SSL_KEY.",
    ),
]


def tls_options(
    broker: str, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> dict[str, Any] | None:
    """The ``ssl`` argument of :class:`EventBus` for a broker URL and TLS files: None (plain AMQP) unless
    the URL is ``amqps://`` or a file is given. With TLS, the broker's certificate must chain to ``ca``
    (or to a system CA) and name the host of the URL (``server_hostname=None``: kombu puts in the host
    of each connection)."""
    hosts = [h.strip() for h in broker.split(";") if h.strip()]
    if not (ca or cert or key or any(h.startswith("amqps://") for h in hosts)):
        return None
    if any(h.startswith("memory://") for h in hosts):
        raise click.BadParameter("TLS options need an amqp:// or amqps:// broker, not memory://")
    if key and not cert:
        raise click.BadParameter("--ssl-key (SAGAS_SSL_KEY) needs --ssl-cert (SAGAS_SSL_CERT)")
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    if ca:
        options["ca_certs"] = ca
    if cert:
        options["certfile"] = cert
        options["keyfile"] = key
    return options


def _tls(command: Callable[..., None]) -> Callable[..., None]:
    """Add --ssl-ca, --ssl-cert and --ssl-key to a command that connects; it gets them as ``tls``
    (the ``ssl`` argument of EventBus, from :func:`tls_options`)."""

    @functools.wraps(command)
    def with_tls(*args: Any, ssl_ca: str | None, ssl_cert: str | None, ssl_key: str | None, **kwargs: Any) -> None:
        command(*args, tls=tls_options(kwargs["broker"], ssl_ca, ssl_cert, ssl_key), **kwargs)

    for option in reversed(_TLS_OPTIONS):
        with_tls = option(with_tls)
    return with_tls


def _import_attribute(spec: str, example: str, default: str | None = None) -> Any:
    """The object named by ``module:attribute`` (the current folder is importable, as for python -m).
    Every command that takes an app or a saga class imports it here: a spec that does not name one is
    ``error: ...`` and exit 2, saying what to do."""
    module_name, _, attr = spec.partition(":")
    attr = attr or (default or "")
    if not module_name or not attr:
        _usage_error(f"expected module:attribute, e.g. {example}, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            hint = "run from the folder that holds the module, or put it on PYTHONPATH"
            if missing == "examples":
                hint += f"; the examples ship with the package as sagas.{module_name}"
        else:  # the module was found, and an import inside it failed
            hint = f"{module_name!r} itself imports something that is missing"
        _usage_error(f"cannot import {module_name!r}: {exc} ({hint})")
    if not hasattr(module, attr):
        _usage_error(f"module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _load_app(spec: str) -> App:
    obj = _import_attribute(spec, "sagas.examples.notifications:app", default="app")
    if isinstance(obj, Service):
        obj = App(obj)
    if not isinstance(obj, App):
        _usage_error(f"{spec!r} is not a sagas.App (found {type(obj).__name__})")
    return obj


def _load_saga_class(spec: str) -> type[Saga]:
    obj = _import_attribute(spec, "sagas.examples.postprocessing:Postprocessing")
    if not (isinstance(obj, type) and issubclass(obj, Saga)) or obj is Saga:
        found = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        _usage_error(f"{spec!r} is not a subclass of sagas.Saga (found {found})")
    return obj


_store = click.option(
    "--store",
    envvar="SAGAS_STORE_URL",
    default="sqlite:///sagas.db",
    show_default=True,
    help="Store URL: sqlite:///path, memory:// or postgresql://... Env: SAGAS_STORE_URL.",
)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@contextlib.contextmanager
def _existing_store(url: str) -> Iterator[Store]:
    """Open the store at ``url`` for an operator command, and close it. A store that does not exist is an
    error (opening it would create an empty one and hide a wrong --store).

    Every operator command opens its store here, so this is where a store that cannot be opened becomes
    an exit code: 2, as for ``sagas run`` (docs/operations.md), whether the URL is malformed (a
    :class:`ConfigurationError`) or names no store, a missing database or schema, or an unreachable
    server (a :class:`StoreError`)."""
    try:
        store = open_store(url, create=False)
    except SagasError as exc:
        hint = "" if "SAGAS_STORE_URL" in str(exc) else " (--store or SAGAS_STORE_URL)"
        _usage_error(f"{exc}{hint}")
    try:
        yield store
    finally:
        store.close()


def _usage_error(message: str) -> NoReturn:
    """A bad option value: ``error: ...`` and exit 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _when(value: str | None, option: str) -> float | None:
    """A time option: ISO 8601 (UTC when it names no zone) or seconds since the epoch. A bad value is a
    usage error (exit 2)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            _usage_error(
                f"{option} must be an ISO 8601 time such as 2026-11-27T02:40:47Z, or seconds since the epoch,"
                f" not {value!r}"
            )
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(seconds):
        _usage_error(f"{option} must be a time, not {value!r}")
    return seconds


def _iso(ts: float | None, timespec: str = "seconds") -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


class _Mistake(click.ClickException):
    """A usage mistake, shown as ``error: <message>`` on stderr (exit 2), without click's usage lines."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _mistake(error: click.UsageError) -> click.ClickException:
    """What a usage mistake is shown as (a group called without a command still shows its help)."""
    if isinstance(error, click.exceptions.NoArgsIsHelpError):
        return error
    if isinstance(error, click.BadParameter) and error.param is None and error.param_hint is None:
        return _Mistake(error.message)  # (said by the command itself: without click's "Invalid value: ")
    return _Mistake(error.format_message())


class _Commands(click.Group):
    """The ``sagas`` group. A usage mistake in any command below it (a missing argument or id, an
    unknown command or option, a bad option value or PAYLOAD: a ``click.UsageError`` or
    ``BadParameter``, raised while parsing or by the command) prints ``error: <message>`` on stderr and
    exits 2, with no usage lines and no traceback; ``--help`` is unchanged. Every subcommand's context
    is made inside :meth:`invoke` of this group, so catching here covers them all."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _mistake(error) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise _mistake(error) from None


@click.group(cls=_Commands)
@click.option("--log-json", is_flag=True, envvar="SAGAS_LOG_JSON", help="Log JSON lines instead of text.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="SAGAS_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    help="Env: SAGAS_LOG_LEVEL.",
)
def cli(log_json: bool, log_level: str) -> None:
    """Saga orchestration on events. Every command has --help with an example."""
    configure_logging(json=log_json, level=log_level)


@cli.command()
@click.argument("app")
@_broker
@_tls
@_exchange
@_store
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Handler calls running at once, sync (on threads) and async def (on one event loop) together.",
)
@click.option(
    "--grace-period",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Exit non-zero (3) if the broker stays unreachable this many seconds.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="SAGAS_METRICS_PORT",
    help="Serve /metrics (Prometheus), /livez and /readyz on this port (needs kombu-sagas[metrics]). "
    "Env: SAGAS_METRICS_PORT.",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",  # noqa: S104 - probes and scrapes come from other hosts
    show_default=True,
    help="Address the metrics port listens on.",
)
@click.option(
    "--metrics-store-interval",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds between samples of the store's gauges (one worker of the cluster samples at a time).",
)
@click.option(
    "--no-prune",
    is_flag=True,
    envvar="SAGAS_NO_PRUNE",
    help="Do not prune old rows from this worker (prune from a cron job with `sagas prune` instead). "
    "Env: SAGAS_NO_PRUNE.",
)
@click.option(
    "--prune-interval",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds between prunes (one worker of the store prunes at a time; see docs/operations.md).",
)
@click.option(
    "--allow-stranded",
    is_flag=True,
    help="Start even when the app's saga definitions would strand live sagas: park those in 'failed', "
    "with the reason (see `sagas check`).",
)
@click.option(
    "--shared-store",
    is_flag=True,
    envvar="SAGAS_SHARED_STORE",
    help="Other apps keep their own saga types in this store: live sagas of types this app does not "
    "define are theirs, not stranded. Env: SAGAS_SHARED_STORE.",
)
@click.option(
    "--slow-callback-duration",
    default=0.1,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Warn (handler.blocked_loop) when an async def handler runs this many seconds without awaiting.",
)
@click.option(
    "--no-gc-tuning",
    is_flag=True,
    envvar="SAGAS_NO_GC_TUNING",
    help="Keep CPython's garbage-collector settings (by default the worker freezes the loaded app out of "
    "the collector's reach and collects less often: see docs/performance.md). Env: SAGAS_NO_GC_TUNING.",
)
def run(
    app: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    concurrency: int,
    grace_period: float,
    metrics_port: int | None,
    metrics_host: str,
    metrics_store_interval: float,
    no_prune: bool,
    prune_interval: float,
    allow_stranded: bool,
    shared_store: bool,
    slow_callback_duration: float,
    no_gc_tuning: bool,
) -> None:
    """Run every service of APP (module:attribute) until SIGTERM or SIGINT.

    Before it starts, it checks the app's saga definitions against the live sagas in the store, as
    `sagas check` does, and exits 4 naming those that would be stranded (unless --allow-stranded).
    Exits 3 when the broker stays unreachable past --grace-period, 5 when it refuses the login.

    \b
    Example:
      sagas run sagas.examples.notifications:app --broker amqp://guest:guest@localhost//
      sagas run sagas.examples.notifications:app --metrics-port 9464   # /metrics, /livez, /readyz
    """
    from ._gc import tune_gc
    from ._store import open_store
    from ._worker import Worker

    metrics = None
    if metrics_port is not None:
        try:
            from ._metrics import Metrics
        except ImportError:
            _usage_error("--metrics-port needs prometheus_client: pip install 'kombu-sagas[metrics]'")
    # With metrics, one memory store is shared by the worker and the sampler (a URL opens a new one).
    worker_store = open_store(store) if metrics_port is not None and is_memory_url(store) else store
    loaded = _load_app(app)
    worker = Worker(
        loaded,
        broker=broker,
        store=worker_store,
        exchange=exchange,
        concurrency=concurrency,
        grace_period=grace_period,
        ssl=tls,
        prune=not no_prune,
        prune_interval=prune_interval,
        allow_stranded=allow_stranded,
        shared_store=shared_store,
        slow_callback_duration=slow_callback_duration,
    )
    if metrics_port is not None:
        metrics = Metrics(worker_store, instance=worker.instance, store_interval=metrics_store_interval)
        worker.observer = metrics
        try:
            metrics.serve(metrics_port, metrics_host)
        except OSError as exc:
            _usage_error(f"--metrics-port {metrics_port}: {exc}")
    if not no_gc_tuning:
        tune_gc()  # (the app is loaded: freeze it)
    try:
        code = worker.run(install_signals=True)
    finally:
        if metrics is not None:
            metrics.close()
    if worker.compatibility is not None and not worker.compatibility.compatible and not allow_stranded:
        for line in worker.compatibility.lines():
            click.echo(line, err=True)
    sys.exit(code)


@cli.command("check")
@click.argument("app")
@_store
@click.option(
    "--shared-store",
    is_flag=True,
    envvar="SAGAS_SHARED_STORE",
    help="Other apps keep their own saga types in this store: their sagas are listed, not judged.",
)
@_exchange
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_definitions(app: str, store: str, shared_store: bool, exchange: str | None, as_json: bool) -> None:
    """Check APP's saga definitions against the live sagas in the store, without starting: exit 0 when
    none would be stranded, 4 (naming them) when some would. For a deploy pipeline.

    \b
    Example:
      sagas check myapp:app --store postgresql://sagas@db/sagas
    """
    from ._queues import request_routes
    from ._saga_engine import SagaEngine
    from ._versions import check

    loaded = _load_app(app)
    on = exchange or loaded.exchange
    with _existing_store(store) as opened:
        definitions = SagaEngine(loaded.sagas, opened).definitions
        routes = request_routes(opened, loaded, on)
        report = check(
            definitions, opened, shared_store=shared_store, unhandled=None if routes is None else routes.unhandled
        )
        if routes is not None and not routes.rows and isinstance(opened, QueueRegistry):
            others = opened.registered_exchanges()
            if others:
                # (nothing to judge requests by on this exchange: a deploy check that forgot --exchange)
                click.echo(
                    f"note: the store's queue registry holds no queue of exchange {on!r}, only of "
                    f"{', '.join(map(repr, others))}: whether requests are still handled was not checked; "
                    "pass the --exchange the workers use",
                    err=True,
                )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.compatible else 4)


@cli.command()
@click.argument("type")
@click.argument("payload", default="{}")
@_broker
@_tls
@_exchange
@click.option("--source", default="cli", show_default=True, help="Source service name in the envelope.")
@click.option("--correlation-id", default="", help="Correlation id (default: the event's own id).")
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the broker's confirm (and at most 5 to connect).",
)
@click.option(
    "--allow-unroutable",
    is_flag=True,
    help="Publish even if no queue receives the event (by default that is an error, exit 3).",
)
def publish(
    type: str,
    payload: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    source: str,
    correlation_id: str,
    timeout: float,
    allow_unroutable: bool,
) -> None:
    """Publish one event and wait for the broker to confirm it; print its id. An event that no queue
    receives (a mistyped name, or no worker has declared its queue yet) is an error, exit 3, unless
    --allow-unroutable. memory:// is refused: it reaches no other process.

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
    event = start_event(type, data, source=source, correlation_id=correlation_id)  # (traced, as other events)
    encode(event, DEFAULT_MAX_EVENT_SIZE)  # an event no bus would take is refused before the broker is
    if is_memory_url(broker):
        click.echo(
            f"error: not publishing on {redact_url(broker)}: memory:// lives inside one process, so no worker "
            "can receive the event; give the workers' broker with --broker or SAGAS_BROKER_URL",
            err=True,
        )
        sys.exit(2)
    name = exchange or "sagas"
    with EventBus(broker, exchange=name, publish_timeout=timeout, connect_timeout=min(timeout, 5.0), ssl=tls) as bus:
        try:
            bus.publish(event, mandatory=not allow_unroutable, timeout=timeout)
        except Unroutable:
            click.echo(
                f"error: no queue receives {type} on the exchange {name!r}, so the broker dropped it (check the "
                "event name and --exchange; --allow-unroutable to publish anyway)",
                err=True,
            )
            sys.exit(EXIT_UNROUTABLE)
    click.echo(event.id)


#: Exit code of `sagas publish` for an event that no queue receives.
EXIT_UNROUTABLE = 3

_operator = click.option(
    "--as",
    "actor",
    envvar="SAGAS_OPERATOR",
    default=None,
    help="Who acts, as kept in the saga's history (default: your user name at this host). Env: SAGAS_OPERATOR.",
)


def _actor(given: str | None) -> str:
    if given and given.strip():
        return given.strip()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


@contextlib.contextmanager
def _operations(
    store: str | None = None,
    *,
    app_spec: str | None = None,
    broker: str | None = None,
    exchange: str | None = None,
    tls: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> Iterator[Operations]:
    """:class:`Operations` for a command: on the store at ``store`` (which must exist), for the app's
    saga types, publishing on ``broker``. A store that cannot be opened is ``error: ...`` and exit 2;
    errors of the command itself (a saga not found, an action refused) are ``error: ...`` and exit 1."""
    app = _load_app(app_spec) if app_spec else None
    bus = None
    if broker is not None:
        exchange = exchange or (app.exchange if app else "sagas")
        bus = EventBus(broker, exchange=exchange, publish_timeout=timeout, connect_timeout=min(timeout, 5.0), ssl=tls)
    try:
        with contextlib.ExitStack() as stack:
            st = stack.enter_context(_existing_store(store)) if store is not None else MemoryStore()
            yield Operations(st, sagas=app.sagas if app else (), bus=bus)
    except NotFound as exc:
        _fail(f"{exc} in the store {redact_url(store)}" if store is not None else str(exc))
    except SagasError as exc:
        _fail(str(exc))
    finally:
        if bus is not None:
            bus.close()


@cli.group()
def dead() -> None:
    """Inspect, replay and drop dead letters."""


def _print_letter(d: DeadLetter, *, traceback: bool = False) -> None:
    click.echo(f"{d.id}  {d.routing_key or '-'}  queue={d.queue}  attempts={d.attempts}  at={d.dead_at}")
    click.echo(f"    reason: {d.reason}")
    if d.error_type:
        click.echo(f"    error:  {d.error_type}: {d.error_message}")
    if traceback and d.traceback:
        click.echo("    traceback:")
        for line in d.traceback.rstrip().splitlines():
            click.echo(f"      {line}")


def _letter_ids(ids: tuple[str, ...], every: bool) -> tuple[str, ...] | None:
    """The dead letters a command acts on: the ids given, or None for ``--all`` (one of the two)."""
    if every == bool(ids):
        raise click.UsageError("give either --all or one or more dead-letter ids")
    return None if every else ids


@dead.command("ls")
@_broker
@_tls
@_exchange
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
def dead_ls(broker: str, tls: dict[str, Any] | None, exchange: str | None, as_json: bool, limit: int) -> None:
    """List dead letters with their queue, reason and error. They stay in the dead-letter queue.

    \b
    Example:
      sagas dead ls --broker amqp://guest:guest@localhost// --json
    """
    with _operations(broker=broker, exchange=exchange, tls=tls) as ops:
        letters = ops.dead_letters(limit)
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in letters], indent=2))
        return
    if not letters:
        click.echo("no dead letters")
        return
    for d in letters:
        _print_letter(d)


@dead.command("show")
@click.argument("letter_id")
@_broker
@_tls
@_exchange
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def dead_show(letter_id: str, broker: str, tls: dict[str, Any] | None, exchange: str | None, as_json: bool) -> None:
    """Show one dead letter: where it came from, why it died, the error and its traceback.

    \b
    Example:
      sagas dead show 5f0c1d2e6a7b4c3d8e9f0a1b2c3d4e5f --broker amqp://guest:guest@localhost//
    """
    with _operations(broker=broker, exchange=exchange, tls=tls) as ops:
        letter = ops.dead_letter(letter_id)
    if as_json:
        click.echo(json.dumps(letter.to_dict(), indent=2))
        return
    _print_letter(letter, traceback=True)


@dead.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@_broker
@_tls
@_exchange
@_operator
def dead_replay(
    ids: tuple[str, ...],
    replay_all: bool,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    actor: str | None,
) -> None:
    """Put dead letters back on the queue they came from, with a fresh attempt count.

    \b
    Examples:
      sagas dead replay 5f0c1d2e...      # one or more ids from 'sagas dead ls'
      sagas dead replay --all
    """
    with _operations(broker=broker, exchange=exchange, tls=tls) as ops:
        result = ops.replay_dead(_letter_ids(ids, replay_all), actor=_actor(actor))
    click.echo(f"replayed {len(result.replayed)} message(s)")
    for dead_id, why in result.kept.items():
        click.echo(f"kept {dead_id}: {why}", err=True)
    if result.missing:
        click.echo(f"not found: {', '.join(sorted(result.missing))}", err=True)
    if result.missing or result.kept:
        sys.exit(1)


@dead.command("drop")
@click.argument("ids", nargs=-1)
@click.option("--all", "drop_all", is_flag=True, help="Drop every dead letter.")
@_broker
@_tls
@_exchange
@_operator
def dead_drop(
    ids: tuple[str, ...],
    drop_all: bool,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    actor: str | None,
) -> None:
    """Delete dead letters for good, once you know they must never be handled.

    \b
    Examples:
      sagas dead drop 5f0c1d2e...      # one or more ids from 'sagas dead ls'
      sagas dead drop --all
    """
    with _operations(broker=broker, exchange=exchange, tls=tls) as ops:
        result = ops.drop_dead(_letter_ids(ids, drop_all), actor=_actor(actor))
    click.echo(f"dropped {len(result.dropped)} message(s)")
    if result.missing:
        click.echo(f"not found: {', '.join(sorted(result.missing))}", err=True)
        sys.exit(1)


@cli.command()
@_broker
@_tls
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
def health(broker: str, tls: dict[str, Any] | None, timeout: float) -> None:
    """Exit 0 if the broker answers within TIMEOUT seconds, else 1.

    \b
    Example:
      sagas health --broker amqp://guest:guest@localhost// && echo healthy
    """
    bus = EventBus(broker, connect_timeout=timeout, ssl=tls)
    ok = bus.health(timeout=timeout)
    bus.close()
    click.echo(f"{'ok' if ok else 'unreachable'}: {redact_url(broker)}")
    sys.exit(0 if ok else 1)


#: Exit code of ``sagas prune`` when another pruner (a worker's, or another ``sagas prune``) holds the
#: store's pruner lease for longer than --wait: nothing was deleted, and nothing is wrong.
EXIT_PRUNER_BUSY = 3


@cli.command("prune")
@click.argument("app")
@_store
@click.option("--dry-run", is_flag=True, help="Count what would be deleted, and delete nothing.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for the pruner lease when another pruner holds it, before exiting 3.",
)
def prune_command(app: str, store: str, dry_run: bool, wait_seconds: float) -> None:
    """Delete what the store no longer needs, by APP's retention (module:attribute), in batches.

    For workers run with --no-prune (a cron job instead). Prints the rows per table that went, or with
    --dry-run that would go. It takes the store's pruner lease first, as a worker's pruner does (an
    advisory lock on PostgreSQL, a claim elsewhere): when another pruner holds it (a worker's, or
    another `sagas prune`) for longer than --wait, it deletes nothing, says so and exits 3. --dry-run
    takes no lease. See docs/operations.md, "Retention".

    \b
    Example:
      sagas prune sagas.examples.postprocessing:app --store sqlite:///sagas.db --dry-run
    """
    from ._retention import Pruner

    loaded = _load_app(app)
    with _existing_store(store) as opened:
        pruner = Pruner(
            opened,
            loaded.retention,
            instance=f"cli-{socket.gethostname()}-{os.getpid()}",
            finished_by_type=loaded.keep_finished,
        )
        if not isinstance(opened, PrunableStore):
            _usage_error(f"a {type(opened).__name__} cannot be pruned")
        try:
            if dry_run:
                counts = opened.prune_counts(pruner.cutoffs())
            else:
                deadline = time.monotonic() + wait_seconds
                while not pruner.elect():
                    if time.monotonic() >= deadline:
                        waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                        more = "a longer --wait" if wait_seconds else "--wait"
                        click.echo(
                            "another pruner holds the store's pruner lease (a worker's, or another `sagas prune`)"
                            f"{waited}: nothing was deleted (run workers with --no-prune to prune from here, or pass "
                            f"{more})",
                            err=True,
                        )
                        sys.exit(EXIT_PRUNER_BUSY)
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                try:
                    counts = dict(pruner.prune_once())
                finally:
                    pruner.resign()
        except SagasError as exc:
            _fail(str(exc))
    heading = "would delete" if dry_run else "deleted"
    for line in _table([("table", heading), *((t, str(counts.get(t, 0))) for t in PRUNED_TABLES)]):
        click.echo(line)
    if dry_run:
        click.echo("dry run: nothing was deleted")


@cli.command()
@click.argument("app")
@_broker
@_tls
@_exchange
@_store
@click.option(
    "--orphaned",
    is_flag=True,
    help="Only the queues a worker of APP declared once and that no current handler or saga type of APP, "
    "no other app and no consumer uses.",
)
@click.option("--delete", is_flag=True, help="With --orphaned: delete them, and the messages they hold.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def queues(
    app: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    orphaned: bool,
    delete: bool,
    as_json: bool,
) -> None:
    """List the durable queues of APP with their depth and consumers; with --orphaned, those it left
    behind (a renamed or removed handler or saga type), as the workers' registry in the store knows
    them. --delete removes them, never one with a consumer.

    \b
    Example:
      sagas queues examples.order:app --store sqlite:///sagas.db --broker amqp://guest:guest@localhost// --orphaned
      sagas queues examples.order:app --store ... --broker ... --orphaned --delete
    """
    from . import _queues

    if delete and not orphaned:
        _usage_error("--delete removes orphaned queues only: add --orphaned")
    loaded = _load_app(app)
    exchange = exchange or loaded.exchange
    bus = EventBus(broker, exchange=exchange, connect_timeout=5.0, ssl=tls)
    failed = False
    try:
        with _existing_store(store) as st:
            if not bus.health(timeout=5.0):  # (declares nothing; an empty registry would not connect at all)
                _usage_error(f"the broker {redact_url(broker)} does not answer")
            if not orphaned:
                rows = []
                for r in _queues.app_queues(loaded, exchange):
                    info = bus.inspect_queue(r.queue)
                    rows.append(
                        {
                            "queue": r.queue,
                            "exists": info is not None,
                            "depth": info.messages if info else 0,
                            "consumers": info.consumers if info else 0,
                            "consumer": r.consumer,
                        }
                    )
                if as_json:
                    click.echo(json.dumps(rows, indent=2))
                    return
                table = [("QUEUE", "DEPTH", "CONSUMERS", "CONSUMED BY")]
                for row in rows:
                    depth = str(row["depth"]) if row["exists"] else "(not declared)"
                    table.append((str(row["queue"]), depth, str(row["consumers"]), str(row["consumer"])))
                for line in _table(table):
                    click.echo(line)
                return
            orphans = _queues.find_orphans(st, bus, loaded, exchange, forget=False)
            if as_json and not delete:
                click.echo(json.dumps([o.to_dict() for o in orphans], indent=2))
                return
            if not orphans:
                click.echo(f"no orphaned queues of {_queues.app_name(loaded)} on exchange {exchange}")
                return
            if not delete:
                listing = [("QUEUE", "DEPTH", "DELAYED", "CONSUMERS", "WAS CONSUMED BY", "LAST DECLARED")]
                for o in orphans:
                    r = o.record
                    listing.append(
                        (r.queue, str(o.depth), str(o.delayed), str(o.consumers), r.consumer, _iso(r.declared_at))
                    )
                for line in _table(listing):
                    click.echo(line)
                return
            for o in orphans:
                try:
                    held = _queues.remove(st, bus, o)
                except QueueInUse as exc:
                    click.echo(f"kept {o.record.queue}: {exc}", err=True)
                    failed = True
                    continue
                click.echo(f"deleted {o.record.queue} ({o.record.consumer}): {held} message(s) dropped")
    except TransportError as exc:  # (as for the other commands: exit 2)
        _usage_error(f"{exc} (broker {redact_url(broker)})")
    finally:
        bus.close()
    if failed:
        sys.exit(1)


@cli.command("ls")
@_store
@click.option("--type", "saga_type", default=None, help="Only sagas of this type.")
@click.option("--state", default=None, help="Only sagas in this state.")
@click.option("--key", default=None, help="Only sagas with this business key (the start event's key field).")
@click.option(
    "--stuck",
    is_flag=True,
    help="Only sagas that have not ended and whose deadline is missing or passed --stuck-after ago.",
)
@click.option(
    "--stuck-after",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="With --stuck: seconds a deadline must be overdue.",
)
@click.option("--key-prefix", default=None, help="Only sagas whose business key starts with this.")
@click.option("--failed", is_flag=True, help="Only sagas parked in the state 'failed'.")
@click.option(
    "--since",
    default=None,
    help="Only sagas created at or after this time: ISO 8601 (UTC if no zone) or epoch seconds.",
)
@click.option(
    "--until", default=None, help="Only sagas created before this time: ISO 8601 (UTC if no zone) or epoch seconds."
)
@click.option("--newest", is_flag=True, help="Newest first (default: oldest first).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per line, each with the cursor that follows it."
)
@click.option(
    "--cursor",
    default=None,
    help="Start after this position: the next cursor a previous page printed (same filters and order).",
)
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, MAX_PAGE),
    help=f"At most this many sagas (1 to {MAX_PAGE:,}).",
)
@click.option(
    "--offset",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Skip this many (the next page starts here).",
)
def saga_ls(
    store: str,
    saga_type: str | None,
    state: str | None,
    key: str | None,
    stuck: bool,
    stuck_after: float,
    key_prefix: str | None,
    failed: bool,
    since: str | None,
    until: str | None,
    newest: bool,
    as_json: bool,
    cursor: str | None,
    limit: int,
    offset: int,
) -> None:
    """List sagas with their type, key, state and deadline, oldest first.

    Page through many with --cursor: when more follow, the first line (stderr with --json) gives the
    next cursor.

    \b
    Example:
      sagas ls --store sqlite:///sagas.db --type postprocessing --stuck
      sagas ls --key-prefix u1 --failed --since 2026-11-27T00:00:00Z --newest
    """
    created_after = _when(since, "--since")
    created_before = _when(until, "--until")
    if cursor is not None and offset:
        _usage_error("page with --cursor or --offset, not both")
    with _operations(store) as ops:
        try:
            page = ops.sagas(
                type=saga_type,
                state=state,
                key=key,
                stuck=stuck,
                stuck_after=stuck_after,
                newest_first=newest,
                limit=limit,
                offset=offset,
                cursor=cursor,
                key_prefix=key_prefix,
                created_after=created_after,
                created_before=created_before,
                failed=failed,
            )
        except InvalidCursor as exc:
            _usage_error(f"{exc} (--cursor)")
    if as_json:
        for r in page.items:
            click.echo(json.dumps({**r.to_dict(), "cursor": encode_cursor(r.created_at, r.id)}, sort_keys=True))
        if page.next_cursor is not None:
            click.echo(f"next cursor: {page.next_cursor}", err=True)
        return
    if not page.items:
        click.echo("no sagas")
        return
    if page.next_cursor is not None:
        click.echo(f"next cursor: {page.next_cursor}")
    rows = [("ID", "TYPE", "KEY", "STATE", "FINAL", "DEADLINE", "UPDATED")]
    rows += [
        (r.id, r.type, r.key, r.state, "yes" if r.final else "no", _iso(r.deadline), _iso(r.updated_at))
        for r in page.items
    ]
    for line in _table(rows):
        click.echo(line)
    if page.next_cursor is not None:
        by_offset = "" if cursor is not None else f", or --offset {page.next_offset}"
        click.echo(f"(more: --cursor {page.next_cursor}{by_offset})")


@cli.command()
@click.argument("target", nargs=-1)
@_store
@click.option("--type", "saga_type", default=None, help="With --key: find the saga by type and business key.")
@click.option("--key", default=None, help="With --type: the saga's business key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the saga and its history.")
def show(target: tuple[str, ...], store: str, saga_type: str | None, key: str | None, as_json: bool) -> None:
    """Show one saga, by id (ID) or by type and business key (TYPE KEY): state, data, deadline,
    attempts, why it failed, and its history with who acted.

    \b
    Example:
      sagas show 3f2a9c0e5b6d4c1e8a7f6b5c4d3e2f10 --store sqlite:///sagas.db
      sagas show postprocessing u1 --store sqlite:///sagas.db
      sagas show --type postprocessing --key u1 --store sqlite:///sagas.db
    """
    saga_id: str | None = None
    if len(target) == 2 and saga_type is None and key is None:
        saga_type, key = target
    elif len(target) == 1:
        saga_id = target[0]
    elif len(target) > 2 or (len(target) == 2 and (saga_type or key)):
        raise click.UsageError("give a saga id, or a type and a key (TYPE KEY, or --type and --key)")
    if (saga_id is None) == (saga_type is None and key is None) or (saga_id is None and not (saga_type and key)):
        raise click.UsageError("give a saga id, or a type and a key (TYPE KEY, or --type and --key)")
    with _operations(store) as ops:
        view = ops.saga(saga_id, type=saga_type, key=key)
    if as_json:
        click.echo(json.dumps(view.to_dict(), indent=2, sort_keys=True))
        return
    for line in _describe(view):
        click.echo(line)
    click.echo("history:")
    history = view.history
    if not history:
        click.echo("  (none)")
    width = max((len(f"{h.from_state} -> {h.to_state}") for h in history), default=0)
    for h in history:
        moved = f"{h.from_state} -> {h.to_state}".ljust(width)
        by = f"  by {h.actor}" if h.actor else ""
        click.echo(f"  {_iso(h.at, 'milliseconds')}  {moved}  {h.reason}{by}  [{h.message_id}]")


@cli.command()
@_store
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def counts(store: str, as_json: bool) -> None:
    """Count sagas by type and state, and the outbox messages not yet sent.

    \b
    Example:
      sagas counts --store sqlite:///sagas.db
    """
    with _operations(store) as ops:
        by_state = ops.counts()
        backlog = ops.outbox_backlog()
    if as_json:
        out = {
            "sagas": [{"type": c.type, "state": c.state, "final": c.final, "count": c.count} for c in by_state],
            "outbox": {"unsent": backlog.unsent, "oldest_created_at": backlog.oldest_created_at},
        }
        click.echo(json.dumps(out, indent=2))
        return
    if by_state:
        rows = [("TYPE", "STATE", "FINAL", "SAGAS")]
        rows += [(c.type, c.state, "yes" if c.final else "no", str(c.count)) for c in by_state]
        for line in _table(rows):
            click.echo(line)
    else:
        click.echo("no sagas")
    oldest = "" if backlog.oldest_created_at is None else f" (oldest {_iso(backlog.oldest_created_at)})"
    click.echo(f"outbox: {backlog.unsent} unsent{oldest}")


def _describe(view: SagaView) -> list[str]:
    r = view.record
    now = time.time()
    if r.deadline is None:
        deadline = "-"
    else:
        left = r.deadline - now
        deadline = f"{_iso(r.deadline, 'milliseconds')} ({f'in {left:.1f}s' if left >= 0 else f'{-left:.1f}s ago'})"
    lines = [
        f"saga:      {r.id}",
        f"type:      {r.type}",
        f"key:       {r.key}",
        f"state:     {r.state}" + (" (final)" if r.final else ""),
        f"version:   {r.version}",
        f"deadline:  {deadline}",
        f"attempts:  {r.attempts}",
        f"created:   {_iso(r.created_at, 'milliseconds')}",
        f"updated:   {_iso(r.updated_at, 'milliseconds')}",
    ]
    waiting = view.waiting_for
    if waiting is not None:
        lines.append(f"waiting:   reply to {waiting['type']} (request {waiting['id'] or '?'})")
    failure = view.failure
    if failure is not None:
        label = "failed:   " if r.state == FAILED else "last fail:"
        lines.append(f"{label} in {failure['state'] or '?'}: {failure['reason'] or '?'}")
    extra = {k: v for k, v in r.meta.items() if k not in ("request", "reason", "failed_from")}
    if extra:
        lines.append(f"meta:      {json.dumps(extra, sort_keys=True)}")
    lines.append("data:")
    lines += ["  " + line for line in json.dumps(r.data, indent=2, sort_keys=True).splitlines()]
    return lines


@cli.command()
@click.argument("saga_class")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="Mermaid stateDiagram-v2 text, or Graphviz DOT text.",
)
@click.option("--id", "saga_id", default=None, help="Highlight the current state of this saga (needs --store).")
@_store
def graph(saga_class: str, fmt: str, saga_id: str | None, store: str) -> None:
    """Print the state diagram of SAGA_CLASS (module:Class), optionally with one saga's state highlighted.

    \b
    Example:
      sagas graph sagas.examples.postprocessing:Postprocessing --format dot | dot -Tsvg > postprocessing.svg
    """
    from ._graph import draw

    cls = _load_saga_class(saga_class)
    try:
        definition = cls.definition()
    except SagasError as exc:
        _fail(str(exc))
    current = None
    if saga_id is not None:
        with _operations(store) as ops:
            record = ops.saga(saga_id).record
        if record.type != definition.type or record.state not in definition.states:
            _fail(
                f"saga {saga_id} is a {record.type} saga in state {record.state!r}, "
                f"not one of {saga_class} ({definition.type})"
            )
        current = record.state
    click.echo(draw(definition, fmt, current), nl=False)


_app_option = click.option(
    "--app",
    "app_spec",
    envvar="SAGAS_APP",
    required=True,
    help="The app (module:attribute, importable from the current folder or PYTHONPATH) that declares the saga "
    "types, the one the workers run; e.g. sagas.examples.postprocessing:app. Env: SAGAS_APP.",
)
_timeout = click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the broker and its confirms.",
)


@cli.command()
@click.argument("saga_id")
@_app_option
@_broker
@_tls
@_exchange
@_store
@_timeout
@_operator
def retry(
    saga_id: str,
    app_spec: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    timeout: float,
    actor: str | None,
) -> None:
    """Send a waiting saga's request again now, or take a saga parked in 'failed' back to the state it
    failed in and start that state again.

    \b
    Example:
      sagas retry 3f2a9c0e5b6d4c1e8a7f6b5c4d3e2f10 --app sagas.examples.postprocessing:app --store sqlite:///sagas.db
    """
    _operate("retry", saga_id, app_spec, broker, tls, exchange, store, timeout, actor)


@cli.command()
@click.argument("saga_id")
@_app_option
@_broker
@_tls
@_exchange
@_store
@_timeout
@_operator
def compensate(
    saga_id: str,
    app_spec: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    timeout: float,
    actor: str | None,
) -> None:
    """Start compensating a saga now, where its type declares how from its current state.

    \b
    Example:
      sagas compensate 3f2a9c0e5b6d4c1e8a7f6b5c4d3e2f10 --app sagas.examples.postprocessing:app --store sqlite:///sagas.db
    """
    _operate("compensate", saga_id, app_spec, broker, tls, exchange, store, timeout, actor)


def _operate(
    action: str,
    saga_id: str,
    app_spec: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    timeout: float,
    actor: str | None,
) -> None:
    # memory:// reaches no other process: publishing there, the request would find no participant and
    # fail the saga's step. The workers' relay sends what the action commits instead.
    in_memory = is_memory_url(broker)
    publish_on = None if in_memory else broker
    with _operations(store, app_spec=app_spec, broker=publish_on, exchange=exchange, tls=tls, timeout=timeout) as ops:
        act = ops.retry if action == "retry" else ops.compensate
        result = act(saga_id, actor=_actor(actor))
        record = ops.saga(saga_id).record
    click.echo(f"{action}: saga {saga_id} ({record.type}) {result.from_state} -> {result.to_state}")
    for event_type, message_id in result.published:
        click.echo(f"published {event_type} ({message_id})")
    if result.pending:
        if in_memory:
            why = " (no --broker given, or memory://, which reaches no other process)"
        else:
            why = f" ({result.problem})" if result.problem else ""
        click.echo(
            f"note: {result.pending} message(s) not published{why}; they wait in the store's outbox and a "
            "running worker's relay sends them within its relay interval (5 s by default)",
            err=True,
        )


@cli.command()
@click.option("--shares", default=5, show_default=True, type=click.IntRange(1, 1000), help="How many shares to create.")
def demo(shares: int) -> None:
    """Run the notifications example in memory, with an embedded SMTP sink, and print what was mailed.

    \b
    Example:
      sagas demo --shares 3
    """
    from ._demo import run_demo

    configure_logging(level="warning")
    sys.exit(run_demo(shares))


@cli.command()
@click.argument(
    "workload",
    type=click.Choice(["events", "sagas", "raw", "deadlines", "all", "console", "retention", "publish", "latency"]),
)
@_broker
@click.option(
    "--store",
    default=None,
    envvar="SAGAS_BENCH_STORE_URL",
    help="Store of the sagas workload (default: memory:// with memory://, else a fresh SQLite file); "
    "the existing store whose console pages the console workload measures (required there).",
)
@click.option("-n", "n", default=20000, show_default=True, help="Events, or sagas, per run.")
@click.option("--workers", default=1, show_default=True, help="Worker processes of the sagas workload.")
@click.option(
    "--requests",
    default=200,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Timed requests of each page kind per run (console workload).",
)
@click.option("--repeat", default=1, show_default=True, help="Runs of each workload; the report gives medians.")
@click.option(
    "--variants",
    default=None,
    metavar="off,metrics,tracing,both,console",
    help="events and sagas: run once per variant in each round, alternating (tracing: an SDK TracerProvider "
    "with a BatchSpanProcessor and a counting exporter; tracing@0.1, both@0.1: with head sampling at that "
    "ratio; metrics: the Prometheus observer; console: the console over the store, its overview and list "
    "reloaded every second), and report each variant's throughput and its ratio to off.",
)
@click.option(
    "--async-handlers",
    is_flag=True,
    help="events: run each round twice, with a plain and with an async def handler (alternating which goes "
    "first), and report the async one's ratio to the sync one.",
)
@click.option(
    "--in-flight",
    default=500,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="publish: events awaited at a time by the asyncio publisher (and the sync bus's batch size).",
)
@click.option(
    "--baseline",
    "baseline_file",
    default=None,
    metavar="FILE",
    help="Compare the medians with a report saved from `sagas bench ... --json > FILE`; print the regressions "
    "and exit 1 when there are any.",
)
@click.option(
    "--tolerance",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="With --baseline: how much worse than the baseline (a fraction) a figure may be before it is a regression.",
)
@click.option(
    "--rates",
    default="500,2000,5000",
    show_default=True,
    help="latency: the event rates (events/s) to offer, comma-separated; each runs --seconds after 1 s of warm-up.",
)
@click.option(
    "--saga-rates",
    default="100,300",
    show_default=True,
    help="latency: the saga rates (sagas started per second) to offer, comma-separated ('' for none).",
)
@click.option(
    "--seconds",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 600),
    help="latency: how long each rate is offered (after 1 s of warm-up).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (every run, medians, ratios).")
def bench(
    workload: str,
    broker: str,
    store: str | None,
    n: int,
    workers: int,
    requests: int,
    repeat: int,
    variants: str | None,
    async_handlers: bool,
    in_flight: int,
    baseline_file: str | None,
    tolerance: float,
    rates: str,
    saga_rates: str,
    seconds: float,
    as_json: bool,
) -> None:
    """Measure events/s and sagas/s on a broker and store, beside the raw py-amqp ceiling; or the
    console's page times over a store (console: p50/p95/p99/max ms per page, through HTTP).

    \b
    Examples:
      sagas bench events --broker amqp://guest:guest@localhost// --repeat 3
      sagas bench sagas --broker amqp://guest:guest@localhost// --store sqlite:////tmp/bench.db -n 5000
      sagas bench all --json
      sagas bench console --store 'postgresql://postgres@127.0.0.1/test?schema=bench_console_1m' --repeat 3
      sagas bench events --variants off,metrics,tracing,both --repeat 3   # the cost of observability
      sagas bench sagas --variants off,both,both@0.1 --repeat 3           # ... with 10 % of traces sampled
      sagas bench sagas --variants off,metrics,console --repeat 3         # the cost of metrics and the console
      sagas bench retention -n 50000 --repeat 3   # rows and bytes over time; throughput, pruner off/on
      sagas bench events --async-handlers --repeat 3   # async def handlers beside plain ones
      sagas bench publish --in-flight 500 --repeat 3   # the sync bus beside the asyncio publisher
      sagas bench events --repeat 3 --json > base.json; sagas bench events --repeat 3 --baseline base.json
      sagas bench latency --rates 500,2000,5000 --saga-rates 100,300 --repeat 3   # p50/p99/p99.9 at steady rates
    """
    from . import _bench, _bench_baseline

    configure_logging(level="warning")
    baseline = None
    if baseline_file is not None:
        if workload in ("console", "retention"):
            _usage_error(f"--baseline compares the events, sagas, raw, deadlines and publish workloads, not {workload}")
        try:
            baseline = _bench_baseline.load(baseline_file)
        except _bench_baseline.NotABenchReport as exc:
            _usage_error(f"--baseline: {exc}")

    def emit(report: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> None:
        """Print the report (and its comparison with the baseline); exit 1 on a regression."""
        if baseline is None or baseline_file is None:
            click.echo(json.dumps(report) if as_json else text(report))
            return
        rows = _bench_baseline.compare(report, baseline)
        notes = _bench_baseline.differences(report, baseline)
        compared = _bench_baseline.as_json(rows, tolerance, baseline_file, notes)
        if as_json:
            click.echo(json.dumps({**report, "baseline": compared}))
        else:
            click.echo(text(report))
            click.echo(_bench_baseline.table(rows, tolerance, baseline_file, notes))
        if compared["regressions"]:
            sys.exit(1)

    if workload == "console":
        _bench_console(broker, store, requests, repeat, as_json)
        return
    if workload == "publish":
        from ._bench_aio import bench_publish
        from ._bench_aio import table as publish_table

        emit(bench_publish(broker, n, in_flight, repeat), publish_table)
        return
    if workload == "latency":
        from . import _bench_latency

        try:
            event_rates = _bench_latency.parse_rates(rates, "--rates")
            sagas_rates = _bench_latency.parse_rates(saga_rates, "--saga-rates", allow_empty=True)
        except ValueError as exc:
            _usage_error(str(exc))
        emit(_bench_latency.run(broker, event_rates, sagas_rates, seconds, repeat), _bench_latency.table)
        return
    if workload == "retention":
        from ._bench_retention import bench_retention
        from ._bench_retention import table as retention_table

        # -n sagas, with four events each, in 2 x --repeat segments alternating the pruner off and on
        retained = bench_retention(broker, n, 4 * n, rounds=repeat)
        click.echo(json.dumps(retained) if as_json else retention_table(retained))
        return
    if async_handlers and (workload not in ("events", "all") or variants is not None):
        _usage_error("--async-handlers applies to the events workload (bench events or all), without --variants")
    if variants is not None:
        chosen = [v.strip() for v in variants.split(",") if v.strip()]
        for v in chosen:
            try:
                _bench.parse_variant(v)
            except ValueError as e:
                _usage_error(
                    f"--variants: {e} (a comma-separated list of {', '.join(_bench.VARIANTS)}, "
                    f"tracing and both with an optional sampling ratio: both@0.1)"
                )
        if not chosen or len(set(chosen)) != len(chosen):
            _usage_error(f"--variants: a comma-separated list of {', '.join(_bench.VARIANTS)}, not {variants!r}")
        if workload not in ("events", "sagas", "all"):
            _usage_error(f"--variants applies to events and sagas, not {workload}")
        missing = _bench.missing_extras(chosen)
        if missing:
            _usage_error(f"--variants {','.join(chosen)} needs {missing}")
        report = _bench.run_variants(workload, broker, store, n, workers, repeat, chosen)
    else:
        report = _bench.run(workload, broker, store, n, workers, repeat, async_handlers=async_handlers)
    emit(report, _bench.table)


def _bench_console(broker: str, store: str | None, requests: int, repeat: int, as_json: bool) -> None:
    try:
        from .console import _bench as console_bench
    except ImportError:
        _usage_error("sagas bench console needs the console: pip install 'kombu-sagas[console]'")
    if not store:
        _usage_error("sagas bench console needs --store: the URL of a store that holds sagas")
    publish_on = None if is_memory_url(broker) else broker
    with _operations(store, broker=publish_on) as ops:
        try:
            report = console_bench.run(ops, store_url=store, requests=requests, repeat=repeat)
        except (ValueError, RuntimeError) as exc:  # an empty store; a page that did not answer 200
            _fail(str(exc))
    click.echo(json.dumps(report) if as_json else console_bench.table(report))


def main() -> Any:
    try:
        return cli(standalone_mode=True)
    except (SagasError, TransportError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@cli.command()
@_app_option
@_broker
@_tls
@_exchange
@_store
@_timeout
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="Address and port to listen on.")
@click.option(
    "--token",
    envvar="SAGAS_CONSOLE_TOKEN",
    default=None,
    help="Token that allows actions (retry, compensate, replay, drop); without it the console is read-only. "
    "Env: SAGAS_CONSOLE_TOKEN.",
)
def console(
    app_spec: str,
    broker: str,
    tls: dict[str, Any] | None,
    exchange: str | None,
    store: str,
    timeout: float,
    bind: str,
    token: str | None,
) -> None:
    """Serve the web console: overview, sagas, dead letters, and actions with --token (docs/console.md).

    \b
    Example:
      sagas console --store sqlite:///sagas.db --broker amqp://localhost// --app sagas.examples.postprocessing:app
    """
    try:
        import uvicorn

        from .console import create_app
    except ImportError:
        click.echo("error: the console needs: pip install 'kombu-sagas[console]'", err=True)
        sys.exit(2)
    host, _, port_text = bind.rpartition(":")
    if not host or not port_text.isdigit():
        _usage_error(f"--bind takes host:port, e.g. 127.0.0.1:8080, not {bind!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        _usage_error(f"--bind: the port must be from 1 to 65535, not {port} ({bind!r})")
    host = host.strip("[]")
    publish_on = None if is_memory_url(broker) else broker
    with _operations(store, app_spec=app_spec, broker=publish_on, exchange=exchange, tls=tls, timeout=timeout) as ops:
        app = _load_app(app_spec) if app_spec else None
        web = create_app(ops, token=token, sagas=app.sagas if app else ())
        sock = _listen(host, port, bind)
        if host not in {"127.0.0.1", "localhost", "::1"} and not token:
            click.echo(
                f"WARNING: the console listens on {host} without a token: anyone who reaches this port reads "
                "every saga's data (it stays read-only). Bind 127.0.0.1, or put it behind an authenticating proxy.",
                err=True,
            )
        click.echo(f"sagas console on http://{bind} ({'actions allowed with the token' if token else 'read-only'})")
        uvicorn.Server(uvicorn.Config(web, log_level="warning")).run(sockets=[sock])


def _listen(host: str, port: int, bind: str) -> socket.socket:
    """A socket listening on ``host:port``, for uvicorn to serve on, so that an address that cannot be
    bound (taken by another program, not of this host, a host name that does not resolve) is an
    ``error: ...`` and exit 2 before the console announces it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        _usage_error(f"cannot listen on {bind}: the host {host!r} does not resolve ({exc}); fix --bind")
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # as uvicorn does: restart at once on a port whose old connections linger
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            _usage_error(
                f"cannot listen on {bind}: address already in use (another console or program uses it; "
                "pick another with --bind)"
            )
        _usage_error(f"cannot listen on {bind}: {exc.strerror or exc} (pick another address with --bind)")
    return sock
