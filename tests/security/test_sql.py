"""All SQL is parameterised: no value is ever formatted into a statement (docs/security.md, "SQL").

Two checks. A static one parses sagas/_store.py (the only module that talks SQL) and proves that the
statement of every ``execute``/``_execute`` call is built from constants only: string literals, module
constants, SQL type names the constructors pass as literals, ``?`` placeholder lists, psycopg's
``sql.Identifier`` quoting, and one PRAGMA value checked against a fixed list just before. A checker
self-test shows it catches f-strings, ``%`` and ``.format`` with values. A dynamic one stores sagas, inbox,
reply-cache and outbox rows whose ids, keys, types and states are SQL-injection strings, on SQLite and
PostgreSQL, and reads every one back intact, with the tables still there.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagas import SagaRecord, Store, open_store
from sagas._store import HistoryEntry, Outgoing

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "sagas" / "_store.py"
EXECUTE = {"execute", "_execute", "executemany"}
#: The functions that only pass a statement on: every caller of them is checked instead.
WRAPPERS = {"_execute", "_sql"}


class _Module:
    """A parsed module with parent links, and the checks that prove a SQL expression constant."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node

    def function_of(self, node: ast.AST) -> ast.FunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef):
                return node
        return None

    def module_constant(self, name: str) -> bool:
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return self.constant(node.value, None)
        return False

    def constant(self, node: ast.expr, fn: ast.FunctionDef | None) -> bool:
        """Whether ``node`` can only evaluate to text the source fixes (no value from outside)."""
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | int | float) or node.value is None
        if isinstance(node, ast.JoinedStr):
            return all(self.constant(v.value, fn) for v in node.values if isinstance(v, ast.FormattedValue))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.constant(node.left, fn) and self.constant(node.right, fn)
        if isinstance(node, ast.IfExp):
            return self.constant(node.body, fn) and self.constant(node.orelse, fn)
        if isinstance(node, ast.Tuple | ast.List):
            return all(self.constant(e, fn) for e in node.elts)
        if isinstance(node, ast.GeneratorExp | ast.ListComp):  # e.g. '?' for each value: placeholders only
            return self.constant(node.elt, fn)
        if isinstance(node, ast.Call):
            return self._constant_call(node, fn)
        if isinstance(node, ast.Name):
            return self._constant_name(node.id, fn)
        return False

    def _constant_call(self, node: ast.Call, fn: ast.FunctionDef | None) -> bool:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "_sql" and len(node.args) == 1:
            return self.constant(node.args[0], fn)  # self._sql(<statement>): swaps '?' for '%s'
        if isinstance(func, ast.Attribute) and func.attr == "join" and len(node.args) == 1:
            return self.constant(func.value, fn) and self.constant(node.args[0], fn)
        if isinstance(func, ast.Attribute) and func.attr == "format" and _is_psycopg_sql(func.value):
            # psycopg's composition: sql.SQL("... {}").format(sql.Identifier(x)) quotes x as an identifier
            return all(_is_psycopg_identifier(a) for a in node.args) and not node.keywords
        if isinstance(func, ast.Attribute) and func.attr == "upper" and fn is not None:
            return self._checked_against_constants(func.value, fn)
        return False

    def _checked_against_constants(self, value: ast.expr, fn: ast.FunctionDef) -> bool:
        """``value.upper()`` is constant when ``fn`` raises unless it is in a tuple of literals."""
        wanted = ast.unparse(value) + ".upper()"
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Compare)
                and ast.unparse(node.test.left) == wanted
                and isinstance(node.test.ops[0], ast.NotIn)
                and self.constant(node.test.comparators[0], None)
                and any(isinstance(s, ast.Raise) for s in node.body)
            ):
                return True
        return False

    def _constant_name(self, name: str, fn: ast.FunctionDef | None) -> bool:
        if fn is not None:
            assigned = [
                n
                for n in ast.walk(fn)
                if (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
                or (
                    isinstance(n, ast.AnnAssign)
                    and isinstance(n.target, ast.Name)
                    and n.target.id == name
                    and n.value is not None
                )
            ]
            if assigned:
                appended = [
                    n.args[0]
                    for n in ast.walk(fn)
                    if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute)
                    and n.func.attr in ("append", "extend")
                    and isinstance(n.func.value, ast.Name)
                    and n.func.value.id == name
                ]
                return all(a.value is not None and self.constant(a.value, fn) for a in assigned) and all(
                    self.constant(a, fn) for a in appended
                )
            loops = [
                n
                for n in ast.walk(fn)
                if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and n.target.id == name
            ]
            if loops:
                return all(self.constant(loop.iter, fn) for loop in loops)
            if name in [a.arg for a in fn.args.args]:
                return self._constant_parameter(fn, name)
        return self.module_constant(name)

    def _constant_parameter(self, fn: ast.FunctionDef, name: str) -> bool:
        """A parameter is constant when every call of its function passes a constant for it."""
        position = [a.arg for a in fn.args.args].index(name) - 1  # after self
        calls = [
            n
            for n in ast.walk(self.tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == fn.name
        ]
        if not calls:
            return False
        for call in calls:
            given = {k.arg: k.value for k in call.keywords}
            arg = given.get(name) or (call.args[position] if position < len(call.args) else None)
            if arg is None or not self.constant(arg, self.function_of(call)):
                return False
        return True


def _is_psycopg_sql(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) == "sql.SQL"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
    )


