"""The sagas command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from sagas import App, Event, EventBus, Reject, Service, Worker
from sagas._cli import cli
from tests.helpers import wait_for
from transport import Subscription, is_memory_url

COMMANDS = [
    ["run"],
    ["publish"],
    ["dead", "ls"],
    ["dead", "show"],
    ["dead", "replay"],
    ["dead", "drop"],
    ["health"],
    ["demo"],
    ["counts"],
    ["queues"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    """Each command's --help shows an example."""
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output


def _publish(runner: CliRunner, bus: EventBus, type: str, payload: dict[str, object], common: list[str]) -> str:
    """Publish with `sagas publish` on RabbitMQ; on memory://, which `publish` refuses (it reaches no other
    process), with the test's bus in this process. The event's id."""
    if is_memory_url(bus.url):
        event = Event(type, payload)
        bus.publish(event)
        return event.id
    out = runner.invoke(cli, ["publish", type, json.dumps(payload), *common])
    assert out.exit_code == 0, out.output
    return out.output.strip().splitlines()[-1]  # (the worker logs to the same output)


def test_publish_then_dead_ls_and_replay(broker_url: str, unique: str, buses: list[object]) -> None:
    """A rejected event shows in `dead ls` with its error, and `dead replay` puts it back."""
    handled: list[str] = []
    svc = Service("cli")

    @svc.on("ocis.cli.poked")
    def poke(event: Event) -> None:
        if not handled:
            handled.append("rejected")
            raise Reject("first time is bad")
        handled.append(event.id)

    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    runner = CliRunner()
    common = ["--broker", broker_url, "--exchange", unique]
    with worker.running():
        event_id = _publish(runner, bus, "ocis.cli.poked", {"n": 1}, common)
        wait_for(lambda: bus.dead_letters(), what="dead letter")
        listed = runner.invoke(cli, ["dead", "ls", "--json", *common])
        (letter,) = json.loads(listed.output)
        assert letter["id"] == event_id
        assert "first time is bad" in letter["reason"]
        text = runner.invoke(cli, ["dead", "ls", *common]).output
        assert event_id in text
        shown = runner.invoke(cli, ["dead", "show", event_id, *common])
        assert shown.exit_code == 0, shown.output
        assert "first time is bad" in shown.output
        assert "traceback:" in shown.output
        assert "Reject" in shown.output
        missing = runner.invoke(cli, ["dead", "show", "nope", *common])
        assert missing.exit_code == 1
        assert "error: no dead letter 'nope'" in missing.output
        replay = runner.invoke(cli, ["dead", "replay", event_id, *common])
        assert replay.exit_code == 0, replay.output
        wait_for(lambda: event_id in handled, what="replayed event handled")
    assert runner.invoke(cli, ["dead", "ls", *common]).output.strip() == "no dead letters"


def test_dead_replay_needs_ids_or_all() -> None:
    """`dead replay` without ids or --all is a usage error."""
    result = CliRunner().invoke(cli, ["dead", "replay"])
    assert result.exit_code == 2
    assert "--all" in result.output


def test_publish_rejects_bad_input() -> None:
    """A payload that is not a JSON object is refused with a clear message."""
    runner = CliRunner()
    assert "not JSON" in runner.invoke(cli, ["publish", "ocis.a.b", "{nope"]).output
    assert "JSON object" in runner.invoke(cli, ["publish", "ocis.a.b", "[1]"]).output


USAGE_MISTAKES = [
    (["dead", "replay"], "error: give either --all or one or more dead-letter ids\n"),
    (["dead", "drop"], "error: give either --all or one or more dead-letter ids\n"),
    (["dead", "show"], "error: Missing argument 'LETTER_ID'.\n"),
    (["show"], "error: give a saga id, or a type and a key (TYPE KEY, or --type and --key)\n"),
    (["show", "--type", "postprocessing"], "error: give a saga id, or a type and a key"),
    (["publish"], "error: Missing argument 'TYPE'.\n"),
    (["publish", "ocis.a.b", "{nope"], "error: PAYLOAD is not JSON: "),
    (["publish", "ocis.a.b", "[1]"], "error: PAYLOAD must be a JSON object\n"),
    (["retry"], "error: Missing argument 'SAGA_ID'.\n"),
    (["graph"], "error: Missing argument 'SAGA_CLASS'.\n"),
    (["run", "x", "--concurrency", "0"], "error: Invalid value for '--concurrency': 0 is not in the range x>=1.\n"),
    (
        ["run", "x", "--slow-callback-duration", "0"],
        "error: Invalid value for '--slow-callback-duration': 0.0 is not in the range x>0.\n",
    ),
    (["ls", "--limit", "abc"], "error: Invalid value for '--limit': 'abc' is not a valid integer range.\n"),
    (["counts", "extra"], "error: Got unexpected extra argument (extra)\n"),
    (["nope"], "error: No such command 'nope'.\n"),
    (["--bogus"], "error: No such option '--bogus'.\n"),
]


