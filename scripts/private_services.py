"""Private RabbitMQ nodes and PostgreSQL clusters, started beside the machine's own services. Standard library
only: the tests (``tests/conftest.py``), the fault drills (``scripts/drills.py``) and the 3-node cluster
(``scripts/rabbit_cluster.py``) all start and control their services with this module, so one private node
can be stopped, restarted or have its connections closed without touching the machine's RabbitMQ
(``rabbit@localhost`` on 5672) or PostgreSQL (5432).

- :class:`RabbitNode` describes one node: its name, AMQP and distribution ports, directory (configuration,
  data, logs) and the home that holds its Erlang cookie. It writes the node's files, launches
  ``rabbitmq-server`` and runs ``rabbitmqctl -n <node>``. :func:`private_rabbit_node` runs one for the
  length of a ``with`` block, on free ports and with an Erlang cookie of its own, so its ``rabbitmqctl``
  cannot even reach another node.
- :class:`PostgresCluster` is a cluster made with ``initdb`` in a folder of its own, run by ``pg_ctl`` on
  its own port on 127.0.0.1 with trust authentication (as the ``postgres`` user when run as root, since
  initdb refuses root). :func:`private_postgres` runs one for the length of a ``with`` block.

Both always stop what they started and delete its folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOT_TIMEOUT = float(os.environ.get("SAGAS_PRIVATE_BOOT_TIMEOUT", "120"))
CTL_TIMEOUT = 90.0


class ServiceError(RuntimeError):
    """A private service did not start, stop or answer as asked."""


# -- processes, ports and users ------------------------------------------------------------------------


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port on 127.0.0.1 nothing listens on: one the kernel picks, or one in ``[low, high)``."""
    if not low:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for port in random.sample(range(low, high), high - low):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServiceError(f"no free port in {low}..{high - 1}")


@dataclass(frozen=True)
class RunAs:
    """The user a service runs as (when we are root) and its home."""

    uid: int
    gid: int
    home: str

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess`` arguments that switch to this user (none when it is us)."""
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Give ``path`` and everything below it to this user (when we are root)."""
        if os.geteuid() != 0 or self.uid == 0:
            return
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, x) for x in dirs + files)]:
                os.chown(name, self.uid, self.gid)


