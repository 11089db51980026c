"""The operator commands on sagas: ls, show, graph, retry and compensate."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from examples.postprocessing import Postprocessing
from examples.postprocessing import app as postprocessing_app
from sagas import (
    FAILED,
    App,
    Event,
    EventBus,
    Failure,
    Final,
    NoReply,
    PostgresStore,
    Request,
    Saga,
    SagaDefinition,
    SagaRecord,
    Service,
    SQLiteStore,
    Start,
    State,
    Step,
    StepSaga,
    Worker,
    open_store,
)
from sagas._cli import cli
from sagas._graph import draw, mermaid_ids
from sagas._store import HistoryEntry
from tests.helpers import wait_for

# -- sagas and participants for retry and compensate (the CLI loads `app_for_retry` with --app) ---------

WORK = "cli.parking.work"
RESERVE, CHARGE, RELEASE = "cli.booking.reserve", "cli.booking.charge", "cli.booking.release"


class Parking(Saga):
    """Waits for one reply; a failure reply parks it in ``failed``."""

    type = "cli_parking"
    start = Start("cli.parking.started", key="key", to="waiting")
    states = [State("waiting", sends=Request(WORK), timeout=30.0, on_reply="done", on_failure=FAILED), Final("done")]


class Booking(StepSaga):
    """Reserve (undone by release), then charge."""

    type = "cli_booking"
    start = Start("cli.booking.started", key="key")
    steps = [Step("reserve", RESERVE, compensation=RELEASE, timeout=30.0), Step("charge", CHARGE, timeout=30.0)]


participants = Service("cli_participants")
_failed_once: set[str] = set()


@participants.handles(WORK)
def work(event: Event) -> dict[str, bool]:
    """Fails the first request of each saga, then succeeds."""
    if event.correlation_id not in _failed_once:
        _failed_once.add(event.correlation_id)
        raise Failure("not today")
    return {"worked": True}


@participants.handles(RESERVE)
def reserve(event: Event) -> dict[str, str]:
    return {"reservation": "r1"}


@participants.handles(CHARGE)
def charge(event: Event) -> None:
    raise NoReply("the payment provider never answers")


@participants.handles(RELEASE)
def release(event: Event) -> dict[str, bool]:
    return {"released": True}


app_for_retry = App(participants, sagas=[Parking, Booking])


# -- helpers ------------------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["--log-level", "warning", *args])


def state_of(store_url: str, saga_id: str) -> str:
    store = open_store(store_url)
    try:
        record = store.get_saga(saga_id)
        return record.state if record else ""
    finally:
        assert isinstance(store, SQLiteStore)
        store.close()


def sagas_in(store_url: str) -> list[SagaRecord]:
    store = open_store(store_url)
    try:
        return store.list_sagas()
    finally:
        assert isinstance(store, SQLiteStore)
        store.close()


TRANSITION = re.compile(r"^\s*\w+ --> \w+( : [^:]+)?$")


def assert_valid_mermaid(text: str, definition: SagaDefinition) -> dict[str, str]:
    """Check the mermaid text line by line; return the state id of each state name."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "stateDiagram-v2"
    declared: dict[str, str] = {}  # label -> id
    starts, finals, edges, classes = set(), set(), set(), {}
    for line in lines[1:]:
        body = line.strip()
        if m := re.fullmatch(r"\[\*\] --> (\w+)", body):
            starts.add(m.group(1))
        elif m := re.fullmatch(r"(\w+) --> \[\*\]", body):
            finals.add(m.group(1))
        elif "-->" in body:
            assert TRANSITION.match(line), f"bad transition line: {line!r}"
            src, _, rest = body.partition(" --> ")
            edges.add((src, rest.split(" : ")[0]))
        elif m := re.fullmatch(r'state "([^"]+)" as (\w+)', body):
            declared[m.group(1)] = m.group(2)
        elif re.fullmatch(r"\w+", body):
            declared[body] = body
        elif m := re.fullmatch(r"classDef (\w+) [\w:#%,.-]+", body):
            classes[m.group(1)] = True
        elif m := re.fullmatch(r"class (\w+) (\w+)", body):
            assert m.group(2) in classes, "class used before its classDef"
            assert m.group(1) in declared.values()
        else:
            raise AssertionError(f"unexpected mermaid line: {line!r}")
    ids = mermaid_ids(definition.states)
    assert len(set(ids.values())) == len(ids), "two states share a mermaid id"
    assert set(declared.values()) == set(ids.values()), "every state appears, once"
    assert starts == {ids[s.to] for s in definition.starts.values()}
    assert finals == {ids[n] for n in definition.finals}
    assert {s for e in edges for s in e} <= set(ids.values())
    return ids