def _is_psycopg_identifier(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "sql.Identifier"


def sql_calls(source: str) -> tuple[_Module, list[ast.Call]]:
    """Every ``execute``-like call outside the wrappers that only pass a statement on."""
    module = _Module(source)
    calls = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTE:
            fn = module.function_of(node)
            if fn is None or fn.name not in WRAPPERS:
                calls.append(node)
    return module, calls


def unsafe_statements(source: str) -> list[str]:
    """The execute calls whose statement might carry a value, or that use placeholders without values."""
    module, calls = sql_calls(source)
    problems = []
    for call in calls:
        if not call.args:
            problems.append(f"line {call.lineno}: execute without a statement")
            continue
        statement = call.args[0]
        fn = module.function_of(call)
        if not module.constant(statement, fn):
            problems.append(f"line {call.lineno}: {ast.unparse(statement)[:120]}")
        elif "?" in ast.unparse(statement) and len(call.args) < 2:
            problems.append(f"line {call.lineno}: placeholders but no parameters")
    return problems


def test_every_statement_in_the_store_is_built_from_constants() -> None:
    """Every execute call in sagas/_store.py gets a statement built from constants only; values always go
    as parameters."""
    source = STORE.read_text()
    _, calls = sql_calls(source)
    assert len(calls) >= 25  # the checker sees the store's statements (it would pass vacuously otherwise)
    assert unsafe_statements(source) == []


def test_no_other_module_runs_sql() -> None:
    """The store is the only module of the framework that executes SQL, so the check above covers it all."""
    others = [p for d in ("sagas", "transport") for p in (ROOT / d).rglob("*.py") if p != STORE]
    assert [str(p.relative_to(ROOT)) for p in others if sql_calls(p.read_text())[1]] == []


@pytest.mark.parametrize(
    "code",
    [
        "def f(self, key):\n    self._execute(f\"SELECT * FROM sagas WHERE key = '{key}'\")",
        "def f(self, key):\n    self._execute(\"SELECT * FROM sagas WHERE key = '%s'\" % key)",
        "def f(self, key):\n    self._execute(\"SELECT * FROM sagas WHERE key = '{}'\".format(key))",
        'def f(self, key):\n    self._execute("SELECT * FROM sagas WHERE key = \'" + key + "\'")',
        'def f(self, key):\n    q = "SELECT " + key\n    self._db.execute(q)',
        'def f(self, keys):\n    w = []\n    w.append(keys[0])\n    self._execute(" AND ".join(w))',
        'def f(self, s):\n    self._db.execute(f"PRAGMA synchronous={s.upper()}")',
        'def f(self, t):\n    self._db.execute(sql.SQL("SET search_path TO {}").format(sql.Literal(t)))',
        'def f(self, key):\n    self._execute("SELECT * FROM sagas WHERE key = ?")',
    ],
    ids=[
        "f-string",
        "percent",
        "format",
        "concatenation",
        "variable",
        "joined-values",
        "unchecked-pragma",
        "psycopg-literal",
        "placeholder-without-values",
    ],
)
def test_the_checker_catches_values_in_statements(code: str) -> None:
    """The static check flags a value formatted into a statement however it is done, and placeholders
    without parameters."""
    assert unsafe_statements(code) != []


# -- injection strings round trip ---------------------------------------------------------------------

INJECTIONS = [
    "x'; DROP TABLE sagas; --",
    "' OR '1'='1",
    '" OR ""="',
    "1); DELETE FROM inbox; --",
    "?",
    "%s",
    "%(x)s",
    "\\'; SELECT pg_sleep(10); --",
    "$1",
    "\u2019 OR 1=1 --",
    "a\nb\rc\td",
    "robert'); DROP TABLE outbox;--",
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[Store]:
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path}/inject.db")
        yield store
        store.close()
        return
    url: str = request.getfixturevalue("postgres_url")
    store = open_store(f"{url}?schema={unique}")
    yield store
    store.close()
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique)))


