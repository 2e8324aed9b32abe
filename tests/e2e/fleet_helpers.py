"""Real processes on loopback: a tracefleet-controller, simulated agents (SyntheticEngine via
the load generator), and the tracefleet CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import LOADGEN, wait_until
from tests.ports import free_port

PY = sys.executable
# the emulated guest is ~10x slower (more on a busy host): importing grpc alone, for the
# controller or one CLI call, can take 30 s there
SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1


class ControllerProc:
    def __init__(
        self,
        tmp: Path,
        port: int | None = None,
        stale_after: float = 2.0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.extra_args = list(extra_args or [])
        self.db = tmp / "controller.db"
        self.log = tmp / "controller.log"
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.stale_after = stale_after
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ControllerProc:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    PY, "-m", "tracefleet.controller.server", "--listen", self.address,
                    "--insecure-listen", "--db", str(self.db),
                    "--stale-after", str(self.stale_after),
                    "--window", "5", *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return "listening on" in self.log.read_text()[offset:]

        wait_until(ready, 30 * SLOW, "controller to listen")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


class AgentProc:
    """One or more simulated agents in one load-generator process."""

    def __init__(
        self, tmp: Path, controller: str, name: str, labels: str = "", agents: int = 1, roles=""
    ) -> None:
        self.name = name
        self.stats_file = tmp / f"agent-{name}.json"
        self.log = tmp / f"agent-{name}.log"
        self.cmd = [
            PY, str(LOADGEN), "--controller", controller,
            "--agents", str(agents), "--name", name, "--labels", labels, "--roles", roles,
            "--interval", "0.2", "--backoff-max", "1", "--rate", "200",
            "--stats-file", str(self.stats_file), "--log-level", "INFO",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        if self.stats_file.exists():
            self.stats_file.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stats(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.stats_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """SIGTERM (a clean shutdown flushes what the process holds), SIGKILL after timeout."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cli(controller: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tracefleet.controller.operator.cli", "--controller", controller, *args],
        capture_output=True,
        text=True,
        timeout=timeout * SLOW,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def cli_json(controller: str, *args: str) -> Any:
    r = cli(controller, *args, "-o", "json")
    assert r.returncode == 0, f"tracefleet {' '.join(args)}: rc={r.returncode} {r.stderr}"
    return json.loads(r.stdout)


def status(controller: str) -> dict[str, Any]:
    return cli_json(controller, "status")


def nodes_by_name(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in st["nodes"]}


def enabled_sets(node: dict[str, Any]) -> set[str]:
    return {s["name"] for s in node["statuses"] if s["enabled"] and s["attached"]}


class ClientThread:
    """A ControlClient running in a thread of the test process until stop()."""

    def __init__(self, client: Any) -> None:
        import threading

        self.client = client
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            stop = asyncio.Event()

            async def watch() -> None:
                while not self.stop_event.is_set():
                    await asyncio.sleep(0.1)
                stop.set()

            w = asyncio.create_task(watch())
            await self.client.run(stop)
            w.cancel()

        asyncio.run(main())

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