def machine_edges(definition: SagaDefinition) -> set[tuple[str, str]]:
    """(source, dest) of every transition the compiled machine can take from a state that has not ended."""
    out = set()
    for ev in definition.machine.events.values():
        for src, transitions in ev.transitions.items():
            if not definition.states[src].final:
                out |= {(src, t.dest) for t in transitions}
    return out


# -- a finished run of the postprocessing example --------------------------------------------------------


@dataclass
class Run:
    store: str
    exchange: str
    ids: dict[str, str]  # upload id -> saga id


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Three uploads (clean, infected, too big) post-processed to the end on memory:// and SQLite."""
    store = f"sqlite:///{tmp_path_factory.mktemp('cli')}/s.db"
    exchange = f"t{uuid.uuid4().hex[:12]}"
    worker = Worker(
        App(*postprocessing_app.services, sagas=postprocessing_app.sagas, exchange=exchange),
        broker="memory://",
        store=store,
    )
    uploads = [("u1", "a.txt", 10), ("u2", "eicar.com", 10), ("u3", "big.iso", 50 * 1024 * 1024)]
    with worker.running(), EventBus("memory://", exchange=exchange) as bus:
        for upload_id, name, size in uploads:
            bus.publish(
                Event(
                    type="ocis.storage.bytes_received",
                    payload={"upload_id": upload_id, "name": name, "size": size, "user": "marie"},
                )
            )
        records = wait_for(
            lambda: (r := sagas_in(store)) and len(r) == 3 and all(x.final for x in r) and r, what="three sagas ended"
        )
    return Run(store, exchange, {r.key: r.id for r in records})


@pytest.fixture
def operated(tmp_path: Path, unique: str) -> Iterator[tuple[Worker, str]]:
    """A worker running `app_for_retry` on memory:// and a SQLite store; yields it and the store URL."""
    store = f"sqlite:///{tmp_path}/ops.db"
    worker = Worker(
        App(*app_for_retry.services, sagas=app_for_retry.sagas, exchange=unique),
        broker="memory://",
        store=store,
        relay_interval=0.2,  # (the CLI leaves what it commits on memory:// to the relay)
    )
    with worker.running():
        yield worker, store


def start(exchange: str, event_type: str, key: str, store: str, saga_type: str) -> str:
    with EventBus("memory://", exchange=exchange) as bus:
        bus.publish(Event(type=event_type, payload={"key": key}))
    return str(
        wait_for(
            lambda: next((r.id for r in sagas_in(store) if r.key == key and r.type == saga_type), None),
            what=f"saga {key} started",
        )
    )


# -- help -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "show", "graph", "retry", "compensate"])
def test_every_saga_command_has_help_with_an_example_and_a_store(command: str) -> None:
    """Each new command's --help shows an example and the --store option."""
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert f"sagas {command} " in result.output.split("Example:")[1]
    assert "--store" in result.output
    assert "SAGAS_STORE_URL" in result.output


# -- ls -------------------------------------------------------------------------------------------------


def test_ls_json_prints_one_object_per_saga_with_its_fields(run: Run) -> None:
    """`ls --json` prints one parseable JSON object per line with id, type, state, final, data, deadline."""
    result = invoke("ls", "--json", "--store", run.store)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    sagas = [json.loads(line) for line in lines]
    for s in sagas:
        assert {"id", "type", "state", "final", "data", "deadline"} <= s.keys()
        assert s["type"] == "postprocessing"
        assert s["state"] == "done"
        assert s["final"] is True
        assert s["deadline"] is None
    outcomes = {s["data"]["upload_id"]: s["data"]["outcome"] for s in sagas}
    assert outcomes == {"u1": "continue", "u2": "delete", "u3": "abort"}


def test_ls_table_filters_by_state_and_type(run: Run) -> None:
    """`ls --state done` lists every saga in a table; other filters can leave nothing."""
    result = invoke("ls", "--state", "done", "--store", run.store)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "KEY", "STATE", "FINAL", "DEADLINE", "UPDATED"]
    assert {row.split()[0] for row in rows} == set(run.ids.values())
    assert {row.split()[2] for row in rows} == set(run.ids)
    assert all(row.split()[1:2] + row.split()[3:6] == ["postprocessing", "done", "yes", "-"] for row in rows)
    assert invoke("ls", "--state", "scanning", "--store", run.store).stdout.strip() == "no sagas"
    assert invoke("ls", "--type", "other", "--json", "--store", run.store).stdout == ""
    assert (
        len(
            invoke("ls", "--type", "postprocessing", "--limit", "2", "--json", "--store", run.store).stdout.splitlines()
        )
        == 2
    )