def test_injection_strings_are_stored_and_read_back_intact(sql_store: Store) -> None:
    """Sagas, history, inbox, reply-cache and outbox rows whose ids, types, keys, states, reasons and
    bodies are SQL-injection strings are stored and read back unchanged, found by exactly those values,
    and every table is still there afterwards."""
    now = time.time()
    ids = []
    for i, text in enumerate(INJECTIONS):
        record = SagaRecord(
            id=f"{text}#{i}",
            type=text,
            key=text,
            state=text,
            data={text: text},
            meta={"request": {"id": text}},
            created_at=now + i,
            updated_at=now + i,
            deadline=now - 1,
        )
        record.version = 1
        rows = sql_store.save_saga(
            record,
            expected_version=None,
            history=HistoryEntry(now, text, "-", text, text),
            inbox=(text, text),
            outbox=[Outgoing(text, text, text, mandatory=True)],
        )
        assert [(r.message_id, r.routing_key, r.body) for r in rows] == [(text, text, text)]
        sql_store.remember(f"consumer {text}", text)
        sql_store.cache_reply(text, text, text)
        ids.append(record.id)
    for i, text in enumerate(INJECTIONS):
        found = sql_store.get_saga(ids[i])
        assert found is not None
        assert (found.type, found.key, found.state, found.data, found.meta) == (
            text,
            text,
            text,
            {text: text},
            {"request": {"id": text}},
        )
        by_key = sql_store.find_saga(text, text)
        assert by_key is not None
        assert by_key.id == ids[i]
        assert [s.id for s in sql_store.list_sagas(saga_type=text, state=text)] == [ids[i]]
        assert [(h.message_id, h.to_state, h.reason) for h in sql_store.saga_history(ids[i])] == [(text, text, text)]
        assert sql_store.seen(f"saga-less {text}", text) is False
        assert sql_store.seen(text, text)
        assert sql_store.seen(f"consumer {text}", text)
        assert sql_store.cached_reply(text, text) == text
    assert sorted(r.id for r in sql_store.due_sagas(now, 100, types=INJECTIONS)) == sorted(ids)
    by_keys = sql_store.find_sagas([(text, text) for text in INJECTIONS])
    assert sorted(r.id for r in by_keys.values()) == sorted(ids)
    unsent = sql_store.unsent(created_before=time.time() + 1)
    assert sorted(r.routing_key for r in unsent) == sorted(INJECTIONS)
    sql_store.mark_sent([r.id for r in unsent])
    assert sql_store.unsent(created_before=time.time() + 1) == []
    assert len(sql_store.list_sagas()) == len(INJECTIONS)  # the sagas table is intact, nothing else matched
