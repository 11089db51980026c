"""The worker process's garbage-collector settings (sagas.tune_gc, applied by `sagas run`)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from click.testing import CliRunner

from sagas._cli import cli
from sagas._gc import YOUNG_THRESHOLD
from sagas._worker import Worker


def test_tune_gc_freezes_what_is_alive_and_collects_the_young_generation_less_often() -> None:
    # (in a child: the settings are process-wide, and this one runs the other tests)
    code = (
        "import gc, sagas\n"
        "before = gc.get_threshold()\n"
        "sagas.tune_gc()\n"
        "print(before[0], gc.get_threshold()[0], gc.get_threshold()[1:] == before[1:], gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["700", str(YOUNG_THRESHOLD), "True", "True"]


@pytest.mark.parametrize(("flag", "tuned"), [([], 1), (["--no-gc-tuning"], 0)])
def test_sagas_run_tunes_the_gc_once_the_app_is_loaded_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, flag: list[str], tuned: int
) -> None:
    calls: list[str] = []

    def run(self: Worker, **kwargs: Any) -> int:
        calls.append("run")
        return 0

    monkeypatch.setattr("sagas._gc.tune_gc", lambda: calls.append("tune"))
    monkeypatch.setattr(Worker, "run", run)
    app = "sagas.examples.notifications:app"
    result = CliRunner().invoke(cli, ["run", app, "--broker", "memory://", "--store", "memory://", *flag])
    assert result.exit_code == 0, result.output
    assert calls == ["tune"] * tuned + ["run"]