def test_ls_stuck_is_empty_when_every_saga_ended(run: Run) -> None:
    """`ls --stuck` lists nothing when every saga is final."""
    result = invoke("ls", "--stuck", "--json", "--store", run.store)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_ls_stuck_lists_sagas_overdue_by_more_than_stuck_after(tmp_path: Path) -> None:
    """`--stuck` keeps non-final sagas whose deadline passed more than --stuck-after seconds ago, or is missing."""
    store = SQLiteStore(str(tmp_path / "stuck.db"))
    now = time.time()
    for name, deadline, final in [
        ("late", now - 120, False),
        ("recent", now - 10, False),
        ("none", None, False),
        ("ended", None, True),
        ("waiting", now + 30, False),
    ]:
        record = SagaRecord(
            id=name,
            type="postprocessing",
            key=name,
            state="done" if final else "scanning",
            data={},
            version=1,
            deadline=deadline,
            final=final,
            created_at=now,
            updated_at=now,
        )
        store.save_saga(
            record,
            expected_version=None,
            history=HistoryEntry(now, "m", "-", record.state, "test"),
            inbox=None,
            outbox=[],
        )
    store.close()
    url = f"sqlite:///{tmp_path}/stuck.db"
    stuck = [json.loads(line)["id"] for line in invoke("ls", "--stuck", "--json", "--store", url).stdout.splitlines()]
    assert sorted(stuck) == ["late", "none"]
    soon = invoke("ls", "--stuck", "--stuck-after", "5", "--json", "--store", url).stdout.splitlines()
    assert sorted(json.loads(line)["id"] for line in soon) == ["late", "none", "recent"]


def test_ls_on_a_missing_sqlite_file_fails_without_creating_it(tmp_path: Path) -> None:
    """A --store pointing at no SQLite file is an error (exit 2), and no empty store is created."""
    result = invoke("ls", "--store", f"sqlite:///{tmp_path}/nope.db")
    assert result.exit_code == 2
    assert "error: no SQLite store" in result.output
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["ls"],
        ["show", "some-id"],
        ["counts"],
        ["retry", "some-id", "--app", "examples.postprocessing:app"],
        ["compensate", "some-id", "--app", "examples.postprocessing:app"],
        ["graph", "examples.postprocessing:Postprocessing", "--id", "some-id"],
    ],
    ids=lambda args: args[0],
)
@pytest.mark.parametrize("url", ["sqlite:///{tmp}/nope.db", "mysql://db/sagas"], ids=["missing", "malformed"])
def test_a_store_that_cannot_be_opened_exits_2(tmp_path: Path, args: list[str], url: str) -> None:
    """Every operator command exits 2 with `error: ...` and no traceback for a store it cannot open, as
    the exit code tables of docs/operations.md and docs/worker.md say: a missing SQLite file as a
    malformed URL."""
    result = invoke(*args, "--store", url.format(tmp=tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert "(--store or SAGAS_STORE_URL)" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "nope.db").exists()


def _listing_store(tmp_path: Path) -> str:
    """A SQLite store of 7 sagas: keys up-0..up-5 (odd ones failed) a second apart from T, and 'other'."""
    store = SQLiteStore(str(tmp_path / "listing.db"))
    for i, key in enumerate([*(f"up-{n}" for n in range(6)), "other"]):
        state = "failed" if i % 2 else "scanning"
        record = SagaRecord(
            id=f"id{i}",
            type="postprocessing",
            key=key,
            state=state,
            data={},
            version=1,
            created_at=LISTING_T + i,
            updated_at=LISTING_T + i,
            meta={"reason": "scan failed"} if i % 2 else {},
        )
        store.save_saga(
            record,
            expected_version=None,
            history=HistoryEntry(LISTING_T, "m", "-", state, "test"),
            inbox=None,
            outbox=[],
        )
    store.close()
    return f"sqlite:///{tmp_path}/listing.db"


LISTING_T = 1_795_000_000.0  # 2026-11-18T11:06:40Z


def test_ls_pages_with_the_cursor_in_the_header_and_in_json(tmp_path: Path) -> None:
    """When more follow, the table's first line gives the next cursor (stderr with --json, where each
    object carries its own cursor); following it, in either order, lists every saga once."""
    url = _listing_store(tmp_path)
    for newest in (False, True):
        order = ["--newest"] if newest else []
        seen: list[str] = []
        cursor: list[str] = []
        while True:
            result = invoke("ls", "--limit", "3", *order, *cursor, "--store", url)
            assert result.exit_code == 0, result.output
            lines = result.stdout.splitlines()
            if lines[0].startswith("next cursor: "):
                next_cursor = lines[0].removeprefix("next cursor: ")
                assert lines[1].split()[0] == "ID"
                by_offset = "" if cursor else ", or --offset 3"
                assert lines[-1] == f"(more: --cursor {next_cursor}{by_offset})"
                seen += [line.split()[0] for line in lines[2:-1]]
                cursor = ["--cursor", next_cursor]
            else:
                assert lines[0].split()[0] == "ID"
                seen += [line.split()[0] for line in lines[1:]]
                break
        expected = [f"id{i}" for i in range(7)]
        assert seen == (expected[::-1] if newest else expected)
    result = invoke("ls", "--limit", "2", "--json", "--store", url)
    first = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["id"] for s in first] == ["id0", "id1"]
    assert result.stderr.strip() == f"next cursor: {first[-1]['cursor']}"
    rest = invoke("ls", "--json", "--cursor", first[-1]["cursor"], "--store", url)
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == [f"id{i}" for i in range(2, 7)]
    assert rest.stderr == ""


