"""/readyz of ``sagas run --metrics-port`` follows the broker: on the session's private RabbitMQ node
(tests/conftest.py), stopping the node's app turns the worker not ready within 5 s, and starting it again
turns it ready once the worker has reconnected; /livez stays 200 all along (a reconnecting worker is not
a hung one)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import drillkit as kit  # scripts/ is on the path (tests/conftest.py)
import pytest
from private_services import RabbitNode

from tests.sagas.test_metrics import _delete_topology, _free_port, _ok, _start, _stop, get, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_readyz_turns_not_ready_when_the_broker_stops_and_ready_when_it_returns(
    private_rabbit: RabbitNode, tmp_path: Path, unique: str
) -> None:
    url = private_rabbit.url
    port = _free_port()
    proc = _start(url, unique, tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(f"{base}/readyz"), 30, "the worker to be ready")
        stopping = threading.Thread(target=private_rabbit.ctl, args=("stop_app",))
        t0 = time.monotonic()
        stopping.start()
        try:
            wait_for(lambda: get(f"{base}/readyz")[0] == 503, 5, "/readyz to turn 503 within 5 s")
            not_ready_after = time.monotonic() - t0
            assert get(f"{base}/livez")[0] == 200
            assert "broker" in get(f"{base}/readyz")[1]
        finally:
            stopping.join(60)
            private_rabbit.ctl("start_app")
            kit.await_broker(private_rabbit, url)
        t1 = time.monotonic()
        wait_for(lambda: _ok(f"{base}/readyz"), 45, "/readyz to turn 200 again")
        ready_after = time.monotonic() - t1
        assert get(f"{base}/livez")[0] == 200
        metrics = get(f"{base}/metrics")[1]
        assert "sagas_broker_reconnects_total 1.0" in metrics
        print(f"not ready {not_ready_after:.2f}s after stop_app; ready {ready_after:.2f}s after the broker answered")
    finally:
        _stop(proc)
        if kit.broker_answers(url):
            _delete_topology(url, unique)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
