"""Running ``python -m sagas`` in a subprocess and reading what it writes, with timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """A ``sagas`` subprocess whose stdout and stderr are read by threads, so waiting never blocks."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sagas", "--log-level", "debug", *args],
            cwd=cwd,
            env={**clean, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Iterable[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Wait until ``text`` appears in the output; fail with the output if it does not, or if the process
        exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reading()):
                raise AssertionError(f"{text!r} did not appear (exit {self.proc.poll()}):\n{self.output}")
            time.sleep(0.02)

    def _reading(self) -> bool:
        return any(r.is_alive() for r in self._readers)

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the process to exit (killing it after ``timeout``); its exit code and all it wrote."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the command did not finish in {timeout}s:\n{self.output}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code, self.output

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then :meth:`finish`."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.finish()