def test_ls_filters_by_key_prefix_failed_and_time(tmp_path: Path) -> None:
    """--key-prefix, --failed, --since and --until (ISO 8601 or epoch seconds) filter the listing."""
    url = _listing_store(tmp_path)

    def keys(*args: str) -> list[str]:
        result = invoke("ls", "--json", *args, "--store", url)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["key"] for line in result.stdout.splitlines()]

    assert keys("--key-prefix", "up-") == [f"up-{n}" for n in range(6)]
    assert keys("--failed") == ["up-1", "up-3", "up-5"]
    assert keys("--key-prefix", "up-", "--failed", "--newest") == ["up-5", "up-3", "up-1"]
    assert keys("--since", "2026-11-18T11:06:42Z", "--until", str(LISTING_T + 4)) == ["up-2", "up-3"]
    assert keys("--since", "2026-11-18T11:06:45") == ["up-5", "other"]  # no zone: UTC
    assert keys("--since", "2026-11-18T12:06:45+01:00") == ["up-5", "other"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cursor", "garbage!"], "error: invalid cursor 'garbage!'"),
        (["--since", "yesterday"], "error: --since must be an ISO 8601 time"),
        (["--until", "2026-13-01"], "error: --until must be an ISO 8601 time"),
        (["--until", "nan"], "error: --until must be a time"),
        (["--cursor", "WyIxIiwieCJd", "--offset", "2"], "error: page with --cursor or --offset, not both"),
    ],
)
def test_ls_bad_paging_or_time_values_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad cursor or time prints `error: ...` and exits 2, as other command-line mistakes."""
    result = invoke("ls", *args, "--store", _listing_store(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message), result.stderr
    assert result.stdout == ""


# -- show -----------------------------------------------------------------------------------------------


def test_show_prints_state_data_and_the_history_in_order(run: Run) -> None:
    """`show ID` prints the state, the data, and every transition in the order it happened."""
    result = invoke("show", run.ids["u2"], "--store", run.store)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^state:\s+done \(final\)$", out, re.M)
    assert '"outcome": "delete"' in out
    assert '"name": "eicar.com"' in out
    assert re.search(r"^deadline:\s+-$", out, re.M)
    history = out.split("history:\n")[1]
    steps = re.findall(r"(\S+) -> (\S+)", history)
    assert steps == [("-", "scanning"), ("scanning", "reverting"), ("reverting", "finishing"), ("finishing", "done")]
    assert "started by ocis.storage.bytes_received" in history
    assert re.search(r"^\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\s", history, re.M)


def test_show_json_has_the_record_and_its_history(run: Run) -> None:
    """`show --json` prints one object: the saga's fields and a `history` list of transitions."""
    result = invoke("show", run.ids["u1"], "--json", "--store", run.store)
    assert result.exit_code == 0, result.output
    saga = json.loads(result.stdout)
    assert saga["id"] == run.ids["u1"]
    assert saga["state"] == "done"
    assert saga["final"] is True
    assert saga["data"]["outcome"] == "continue"
    assert [(h["from_state"], h["to_state"]) for h in saga["history"]] == [
        ("-", "scanning"),
        ("scanning", "checking"),
        ("checking", "finishing"),
        ("finishing", "done"),
    ]
    assert all(h["message_id"] and isinstance(h["at"], float) for h in saga["history"])
    assert [h["at"] for h in saga["history"]] == sorted(h["at"] for h in saga["history"])


