"""Controller processes on a unix socket, unprivileged callers (setpriv to nobody) and a
hand-written agent, for the trust-boundary tests (issue 15)."""

from __future__ import annotations

import grp
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import require_root, wait_until
from tests.e2e.fleet_helpers import PY
from tracefleet.v1 import agent_pb2, agent_pb2_grpc


def make_groups() -> Iterator[tuple[str, str]]:
    require_root()
    tag = secrets.token_hex(3)
    names = (f"tft-adm-{tag}", f"tft-read-{tag}")
    for n in names:
        subprocess.run(["groupadd", n], check=True)
    try:
        yield names
    finally:
        for n in names:
            subprocess.run(["groupdel", n], check=False)


def make_sockdir() -> Iterator[Path]:
    # not under pytest's 0700 tmp: the unprivileged callers must reach the socket's directory
    d = Path(tempfile.mkdtemp(prefix="tf-sock-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_controller(d: Path, groups: tuple[str, str], *extra: str) -> subprocess.Popen[str]:
    path = d / "controller.log"
    offset = path.stat().st_size if path.exists() else 0
    log = open(path, "a")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        [PY, "-m", "tracefleet.controller.server", "--listen", f"unix:{d}/ctl.sock",
         "--db", str(d / "c.db"), "--admin-group", groups[0], "--read-group", groups[1],
         *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def ready() -> bool:
        assert proc.poll() is None, path.read_text()
        return "listening on" in path.read_text()[offset:]

    wait_until(ready, 60, "controller to listen")
    return proc


def as_user(*argv: str, group: str = "") -> list[str]:
    """argv run as nobody, with only ``group`` as supplementary group (or none)."""
    g = ["--groups", str(grp.getgrnam(group).gr_gid)] if group else ["--clear-groups"]
    return ["setpriv", "--reuid", "nobody", "--regid", "nogroup", *g, *argv]


def tf(d: Path, *args: str, group: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [
        PY,
        "-m",
        "tracefleet.controller.operator.cli",
        "--controller",
        f"unix:{d}/ctl.sock",
        *args,
    ]
    if group is not None:
        cmd = as_user(*cmd, group=group)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class RawAgent:
    """A hand-written agent on the admin socket: sends whatever the test wants."""

    def __init__(self, address: str, node: str, register: agent_pb2.Register | None = None):
        self.out: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        self.received: queue.Queue[agent_pb2.ControllerMessage | None] = queue.Queue()
        self.error: grpc.RpcError | None = None
        # 64 MiB: a hostile agent's messages are large
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        reg = register or agent_pb2.Register(node_name=node, instance_id="raw-1")
        self.out.put(agent_pb2.AgentMessage(register=reg))
        self.call = agent_pb2_grpc.AgentServiceStub(self.channel).Connect(self._requests())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _requests(self) -> Iterator[agent_pb2.AgentMessage]:
        while (m := self.out.get()) is not None:
            yield m

    def _read(self) -> None:
        try:
            for m in self.call:
                self.received.put(m)
        except grpc.RpcError as e:
            self.error = e
        self.received.put(None)  # the stream ended

    def wait_for(self, kind: str, timeout: float) -> agent_pb2.ControllerMessage:
        while True:
            m = self.received.get(timeout=timeout)
            assert m is not None, f"stream ended: {self.error}"
            if m.WhichOneof("kind") != kind:
                continue
            if kind != "sample_request" or m.sample_request.lease.seconds:  # not a stop
                return m

    def wait_closed(self, timeout: float) -> grpc.RpcError | None:
        """Wait until the controller ends the stream; its error (None: ended cleanly)."""
        while self.received.get(timeout=timeout) is not None:
            pass
        return self.error

    def close(self) -> None:
        self.out.put(None)
        self.call.cancel()
        self.channel.close()


# Fixtures of the security tests (made available to tests/e2e by its conftest.py)


@pytest.fixture
def groups() -> Iterator[tuple[str, str]]:
    """(admin, read) groups made for the test, deleted after (root)."""
    yield from make_groups()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A world-reachable directory for the controller's sockets, removed after."""
    yield from make_sockdir()
