"""`sagas console`: a missing extra is a clear error, a bad --bind is refused, and binding elsewhere
than 127.0.0.1 without a token warns loudly."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner

from sagas import _cli
from sagas._store import open_store

APP = "examples.postprocessing:app"


def _store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'sagas.db'}"
    open_store(url).close()
    return url


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the console extra, the command says which extra to install, exit 2."""
    real_import = builtins.__import__

    def no_starlette(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in {"uvicorn", "starlette"} or name.startswith("starlette."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "uvicorn", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_starlette)
    result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", _store(tmp_path)])
    assert result.exit_code == 2
    assert "error: the console needs: pip install 'kombu-sagas[console]'" in result.output


def test_a_bad_bind_is_refused(tmp_path: Path) -> None:
    """--bind takes host:port."""
    result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", _store(tmp_path), "--bind", "nope"])
    assert result.exit_code == 2
    assert "--bind takes host:port" in result.output


@pytest.mark.parametrize(
    ("bind", "token", "warned"),
    [("0.0.0.0:8080", None, True), ("0.0.0.0:8080", "t", False), ("127.0.0.1:8080", None, False)],
)
def test_binding_elsewhere_without_a_token_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bind: str, token: str | None, warned: bool
) -> None:
    """Listening beyond localhost without a token prints a warning; the server gets the host and port."""
    served: list[tuple[str, int]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.append((host, port)))
    args = ["console", "--app", APP, "--store", _store(tmp_path), "--bind", bind]
    result = CliRunner().invoke(_cli.cli, args + (["--token", token] if token else []))
    assert result.exit_code == 0, result.output
    assert ("WARNING: the console listens on 0.0.0.0 without a token" in result.output) is warned
    host, _, port = bind.partition(":")
    assert served == [(host, int(port))]


def test_a_store_that_cannot_be_opened_exits_2(tmp_path: Path) -> None:
    """A --store that names no store is `error: ...`, exit 2, before anything listens."""
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", missing])
    assert result.exit_code == 2, result.output
    assert "error: no SQLite store at" in result.output
    assert "sagas console on" not in result.output