def test_show_an_unknown_id_fails_clearly(run: Run) -> None:
    """`show` of an id the store does not have prints an error and exits 1."""
    result = invoke("show", "no-such-saga", "--store", run.store)
    assert result.exit_code == 1
    assert "error: no saga 'no-such-saga'" in result.output
    assert "Traceback" not in result.output


# -- graph ----------------------------------------------------------------------------------------------


def test_graph_mermaid_is_a_well_formed_state_diagram(run: Run) -> None:
    """The default output is stateDiagram-v2 with the start, every state, final states and clean labels."""
    result = invoke("graph", "examples.postprocessing:Postprocessing")
    assert result.exit_code == 0, result.output
    text = result.stdout
    definition = Postprocessing.definition()
    ids = assert_valid_mermaid(text, definition)
    assert ids == {name: name for name in definition.states}
    assert "    [*] --> scanning" in text.splitlines()
    assert "scanning --> checking : reply ocis.antivirus.scan" in text
    assert "reverting --> failed : failure ocis.storage.revert, timeout" in text
    assert "class " not in text  # nothing highlighted without --id


def test_graph_edges_are_exactly_those_of_the_compiled_machine() -> None:
    """Every drawn edge is a transition of the runtime machine, and every such transition is drawn."""
    for cls in (Postprocessing, Parking, Booking):
        definition = cls.definition()
        text = draw(definition)
        drawn = set(re.findall(r"^\s*(\w+) --> (\w+)", text, re.M))
        assert drawn == machine_edges(definition), cls.__name__


def test_graph_dot_is_a_digraph_with_every_state(run: Run) -> None:
    """`--format dot` prints a digraph naming every state and edge; final states are double-bordered."""
    result = invoke("graph", "examples.postprocessing:Postprocessing", "--format", "dot")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith('digraph "postprocessing" {')
    assert text.rstrip().endswith("}")
    for name in Postprocessing.definition().states:
        assert f'"{name}"' in text
    assert '"done" [peripheries=2];' in text
    assert '"scanning" -> "checking" [label="reply ocis.antivirus.scan"];' in text
    assert text.count("{") == text.count("}")


def test_graph_with_an_id_highlights_the_saga_state(run: Run) -> None:
    """`graph --id ID --store URL` highlights the saga's current state, in mermaid and in dot."""
    common = ["examples.postprocessing:Postprocessing", "--id", run.ids["u3"], "--store", run.store]
    mermaid = invoke("graph", *common)
    assert mermaid.exit_code == 0, mermaid.output
    assert_valid_mermaid(mermaid.stdout, Postprocessing.definition())
    assert mermaid.stdout.splitlines()[-1] == "    class done current"
    assert "classDef current " in mermaid.stdout
    dot = invoke("graph", *common, "--format", "dot")
    assert dot.exit_code == 0, dot.output
    assert re.search(r'^\s+"done" \[peripheries=2, fillcolor="#ff9966"', dot.stdout, re.M)
    assert dot.stdout.count('fillcolor="#ff9966"') == 1


def test_graph_with_an_id_of_another_type_fails(run: Run) -> None:
    """`--id` of a saga that is not of the drawn type, or unknown, exits 1 with an error."""
    other = invoke("graph", "tests.sagas.test_saga_cli:Parking", "--id", run.ids["u1"], "--store", run.store)
    assert other.exit_code == 1
    assert "postprocessing saga" in other.output
    unknown = invoke("graph", "tests.sagas.test_saga_cli:Parking", "--id", "nope", "--store", run.store)
    assert unknown.exit_code == 1
    assert "no saga 'nope'" in unknown.output


def test_graph_refuses_what_is_not_a_saga_class() -> None:
    """A spec naming an app, a missing attribute or no class is a usage error (exit 2)."""
    for spec in [
        "examples.postprocessing:app",
        "examples.postprocessing:Nope",
        "examples.postprocessing",
        "no_such_module:Saga",
    ]:
        result = invoke("graph", spec)
        assert result.exit_code == 2, spec
        assert "Traceback" not in result.output


POKED = "cli.awkward.poked"