def run_as(user: str) -> RunAs:
    """As root: the system user ``user`` (``rabbitmq``, ``postgres``). Otherwise, or without it: us."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(user)
            return RunAs(pw.pw_uid, pw.pw_gid, pw.pw_dir)
    return RunAs(os.getuid(), os.getgid(), os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until the processes exit; the ones still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def stop_process_group(proc: subprocess.Popen[bytes], term_wait: float = 30.0) -> None:
    """Stop a process we started in a session of its own, and its children: SIGTERM (a clean shutdown),
    then SIGKILL after ``term_wait`` seconds."""
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait  # children of the script (beam.smp) leave with it, or soon after
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _folder_with(tools: tuple[str, ...], candidates: list[str], missing: str) -> Path:
    """The first of the ``candidates`` folders that holds every one of ``tools``."""
    for c in candidates:
        if c and all((Path(c) / tool).exists() for tool in tools):
            return Path(c)
    raise ServiceError(missing)


def _installed(find: Callable[[], Path]) -> bool:
    try:
        find()
    except ServiceError:
        return False
    return True


# -- RabbitMQ -------------------------------------------------------------------------------------------


def rabbitmq_scripts() -> Path:
    """The directory with the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts. Debian's ``/usr/sbin``
    ones are wrappers that switch user and redirect output; the real ones are in ``/usr/lib/rabbitmq/bin``."""
    candidates = [os.environ.get("SAGAS_RABBITMQ_SBIN", ""), "/usr/lib/rabbitmq/bin"]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    return _folder_with(
        ("rabbitmq-server", "rabbitmqctl"),
        candidates,
        "rabbitmq-server is not installed (not on PATH, nor in /usr/lib/rabbitmq/bin)",
    )


def rabbitmq_installed() -> bool:
    return _installed(rabbitmq_scripts)


@dataclass(frozen=True)
class RabbitNode:
    """One RabbitMQ node: where it listens, where its files are, and whose Erlang cookie it uses.

    ``dir`` holds ``rabbitmq.conf`` (``conf`` adds lines to it), ``rabbitmq-env.conf`` (empty, so the
    machine's ``/etc/rabbitmq/rabbitmq-env.conf`` does not apply), an empty ``enabled_plugins``, and the
    ``mnesia`` and ``log`` folders. ``home`` is the node's and ``rabbitmqctl``'s ``HOME``: the cookie in it
    decides which nodes ``ctl`` can reach. ``erl_args`` go on the Erlang command line (e.g. a marker).
    """

    name: str
    port: int
    dist_port: int
    dir: Path
    home: str
    conf: str = ""
    erl_args: str = ""
    owner: RunAs | None = None
    user: str = "guest"
    password: str = field(default="guest", repr=False)

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        """The environment of ``rabbitmq-server`` and ``rabbitmqctl`` for this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "SAGAS_"))}
        d = self.dir
        env.update(
            {
                "HOME": self.home,
                "LC_ALL": env.get("LC_ALL", "C.UTF-8"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "beam.pid"),
                # Distribution on loopback only.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-kernel inet_dist_use_interface {{127,0,0,1}} {self.erl_args}",
            }
        )
        return env

    def write_files(self) -> None:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"# {self.name}: a private node (scripts/private_services.py)\n"
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n" + self.conf
        )
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management, no prometheus: nothing else listens
        (self.dir / "rabbitmq-env.conf").write_text("# empty: the node gets its settings from the environment\n")
        if self.owner is not None:
            self.owner.chown(self.dir)

    def launch(self) -> subprocess.Popen[bytes]:
        """Start ``rabbitmq-server`` in a session of its own (its output goes to ``server.out``)."""
        out = open(self.dir / "server.out", "ab")  # noqa: SIM115 - the node writes to it for its lifetime
        try:
            return subprocess.Popen(
                [str(rabbitmq_scripts() / "rabbitmq-server")],
                env=self.env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **(self.owner.popen_kwargs() if self.owner else {}),
            )
        finally:
            out.close()

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> args``; raise :class:`ServiceError` if it fails (with ``check``)."""
        cmd = [str(rabbitmq_scripts() / "rabbitmqctl"), "-n", self.name, *args]
        try:
            result = subprocess.run(
                cmd,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.home,
                check=False,
                **(self.owner.popen_kwargs() if self.owner else {}),
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"`rabbitmqctl -n {self.name} {' '.join(args)}` took over {timeout:.0f}s") from exc
        if check and result.returncode != 0:
            raise ServiceError(
                f"`rabbitmqctl -n {self.name} {' '.join(args)}` failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def await_listening(self, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Wait until the node listens for AMQP (its listener opens at the end of the boot)."""
        while not port_open(self.port):
            if proc is not None and proc.poll() is not None:
                raise ServiceError(f"{self.name} exited ({proc.returncode}) while booting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not listen on {self.port} in time:\n{self.tail()}")
            time.sleep(0.2)

    def await_booted(self, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Wait until the node listens and ``rabbitmqctl await_startup`` says it has booted."""
        self.await_listening(deadline, proc)
        self.ctl("await_startup", "--timeout", str(max(5, int(deadline - time.monotonic()))))

    def tail(self, lines: int = 25) -> str:
        """The end of the node's console output and log, for an error message."""
        parts = []
        for f in [self.dir / "server.out", *sorted((self.dir / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                text = f.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {f}\n" + "\n".join(text))
        return "\n".join(parts)


def machine_rabbit_node() -> RabbitNode:
    """The machine's own node (``rabbit@localhost``, 5672, the ``rabbitmq`` user's cookie), for the drills'
    ``--machine-services`` mode only: nothing in the test suite uses it."""
    owner = run_as("rabbitmq")
    return RabbitNode("rabbit@localhost", 5672, 25672, Path("/etc/rabbitmq"), owner.home, owner=owner)


@contextlib.contextmanager
def private_rabbit_node(
    prefix: str = "sagas-private",
    *,
    port: int = 0,
    dist_port: int = 0,
    prepare: Callable[[Path], str] | None = None,
) -> Iterator[RabbitNode]:
    """Run a node ``<prefix>-<random>@localhost`` in a temporary folder, on free ports (or the ones given),
    with an Erlang cookie of its own; yield it once it has booted; always stop it and delete the folder.
    ``prepare(dir)`` writes more files (certificates, definitions) before the node starts, and returns
    more lines for its ``rabbitmq.conf``."""
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        node = RabbitNode(
            f"{prefix}-{uuid.uuid4().hex[:6]}@localhost",
            port or free_port(),
            # rabbitmqctl listens on dist_port + 10000..10010 itself, so keep the distribution port low.
            dist_port or free_port(26000, 27000),
            d,
            home=str(d),  # the node makes its own Erlang cookie here
            conf=prepare(d) if prepare is not None else "",
        )
        node.write_files()
        proc = node.launch()
        node.await_booted(time.monotonic() + BOOT_TIMEOUT, proc)
        yield node
    finally:
        if proc is not None:
            stop_process_group(proc)
        shutil.rmtree(d, ignore_errors=True)


# -- PostgreSQL -----------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``SAGAS_PG_BIN``, the newest /usr/lib/postgresql/*/bin, or
    the one on PATH."""
    candidates = [os.environ.get("SAGAS_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    return _folder_with(("initdb", "pg_ctl"), candidates, "PostgreSQL's initdb and pg_ctl are not installed")


def postgres_installed() -> bool:
    return _installed(postgres_bin)


@dataclass(frozen=True)
class PostgresCluster:
    """A PostgreSQL cluster in ``dir`` (data in ``dir/data``, log in ``dir/postgres.log``, its Unix socket in
    ``dir``), listening on 127.0.0.1:``port`` with trust authentication for the user ``postgres``."""

    dir: Path
    port: int
    owner: RunAs

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        with open(self.dir / "pg_ctl.out", "ab") as out:
            result = subprocess.run(
                [str(postgres_bin() / tool), *args],
                env={**os.environ, "HOME": self.owner.home, "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                timeout=timeout,
                check=False,
                start_new_session=True,  # the postmaster does not get our terminal's signals
                **self.owner.popen_kwargs(),
            )
        if result.returncode != 0:
            raise ServiceError(f"`{tool} {' '.join(args)}` failed ({result.returncode}):\n{self.tail()}")

    def init(self) -> None:
        """``initdb``: an empty cluster, trust authentication, superuser ``postgres``."""
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def pg_ctl(self, command: str, *args: str) -> float:
        """``pg_ctl command`` on this cluster, waiting for it to finish; returns the seconds it took."""
        t0 = time.monotonic()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
        extra = ["-l", str(self.dir / "postgres.log"), "-o", options] if command in ("start", "restart") else []
        self._run("pg_ctl", command, "-D", str(self.dir / "data"), "-w", "-t", "90", *extra, *args)
        return time.monotonic() - t0

    def start(self) -> float:
        return self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> float:
        return self.pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> float:
        """``pg_ctl restart -m fast``: every session is closed, and the cluster answers again."""
        return self.pg_ctl("restart", "-m", mode)

    def running(self) -> bool:
        """Whether the postmaster of this cluster runs (``pg_ctl status``)."""
        try:
            self._run("pg_ctl", "status", "-D", str(self.dir / "data"), timeout=30)
        except ServiceError:
            return False
        return True

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def tail(self, lines: int = 25) -> str:
        parts = []
        for f in (self.dir / "pg_ctl.out", self.dir / "postgres.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


@contextlib.contextmanager
def private_postgres(prefix: str = "sagas-pg") -> Iterator[PostgresCluster]:
    """Run a cluster made by ``initdb`` in a temporary folder on a free port; yield it once it answers;
    always stop it (``pg_ctl stop -m immediate``, then SIGKILL) and delete the folder."""
    owner = run_as("postgres")
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    owner.chown(d)
    cluster = PostgresCluster(d, free_port(), owner)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        pid = cluster.postmaster_pid()
        if pid is not None and alive(pid):
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                cluster.stop("immediate")
            if wait_gone([pid], 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone([pid], 10)
        shutil.rmtree(d, ignore_errors=True)
