"""`sagas console`: a missing extra is a clear error, a bad --bind is refused, and binding elsewhere
than 127.0.0.1 without a token warns loudly."""

from __future__ import annotations

import builtins
import socket
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
    """Listening beyond localhost without a token prints a warning; the server gets a socket listening on
    the host and port."""
    host = bind.partition(":")[0]
    port = _free_port(host)
    served: list[tuple[str, int]] = []

    def serve(server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            served.append(sock.getsockname()[:2])
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    args = ["console", "--app", APP, "--store", _store(tmp_path), "--bind", f"{host}:{port}"]
    result = CliRunner().invoke(_cli.cli, args + (["--token", token] if token else []))
    assert result.exit_code == 0, result.output
    assert ("WARNING: the console listens on 0.0.0.0 without a token" in result.output) is warned
    assert served == [(host, port)]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_port_in_use_is_an_error_before_the_console_is_announced(tmp_path: Path) -> None:
    """A --bind address another program listens on is `error: ...`, exit 2, and the console is not
    announced (it printed its address, then uvicorn's own error, and exited 3)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        bind = f"127.0.0.1:{held.getsockname()[1]}"
        result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", _store(tmp_path), "--bind", bind])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: cannot listen on {bind}: address already in use (another console or program uses it; "
        "pick another with --bind)\n"
    )
    assert "sagas console on" not in result.output


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("127.0.0.1", "--bind takes host:port"),
        ("127.0.0.1:", "--bind takes host:port"),
        ("127.0.0.1:http", "--bind takes host:port"),
        ("127.0.0.1:0", "the port must be from 1 to 65535, not 0"),
        ("127.0.0.1:65536", "the port must be from 1 to 65535, not 65536"),
        ("no-such-host.invalid:8080", "the host 'no-such-host.invalid' does not resolve"),
    ],
)
def test_a_bad_bind_value_is_an_error(tmp_path: Path, bind: str, message: str) -> None:
    """No port, a port out of range, or a host that does not resolve: `error: ...`, exit 2, nothing served."""
    result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", _store(tmp_path), "--bind", bind])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert "sagas console on" not in result.output
    assert "WARNING" not in result.output


def test_a_store_that_cannot_be_opened_exits_2(tmp_path: Path) -> None:
    """A --store that names no store is `error: ...`, exit 2, before anything listens."""
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    result = CliRunner().invoke(_cli.cli, ["console", "--app", APP, "--store", missing])
    assert result.exit_code == 2, result.output
    assert "error: no SQLite store at" in result.output
    assert "sagas console on" not in result.output


def test_the_console_serves_on_the_socket_it_bound(tmp_path: Path) -> None:
    """`sagas console` as a process: it announces the address, then uvicorn serves the pages there."""
    import subprocess
    import time
    import urllib.request

    bind = f"127.0.0.1:{_free_port()}"
    args = ["console", "--app", APP, "--store", _store(tmp_path), "--bind", bind]
    proc = subprocess.Popen([sys.executable, "-m", "sagas", *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"sagas console on http://{bind} (read-only)\n"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{bind}/", timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the console did not answer"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