class Awkward(Saga):
    """State names mermaid cannot take as they are."""

    type = "awkward"
    start = Start("cli.awkward.started", key="key", to="wait:scan")
    correlate = {POKED: "key"}
    states = [
        State(
            "wait:scan",
            sends=Request("cli.awkward.scan"),
            timeout=5.0,
            on_reply="a-b",
            on_failure='say "hi"; #1',
            on_timeout="2nd step",
            on_compensate="end",
        ),
        State("2nd step", timeout=5.0, on={POKED: "end"}, on_timeout="a-b", on_compensate="end"),
        State("a-b", timeout=5.0, on={POKED: "end"}, on_timeout="a_b", on_compensate="end"),
        State("a_b", timeout=5.0, on={POKED: "end"}, on_timeout="state", on_compensate="end"),
        State("state", timeout=5.0, on={POKED: "end"}, on_compensate="end"),
        Final("end"),
        Final('say "hi"; #1'),
    ]


def test_graph_sanitises_state_names_consistently() -> None:
    """Names with ':', '-', spaces, quotes, a leading digit or a mermaid keyword get unique, stable ids."""
    definition = Awkward.definition()
    text = draw(definition)
    ids = assert_valid_mermaid(text, definition)
    assert ids["a_b"] == "a_b"
    assert ids["a-b"] == "a_b_2"
    assert ids["end"] != "end"
    assert ids["state"] != "state"
    assert not ids["2nd step"][0].isdigit()
    assert f'state "wait scan" as {ids["wait:scan"]}' in text
    assert f"[*] --> {ids['wait:scan']}" in text
    assert f"{ids['wait:scan']} --> {ids['a-b']} : reply cli.awkward.scan" in text
    assert f"{ids['2nd step']} --> {ids['a-b']} : timeout" in text
    assert f"{ids['2nd step']} --> {ids['end']} : event {POKED}, compensate" in text
    assert draw(definition) == text
    assert set(re.findall(r"^\s*(\w+) --> (\w+)", text, re.M)) == {
        (ids[s], ids[d]) for s, d in machine_edges(definition)
    }
    dot = draw(definition, "dot", current="wait:scan")
    assert '"say \\"hi\\"; #1" [peripheries=2];' in dot
    assert '"wait:scan" [fillcolor="#ff9966"' in dot
    with pytest.raises(ValueError, match="no state"):
        draw(definition, current="nowhere")


def test_graph_of_a_step_saga_shows_steps_compensations_and_finals() -> None:
    """A step saga draws its steps, its undo states, the compensate edges and its three finals."""
    text = invoke("graph", "tests.sagas.test_saga_cli:Booking").stdout
    ids = assert_valid_mermaid(text, Booking.definition())
    assert set(ids) == {"reserve", "undo_reserve", "charge", "completed", "compensated", "failed"}
    assert "charge --> undo_reserve : failure cli.booking.charge, timeout, compensate" in text
    assert "charge --> completed : reply cli.booking.charge" in text
    assert "undo_reserve --> failed : failure cli.booking.release, timeout" in text


# -- retry and compensate ---------------------------------------------------------------------------------


def test_retry_takes_a_failed_saga_back_and_it_completes(operated: tuple[Worker, str], unique: str) -> None:
    """`retry` moves a saga parked in failed back to the state it failed in and re-sends its request."""
    _, store = operated
    saga_id = start(unique, "cli.parking.started", "p1", store, "cli_parking")
    wait_for(lambda: state_of(store, saga_id) == FAILED, what="saga failed")
    shown = invoke("show", saga_id, "--store", store).stdout
    assert re.search(r"^failed:\s+in waiting: not today$", shown, re.M)
    result = invoke(
        "retry",
        saga_id,
        "--as",
        "marie",
        "--app",
        "tests.sagas.test_saga_cli:app_for_retry",
        "--broker",
        "memory://",
        "--exchange",
        unique,
        "--store",
        store,
    )
    assert result.exit_code == 0, result.output
    assert f"retry: saga {saga_id} (cli_parking) failed -> waiting" in result.stdout
    assert "wait in the store's outbox" in result.stderr
    assert "memory://, which reaches no other process" in result.stderr
    wait_for(lambda: state_of(store, saga_id) == "done", what="retried saga done")
    history = json.loads(invoke("show", saga_id, "--json", "--store", store).stdout)["history"]
    assert [(h["from_state"], h["to_state"], h["reason"]) for h in history][1:] == [
        ("waiting", FAILED, "not today"),
        (FAILED, "waiting", "operator: retry"),
        ("waiting", "done", f"reply to {WORK}"),
    ]
    assert [h["actor"] for h in history][1:] == ["", "marie", ""]
    shown = invoke("show", "--type", "cli_parking", "--key", "p1", "--store", store).stdout
    assert re.search(r"failed -> waiting\s+operator: retry  by marie", shown)
    assert invoke("show", "cli_parking", "p1", "--store", store).stdout == shown  # TYPE KEY


