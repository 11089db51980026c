#!/usr/bin/env python3
"""A three-node RabbitMQ cluster on this machine, beside the default node, for tests, drills and the
cluster recipe (docs/cluster-recipe.md). Standard library only.

    python scripts/rabbit_cluster.py start                 # sagas-c1..3@localhost on 5681..5683, clustered
    python scripts/rabbit_cluster.py status [--json]
    python scripts/rabbit_cluster.py url                   # the ';'-separated broker URL of the cluster
    python scripts/rabbit_cluster.py stop-node sagas-c1    # rabbitmqctl stop (--kill: SIGKILL, a crash)
    python scripts/rabbit_cluster.py start-node sagas-c1   # start it again; it rejoins the cluster
    python scripts/rabbit_cluster.py stop                  # stop every node, delete the base directory

Each node has its own name (``sagas-cN@localhost``), AMQP port (5680+N, on 127.0.0.1), distribution
port (25680+N), configuration file, empty enabled-plugins file (no management, no prometheus), and data
and log directories under the base directory (``SAGAS_CLUSTER_BASE``, default
``/tmp/sagas-rabbit-cluster``). When run as root, the nodes run as the ``rabbitmq`` user, so they
share its Erlang cookie (``~rabbitmq/.erlang.cookie``, the one the default node uses) and a plain
``rabbitmqctl -n sagas-c1@localhost ...`` reaches them. The default node (``rabbit@localhost``, 5672)
is never touched.

``start`` first stops whatever a previous run left (found by the marker ``-sagas_cluster <dir>`` on
each node's command line), then starts the three nodes at once, joins sagas-c2 and sagas-c3 to
sagas-c1 (``stop_app``, ``join_cluster``, ``start_app``) and waits until all three report running.
``stop`` leaves no process and no directory behind. Every command takes a lock, so two of them never
work on the cluster at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from private_services import (
    CTL_TIMEOUT,
    RabbitNode,
    RunAs,
    ServiceError,
    port_open,
    rabbitmq_installed,
    rabbitmq_scripts,
    run_as,
    wait_gone,
)

BASE = Path(os.environ.get("SAGAS_CLUSTER_BASE", "/tmp/sagas-rabbit-cluster"))  # noqa: S108 - a throwaway test cluster
FIRST_PORT = int(os.environ.get("SAGAS_CLUSTER_PORT", "5681"))
SIZE = 3
PREFIX = "sagas-c"
MARKER = "-sagas_cluster"
USER, PASSWORD = "guest", "guest"
BOOT_TIMEOUT = float(os.environ.get("SAGAS_CLUSTER_BOOT_TIMEOUT", "120"))


class ClusterError(ServiceError):
    pass


@dataclass(frozen=True)
class Node:
    index: int

    @property
    def short(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def name(self) -> str:
        return f"{self.short}@localhost"

    @property
    def port(self) -> int:
        return FIRST_PORT + self.index - 1

    @property
    def dist_port(self) -> int:
        return self.port + 20000

    @property
    def dir(self) -> Path:
        return BASE / self.short

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}"

    @property
    def rabbit(self) -> RabbitNode:
        """The node as :mod:`private_services` runs it: as the ``rabbitmq`` user, with its cookie, and the
        marker that lets ``stop`` find leftover nodes on its command line."""
        o = owner()
        return RabbitNode(
            self.name, self.port, self.dist_port, self.dir, o.home, erl_args=f"{MARKER} {self.dir}", owner=o
        )


NODES = [Node(i) for i in range(1, SIZE + 1)]


def node_named(name: str) -> Node:
    for node in NODES:
        if name in (node.name, node.short, str(node.index), str(node.port)):
            return node
    raise ClusterError(f"no node {name!r}: use one of {', '.join(n.short for n in NODES)}")


def broker_url() -> str:
    """The broker URL that lists every node, for ``--broker`` / ``SAGAS_BROKER_URL``."""
    return ";".join(n.url for n in NODES)


# -- the RabbitMQ installation and the user the nodes run as -----------------------------------------


def installed() -> bool:
    return rabbitmq_installed()


def owner() -> RunAs:
    """As root: the ``rabbitmq`` user (its home holds the cookie the default node uses). Otherwise: us."""
    return run_as("rabbitmq")


def ctl(node: Node, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl -n <node> args`` (as the nodes' user, with their cookie)."""
    return node.rabbit.ctl(*args, timeout=timeout, check=check)