@pytest.mark.parametrize(("args", "expected"), USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_a_usage_mistake_is_an_error_line_and_exit_2(args: list[str], expected: str) -> None:
    """Any command's usage mistake prints `error: ...` on stderr and exits 2: no usage block, no traceback."""
    result = CliRunner().invoke(cli, args, env={"SAGAS_BROKER_URL": "memory://", "SAGAS_STORE_URL": "memory://"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Usage:" not in result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_a_usage_mistake_through_the_sagas_script_has_no_usage_lines() -> None:
    """The installed entry point (sagas._cli.main, as `python -m sagas`) prints the same one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "sagas", "dead", "replay"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: give either --all or one or more dead-letter ids\n"
    assert proc.stdout == ""


@pytest.mark.parametrize("args", [["--help"], ["dead", "--help"], ["show", "--help"], ["publish", "--help"]])
def test_help_still_prints_the_usage(args: list[str]) -> None:
    """--help is unchanged: the usage and the help text on stdout, exit 0."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert "Show this message and exit." in result.stdout
    assert result.stderr == ""


def test_publish_with_an_invalid_name_fails_clearly() -> None:
    """An invalid event name exits 2 and names the rule."""
    proc = subprocess.run(
        [sys.executable, "-m", "sagas", "publish", "Bad Name", "{}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid event name" in proc.stderr


def test_health_exit_codes_and_no_credentials(amqp_url: str) -> None:
    """`health` exits 0 when the broker answers, 1 when not, and never prints the password."""
    runner = CliRunner()
    assert runner.invoke(cli, ["health", "--broker", amqp_url]).exit_code == 0
    bad = runner.invoke(cli, ["health", "--broker", "amqp://guest:s3cr3t-pw@127.0.0.1:1//", "--timeout", "1"])
    assert bad.exit_code == 1
    assert "s3cr3t-pw" not in bad.output
    assert "unreachable" in bad.output


APP = """
from sagas import App, Service
svc = Service("slowpoke")
done = []
@svc.on("ocis.slow.work")
def work(event):
    import time
    print("started", event.id, flush=True)
    time.sleep(1.0)
    print("finished", event.id, flush=True)
app = App(svc, exchange="{exchange}")
"""


def _start_worker(tmp_path: Path, exchange: str, broker: str, *extra: str) -> subprocess.Popen[str]:
    (tmp_path / "slowapp.py").write_text(textwrap.dedent(APP.format(exchange=exchange)))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagas",
            "run",
            "slowapp:app",
            "--broker",
            broker,
            "--store",
            f"sqlite:///{tmp_path}/s.db",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_exits_3_when_the_broker_stays_away(tmp_path: Path, unique: str) -> None:
    """A worker whose broker is unreachable past the grace period exits non-zero, redacting the URL."""
    proc = _start_worker(tmp_path, unique, "amqp://guest:pw-xyz@127.0.0.1:1//", "--grace-period", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "unreachable" in err
    assert "pw-xyz" not in out + err


@pytest.mark.rabbitmq
def test_sigterm_finishes_in_flight_work(tmp_path: Path, unique: str, amqp_url: str) -> None:
    """On SIGTERM, the handler that is running finishes and is acked before the worker exits 0."""
    proc = _start_worker(tmp_path, unique, amqp_url)
    bus = EventBus(amqp_url, exchange=unique)
    try:
        wait_for(lambda: _queue_ready(amqp_url, f"{unique}.slowpoke.work"), what="worker consuming")
        event = Event("ocis.slow.work")
        bus.publish(event)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"started {event.id}"  # the handler runs for 1 s
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == f"finished {event.id}"
        assert _queue_depth(amqp_url, f"{unique}.slowpoke.work") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        queue = f"{unique}.slowpoke.work"
        bus.declared_queues |= {queue, *(f"{queue}.delay.{ms}" for ms in (1000, 2000, 4000, 8000))}
        bus.delete_topology()
        bus.close()


def _queue_ready(url: str, queue: str) -> bool:
    import amqp

    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    try:
        return bool(conn.channel().queue_declare(queue, passive=True).consumer_count)
    except amqp.exceptions.NotFound:
        return False
    finally:
        conn.close()


def _queue_depth(url: str, queue: str) -> int:
    import amqp

    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    try:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)
    finally:
        conn.close()


def test_dead_drop_deletes_letters(broker_url: str, unique: str, buses: list[object]) -> None:
    """`dead drop ID` deletes that letter (exit 1 and 'not found' for an unknown id); `--all` the rest."""
    svc = Service("cli")

    @svc.on("ocis.cli.poked")
    def poke(event: Event) -> None:
        raise Reject("never")

    worker = Worker(App(svc, exchange=unique), broker=broker_url, store="memory://")
    bus = EventBus(broker_url, exchange=unique)
    buses += [worker, bus]
    runner = CliRunner()
    common = ["--broker", broker_url, "--exchange", unique]
    with worker.running():
        ids = [_publish(runner, bus, "ocis.cli.poked", {}, common) for _ in range(2)]
        wait_for(lambda: len(bus.dead_letters()) == 2, what="two dead letters")
    one = runner.invoke(cli, ["dead", "drop", ids[0], "nope", "--as", "marie", *common])
    assert one.exit_code == 1, one.output
    assert "dropped 1 message(s)" in one.output
    assert "not found: nope" in one.output
    assert [d.id for d in bus.dead_letters()] == [ids[1]]
    rest = runner.invoke(cli, ["dead", "drop", "--all", *common])
    assert rest.exit_code == 0, rest.output
    assert bus.dead_letters() == []
    assert runner.invoke(cli, ["dead", "drop", *common]).exit_code == 2


def test_an_unknown_broker_scheme_or_log_level_is_an_error_without_a_traceback(tmp_path: Path) -> None:
    """A broker URL of another scheme and an unknown log level print an error, exit 2, no traceback."""

    def sagas(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sagas", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)

    bad_broker = sagas("publish", "ocis.a.b", "--broker", "http://x")
    assert bad_broker.returncode == 2, bad_broker.stderr
    assert "error: unsupported broker URL 'http://x'" in bad_broker.stderr
    assert "Traceback" not in bad_broker.stderr
    bad_level = sagas("--log-level", "loud", "ls")
    assert bad_level.returncode == 2, bad_level.stderr
    assert "'loud' is not one of" in bad_level.stderr
    assert "Traceback" not in bad_level.stderr


def test_publish_on_memory_is_refused() -> None:
    """`sagas publish` on memory:// (the default) exits 2 and says why: no other process can receive it."""
    result = CliRunner().invoke(cli, ["publish", "ocis.cli.poked", "{}"], env={"SAGAS_BROKER_URL": "memory://"})
    assert result.exit_code == 2, result.output
    assert "error: not publishing on memory://" in result.output
    assert "--broker or SAGAS_BROKER_URL" in result.output


def test_publish_of_an_event_no_queue_receives_exits_3(amqp_url: str, unique: str) -> None:
    """On RabbitMQ an event that no queue is bound to (a typo) is an error, exit 3, naming the event;
    --allow-unroutable publishes it anyway; a bound name is published (exit 0)."""
    runner = CliRunner()
    common = ["--broker", amqp_url, "--exchange", unique]
    bus = EventBus(amqp_url, exchange=unique)
    try:
        bus.declare(Subscription(queue=f"{unique}.cli.bound", patterns=("ocis.cli.poked",)))
        typo = runner.invoke(cli, ["publish", "ocis.cli.pokde", "{}", *common])
        assert typo.exit_code == 3, typo.output
        assert "error: no queue receives ocis.cli.pokde" in typo.output
        assert "--allow-unroutable" in typo.output
        anyway = runner.invoke(cli, ["publish", "ocis.cli.pokde", "{}", "--allow-unroutable", *common])
        assert anyway.exit_code == 0, anyway.output
        bound = runner.invoke(cli, ["publish", "ocis.cli.poked", "{}", *common])
        assert bound.exit_code == 0, bound.output
    finally:
        bus.delete_topology()
        bus.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["publish", "ocis.a.b", "--broker", "amqp://g:pw@127.0.0.1:5672//?heartbeat=abc"], "heartbeat='abc'"),
        (["publish", "ocis.a.b", "--broker", "amqp://g:pw@127.0.0.1:5672//?hartbeat=5"], "unknown option"),
        (["publish", "ocis.a.b", "--broker", "amqp://g:pw@127.0.0.1:notaport//"], "port that is not a number"),
        (["publish", "ocis.a.b", "--broker", "ampq://g:pw@127.0.0.1//"], "unsupported broker URL"),
        (["health", "--broker", "amqp://g:pw@127.0.0.1:5672//?connect_timeout=-1"], "connect_timeout='-1'"),
        (["dead", "ls", "--broker", "amqp://g:pw@127.0.0.1:5672//?heartbeat="], "heartbeat=''"),
        (["run", "capp:app", "--broker", "amqp://g:pw@h:notaport//"], "port that is not a number"),
        (["ls", "--store", "sqlite:///sagas.db?synchronus=full"], "unknown sqlite store URL option"),
        (["counts", "--store", "sqlite:///sagas.db?synchronous=sometimes"], "synchronous must be"),
        (["ls", "--store", "postgresql://u:pw@127.0.0.1:notaport/db"], "port that is not a number"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]),
)
def test_a_malformed_url_is_an_error_without_a_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    """A broker or store URL with a bad port or a bad or unknown option prints `error: ...` (without the
    password) and exits 2, before anything connects; no traceback."""
    (tmp_path / "capp.py").write_text(APP.format(exchange="unused"))
    command = [sys.executable, "-m", "sagas", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert ":pw@" not in proc.stderr


APP_COMMANDS = {
    "run": ["run", "{spec}"],
    "graph": ["graph", "{spec}"],
    "retry": ["retry", "some-id", "--app", "{spec}", "--store", "{store}"],
    "compensate": ["compensate", "some-id", "--app", "{spec}", "--store", "{store}"],
    "console": ["console", "--app", "{spec}", "--store", "{store}"],
}


def _sagas_in(folder: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m sagas ARGS` started in ``folder``, with no PYTHONPATH (as a user outside the clone)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "sagas", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", APP_COMMANDS, ids=str)
def test_an_app_that_cannot_be_imported_says_what_to_do(tmp_path: Path, command: str) -> None:
    """Outside the clone `examples` is not importable: every command that takes an app or a saga class
    says `error: cannot import ...` with what to do (and where the examples ship), exit 2, no usage lines."""
    from sagas._store import open_store

    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    open_store(store).close()
    spec = "examples.postprocessing:Postprocessing" if command == "graph" else "examples.postprocessing:app"
    proc = _sagas_in(tmp_path, [a.format(spec=spec, store=store) for a in APP_COMMANDS[command]])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: cannot import 'examples.postprocessing': No module named 'examples' (run from the folder that "
        "holds the module, or put it on PYTHONPATH; the examples ship with the package as "
        "sagas.examples.postprocessing)\n"
    )
    assert "Usage:" not in proc.stderr


def test_the_packaged_examples_work_from_any_folder(tmp_path: Path) -> None:
    """The spelling the --help examples and docs/console.md give, sagas.examples...., imports anywhere."""
    proc = _sagas_in(tmp_path, ["graph", "sagas.examples.postprocessing:Postprocessing"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("stateDiagram-v2")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "no_such_module_x1:app",
            "cannot import 'no_such_module_x1': No module named 'no_such_module_x1' (run from "
            "the folder that holds the module, or put it on PYTHONPATH)",
        ),
        (
            "tests.sagas.broken_app_x1:app",
            "cannot import 'tests.sagas.broken_app_x1': No module named 'tests.sagas.broken_app_x1' (run from",
        ),
        ("sagas:nothing_here", "module 'sagas' has no attribute 'nothing_here'"),
        ("sagas:Saga", "'sagas:Saga' is not a sagas.App (found type)"),
        (":app", "expected module:attribute"),
    ],
)
def test_a_bad_app_is_a_usage_error(spec: str, message: str) -> None:
    """Whatever is wrong with --app, it is `error: ...` and exit 2, without click's usage lines."""
    result = CliRunner().invoke(cli, ["retry", "x", "--app", spec, "--store", "memory://"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert "Usage:" not in result.output


def test_an_app_whose_own_import_fails_says_so(tmp_path: Path) -> None:
    """A module that is found but imports something missing is not a PYTHONPATH problem: the message says
    the module itself imports something missing."""
    (tmp_path / "shaky_app.py").write_text("import no_such_dependency_x1\n")
    proc = _sagas_in(tmp_path, ["run", "shaky_app:app"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: cannot import 'shaky_app': No module named 'no_such_dependency_x1' ('shaky_app' itself imports "
        "something that is missing)\n"
    )