def test_retry_with_the_broker_down_leaves_the_request_in_the_outbox(operated: tuple[Worker, str], unique: str) -> None:
    """When the broker is unreachable, `retry` still moves the saga and says the relay will send the request."""
    worker, store = operated
    saga_id = start(unique, "cli.parking.started", "p2", store, "cli_parking")
    wait_for(lambda: state_of(store, saga_id) == FAILED, what="saga failed")
    worker.stop()  # so that its relay cannot send the row while we look
    result = invoke(
        "retry",
        saga_id,
        "--app",
        "tests.sagas.test_saga_cli:app_for_retry",
        "--broker",
        "amqp://guest:guest@127.0.0.1:1//",
        "--timeout",
        "0.5",
        "--store",
        store,
    )
    assert result.exit_code == 0, result.output
    assert "failed -> waiting" in result.stdout
    assert "wait in the store's outbox" in result.stderr
    assert "relay" in result.stderr
    assert state_of(store, saga_id) == "waiting"
    reader = SQLiteStore(store.removeprefix("sqlite:///"))
    try:
        unsent = [r for r in reader.unsent(created_before=time.time() + 1) if r.saga_id == saga_id]
    finally:
        reader.close()
    assert [r.routing_key for r in unsent] == [WORK]


def test_compensate_moves_a_saga_to_its_compensation(operated: tuple[Worker, str], unique: str) -> None:
    """`compensate` takes a step saga waiting in a step to the undo of the previous step, which then runs."""
    _, store = operated
    saga_id = start(unique, "cli.booking.started", "b1", store, "cli_booking")
    wait_for(lambda: state_of(store, saga_id) == "charge", what="saga waiting in charge")
    again = invoke(
        "retry",
        saga_id,
        "--app",
        "tests.sagas.test_saga_cli:app_for_retry",
        "--broker",
        "memory://",
        "--exchange",
        unique,
        "--store",
        store,
    )
    assert again.exit_code == 0, again.output
    assert f"retry: saga {saga_id} (cli_booking) charge -> charge" in again.stdout
    assert "1 message(s) not published" in again.stderr
    result = invoke(
        "compensate",
        saga_id,
        "--app",
        "tests.sagas.test_saga_cli:app_for_retry",
        "--broker",
        "memory://",
        "--exchange",
        unique,
        "--store",
        store,
    )
    assert result.exit_code == 0, result.output
    assert f"compensate: saga {saga_id} (cli_booking) charge -> undo_reserve" in result.stdout
    wait_for(lambda: state_of(store, saga_id) == "compensated", what="saga compensated")
    shown = invoke("show", saga_id, "--store", store).stdout
    assert re.search(r"charge -> charge\s+operator: retry", shown)
    assert re.search(r"charge -> undo_reserve\s+operator: compensate", shown)
    assert re.search(r"undo_reserve -> compensated\s+reply to cli.booking.release", shown)


def test_operator_commands_report_engine_errors_without_a_traceback(operated: tuple[Worker, str], unique: str) -> None:
    """Retrying an ended saga, compensating where nothing is declared, or an unknown id: error, exit 1."""
    _, store = operated
    saga_id = start(unique, "cli.booking.started", "b2", store, "cli_booking")
    wait_for(lambda: state_of(store, saga_id) == "charge", what="saga waiting in charge")
    app = [
        "--app",
        "tests.sagas.test_saga_cli:app_for_retry",
        "--broker",
        "memory://",
        "--exchange",
        unique,
        "--store",
        store,
    ]
    assert invoke("compensate", saga_id, *app).exit_code == 0
    wait_for(lambda: state_of(store, saga_id) == "compensated", what="saga compensated")
    cases = [
        (["retry", saga_id], "only a failed saga can be retried"),
        (["compensate", saga_id], "has ended in compensated; there is nothing to compensate"),
        (["retry", "nope"], "no saga 'nope'"),
        (["compensate", "nope"], "no saga 'nope'"),
    ]
    for args, message in cases:
        result = invoke(*args, *app)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ")
        assert message in result.stderr
        assert "Traceback" not in result.output
    assert "Missing option '--app'" in invoke("retry", saga_id, "--store", store).output