# -- finding the nodes' processes --------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def node_pids(node: Node | None = None) -> dict[Path, int]:
    """The Erlang VMs of this cluster that run now (or of one node), by node directory: found by the
    marker on their command line, so nodes of a crashed run are found too."""
    found: dict[Path, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        for i, arg in enumerate(args[:-1]):
            if arg == MARKER:
                d = Path(args[i + 1])
                if d.parent == BASE and (node is None or d == node.dir):
                    found[d] = int(entry.name)
    return found


def _epmd_names() -> list[str] | None:
    epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
    try:
        r = subprocess.run([epmd, "-names"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    if r.returncode != 0:
        return None
    return [line.split()[1] for line in r.stdout.splitlines() if line.startswith("name ")]


# -- the commands ------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialise the commands of this script (one start, stop or stop-node at a time)."""
    path = BASE.with_name(BASE.name + ".lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _log(msg: str) -> None:
    print(f"[rabbit_cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _launch(node: Node) -> subprocess.Popen[bytes]:
    """Start the node's ``rabbitmq-server`` (a shell that runs the Erlang VM and outlives this script)."""
    return node.rabbit.launch()


def _parallel(fn: Any, nodes: list[Node]) -> None:
    errors: list[BaseException] = []

    def run(node: Node) -> None:
        try:
            fn(node)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _check_ports_free() -> None:
    busy = [f"{p}" for n in NODES for p in (n.port, n.dist_port) if port_open(p, 0.2)]
    if busy:
        raise ClusterError(
            f"port(s) {', '.join(busy)} are in use by something else; set SAGAS_CLUSTER_PORT to move the cluster"
        )


def _teardown() -> list[str]:
    """Stop every node of this cluster (leftovers of a crashed run included) and delete the base
    directory. Returns what was stopped."""
    state = _state()
    pids = node_pids()
    stopped = [d.name for d in pids]
    if pids:
        # The data is deleted below, so a graceful `rabbitmqctl stop` (a VM boot per node) buys nothing:
        # SIGTERM makes RabbitMQ shut down cleanly and fast; SIGKILL whatever hangs.
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        left = wait_gone(list(pids.values()), 30)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wait_gone(left, 10):
            raise ClusterError(f"could not stop the node processes {left}")
    if BASE.exists():
        shutil.rmtree(BASE)
    if state.get("epmd_started_here") and _epmd_names() == []:
        # The first node started epmd (nothing ran before it); nothing is registered now: stop it.
        subprocess.run([shutil.which("epmd") or "epmd", "-kill"], capture_output=True, timeout=10, check=False)
    return stopped


def _state() -> dict[str, Any]:
    try:
        return dict(json.loads((BASE / "cluster.json").read_text()))
    except (OSError, ValueError):
        return {}


def _save_state(state: dict[str, Any]) -> None:
    (BASE / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")


def start() -> dict[str, Any]:
    t0 = time.monotonic()
    rabbitmq_scripts()
    with locked():
        leftovers = _teardown()
        if leftovers:
            _log(f"stopped nodes a previous run left: {', '.join(leftovers)}")
        _check_ports_free()
        epmd_before = _epmd_names()
        BASE.mkdir(parents=True)
        for node in NODES:
            node.rabbit.write_files()
        owner().chown(BASE)
        _save_state(
            {
                "nodes": [n.name for n in NODES],
                "url": broker_url(),
                "base": str(BASE),
                "epmd_started_here": epmd_before is None,
            }
        )
        owner().chown(BASE)
        try:
            deadline = time.monotonic() + BOOT_TIMEOUT
            # All three boot at once (the boot is CPU-bound: about 6 s alone, 15 to 20 s for three on 2 cores).
            procs = {node: _launch(node) for node in NODES}
            _parallel(lambda n: n.rabbit.await_listening(deadline, procs[n]), NODES)
            first = NODES[0]
            first.rabbit.ctl("await_startup", "--timeout", str(max(5, int(deadline - time.monotonic()))))
            booted = time.monotonic() - t0
            _log(f"{len(NODES)} nodes booted in {booted:.1f}s; joining them to {first.name}")
            # One at a time, as RabbitMQ's docs do it; start_app returns once the node runs again.
            for node in NODES[1:]:
                ctl(node, "stop_app")
                ctl(node, "join_cluster", first.name)
                ctl(node, "start_app")
            running = running_nodes(first)
            if sorted(running) != sorted(n.name for n in NODES) or not all(port_open(n.port) for n in NODES):
                raise ClusterError(f"the cluster has running nodes {running}, expected all of {len(NODES)}")
        except BaseException:
            _log("start failed; stopping what started (the error shows the end of the logs)")
            with contextlib.suppress(Exception):
                _teardown()
            raise
        seconds = round(time.monotonic() - t0, 1)
        state = {**_state(), "start_seconds": seconds, "boot_seconds": round(booted, 1)}
        _save_state(state)
        _log(f"cluster of {', '.join(running)} running in {seconds}s")
        return state


def running_nodes(via: Node) -> list[str]:
    out = ctl(via, "cluster_status", "--formatter", "json", timeout=30).stdout
    return list(json.loads(out[out.index("{") :]).get("running_nodes", []))


def stop() -> list[str]:
    with locked():
        return _teardown()


def stop_node(node: Node, kill: bool = False) -> float:
    """Stop one node: ``rabbitmqctl stop`` (clients get connection.close), or with ``kill`` SIGKILL its VM
    (clients see the socket die). Returns the seconds it took until the process was gone."""
    with locked():
        t0 = time.monotonic()
        pids = node_pids(node)
        if not pids:
            raise ClusterError(f"{node.name} is not running")
        pid = next(iter(pids.values()))
        if kill:
            os.kill(pid, signal.SIGKILL)
        else:
            ctl(node, "stop")
        if wait_gone([pid], 30):
            raise ClusterError(f"{node.name} (pid {pid}) did not exit")
        return time.monotonic() - t0


def start_node(node: Node) -> float:
    """Start a stopped node again with its old data: it rejoins the cluster."""
    with locked():
        t0 = time.monotonic()
        if node_pids(node):
            raise ClusterError(f"{node.name} is already running")
        if not node.dir.exists():
            raise ClusterError(f"{node.dir} does not exist: run `start` first")
        node.rabbit.await_booted(time.monotonic() + BOOT_TIMEOUT, _launch(node))
        return time.monotonic() - t0


def status() -> dict[str, Any]:
    pids = node_pids()
    nodes = []
    for node in NODES:
        nodes.append(
            {
                "name": node.name,
                "amqp_port": node.port,
                "dist_port": node.dist_port,
                "pid": pids.get(node.dir),
                "amqp_listening": port_open(node.port),
            }
        )
    running: list[str] = []
    for node in NODES:
        if pids.get(node.dir) and port_open(node.port):
            with contextlib.suppress(ServiceError, ValueError):
                running = running_nodes(node)
                break
    return {
        "base": str(BASE),
        "url": broker_url(),
        "nodes": nodes,
        "running_nodes": running,
        "start_seconds": _state().get("start_seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start the cluster (stopping a leftover one first)")
    sub.add_parser("stop", help="stop every node and delete the base directory")
    st = sub.add_parser("status", help="which nodes run, and the cluster's running nodes")
    st.add_argument("--json", action="store_true")
    sub.add_parser("url", help="print the broker URL with every node")
    sn = sub.add_parser("stop-node", help="stop one node (rabbitmqctl stop, or --kill for SIGKILL)")
    sn.add_argument("node", help="sagas-c1, sagas-c1@localhost, 1 or 5681")
    sn.add_argument("--kill", action="store_true", help="SIGKILL the node's VM instead (a crash)")
    rn = sub.add_parser("start-node", help="start a stopped node again; it rejoins the cluster")
    rn.add_argument("node")
    a = p.parse_args(argv)
    try:
        if a.command == "start":
            state = start()
            print(state["url"])
        elif a.command == "stop":
            stopped = stop()
            _log(f"stopped {', '.join(stopped) if stopped else 'nothing (no node was running)'}; {BASE} removed")
        elif a.command == "status":
            s = status()
            if a.json:
                print(json.dumps(s, indent=2))
            else:
                for n in s["nodes"]:
                    running = f"pid {n['pid']}" if n["pid"] else "not running"
                    print(
                        f"{n['name']:<22} amqp 127.0.0.1:{n['amqp_port']}  {running}"
                        f"{'  listening' if n['amqp_listening'] else ''}"
                    )
                print(f"running nodes of the cluster: {', '.join(s['running_nodes']) or 'none'}")
                print(f"broker URL: {s['url']}")
            return 0 if s["running_nodes"] else 1
        elif a.command == "url":
            print(broker_url())
        elif a.command == "stop-node":
            node = node_named(a.node)
            seconds = stop_node(node, kill=a.kill)
            _log(f"{node.name} {'killed' if a.kill else 'stopped'} in {seconds:.1f}s")
        elif a.command == "start-node":
            node = node_named(a.node)
            seconds = start_node(node)
            _log(f"{node.name} started again in {seconds:.1f}s")
    except ServiceError as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