app_with_star = App(sagas=[Awkward])


def test_compensate_refuses_a_saga_that_did_not_move(tmp_path: Path) -> None:
    """A type that compensates from '*' does not move an ended saga: `compensate` says so and exits 1."""
    store = SQLiteStore(str(tmp_path / "star.db"))
    now = time.time()
    record = SagaRecord(
        id="ended", type="awkward", key="k", state="end", data={}, version=1, final=True, created_at=now, updated_at=now
    )
    store.save_saga(
        record, expected_version=None, history=HistoryEntry(now, "m", "-", "end", "test"), inbox=None, outbox=[]
    )
    store.close()
    result = invoke(
        "compensate",
        "ended",
        "--app",
        "tests.sagas.test_saga_cli:app_with_star",
        "--store",
        f"sqlite:///{tmp_path}/star.db",
    )
    assert result.exit_code == 1
    assert "error: saga ended has ended in end; there is nothing to compensate" in result.stderr


@pytest.mark.postgres
def test_ls_and_show_read_a_postgresql_store(postgres_url: str, unique: str) -> None:
    """`ls` and `show` work on a PostgreSQL store named by URL, schema included."""
    store = PostgresStore(postgres_url, schema=unique)
    try:
        now = time.time()
        record = SagaRecord(
            id="pg1",
            type="postprocessing",
            key="u9",
            state="scanning",
            data={"n": 1},
            version=1,
            deadline=now + 30,
            created_at=now,
            updated_at=now,
        )
        store.save_saga(
            record,
            expected_version=None,
            history=HistoryEntry(now, "m1", "-", "scanning", "started"),
            inbox=None,
            outbox=[],
        )
        url = f"{postgres_url}?schema={unique}"
        (line,) = invoke("ls", "--json", "--store", url).stdout.splitlines()
        assert json.loads(line)["id"] == "pg1"
        shown = invoke("show", "pg1", "--store", url)
        assert shown.exit_code == 0, shown.output
        assert re.search(r"- -> scanning\s+started\s+\[m1\]", shown.stdout)
        assert invoke("ls", "--stuck", "--json", "--store", url).stdout == ""
    finally:
        store.close()
        import psycopg

        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {unique} CASCADE")


def test_counts_shows_sagas_by_type_and_state_and_the_outbox(run: Run) -> None:
    """`counts` prints the sagas per type and state and the unsent outbox messages; --json the same."""
    result = invoke("counts", "--store", run.store)
    assert result.exit_code == 0, result.output
    assert re.search(r"^postprocessing\s+done\s+yes\s+3$", result.stdout, re.M)
    assert "outbox: 0 unsent" in result.stdout
    data = json.loads(invoke("counts", "--json", "--store", run.store).stdout)
    assert data["sagas"] == [{"type": "postprocessing", "state": "done", "final": True, "count": 3}]
    assert data["outbox"] == {"unsent": 0, "oldest_created_at": None}


def test_show_needs_an_id_or_a_type_and_key(run: Run) -> None:
    """`show` with neither an id nor a type and key, or with both, is a usage error (exit 2)."""
    for args in (
        ["show"],
        ["show", "--type", "postprocessing"],
        ["show", "x", "--type", "t", "--key", "k"],
        ["show", "a", "b", "c"],
        ["show", "t", "k", "--key", "k"],
    ):
        result = invoke(*args, "--store", run.store)
        assert result.exit_code == 2, (args, result.output)
        assert "give a saga id, or a type and a key (TYPE KEY, or --type and --key)" in result.output


@pytest.mark.postgres
def test_a_mistyped_postgres_schema_is_an_error_and_creates_nothing(postgres_url: str, unique: str) -> None:
    """`ls` on a schema that holds no store says so (exit 2) instead of listing nothing, and creates nothing."""
    import psycopg

    result = invoke("ls", "--store", f"{postgres_url}?schema={unique}")
    assert result.exit_code == 2, result.output
    assert f"error: no sagas store in schema '{unique}'" in result.output
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (unique,)).fetchone()
    assert found is None


@pytest.mark.postgres
def test_a_wrong_postgres_database_exits_2(postgres_url: str, unique: str) -> None:
    """A database that does not exist cannot be opened: `error: ...`, exit 2, as a missing SQLite file."""
    from urllib.parse import urlsplit

    wrong = urlsplit(postgres_url)._replace(path=f"/{unique}").geturl()
    result = invoke("ls", "--store", wrong)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: cannot open the PostgreSQL store"), result.stderr
    assert "Traceback" not in result.output
