"""`make demo`: a controller and a local agent on this machine, and a live capture.

Starts tracefleet-controller on loopback, a real tracefleet-agent (root, real BPF) that
dials it, enables the file, exec and net event sets through the `tracefleet` CLI, runs
workloads whose arguments sit in pages that are not resident (the cases other tracers
report empty), and streams the captured events. Ends with `tracefleet status` and `top`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKLOADS = REPO / "build" / "workloads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def cli(addr: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "tracefleet"), "--controller", addr, *args],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    if check and out.returncode != 0:
        raise SystemExit(f"tracefleet {' '.join(args)} failed: {out.stderr.strip()}")
    return out


@contextlib.contextmanager
def daemon(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_node(addr: str, node: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cli(addr, "-o", "json", "status", check=False)
        if out.returncode == 0:
            for n in json.loads(out.stdout).get("nodes", []):
                if n.get("name") == node and n.get("connected", True):
                    return n
        time.sleep(0.5)
    raise SystemExit(f"agent {node} did not register within {timeout:.0f}s")


def run_workloads() -> None:
    for args in (["openat"], ["einval"], ["openat2"], ["connect"], ["exec"]):
        subprocess.run([str(WORKLOADS / "cold_rodata"), *args, "--hold-ms", "200"],
                       stdout=subprocess.DEVNULL, check=False)  # fmt: skip
    subprocess.run([str(WORKLOADS / "cold_filemap"), "--count", "5"],
                   stdout=subprocess.DEVNULL, check=False)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--seconds", type=float, default=8, help="how long to stream events")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: the agent loads BPF programs: run it as root", file=sys.stderr)
        return 3
    if not (WORKLOADS / "cold_rodata").exists():
        print("demo: workloads missing: run `make workloads`", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tracefleet-demo-"))
    # root only: the socket is 0660 root:tracefleet. In /run, not TMPDIR: a unix socket's
    # path holds at most 107 bytes, and TMPDIR can be deep (a test's tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="tf-demo-", dir="/run"))
    addr = f"unix:{sock_dir}/controller.sock"
    node = socket.gethostname()
    say(f"controller on {addr} (state in {tmp}/controller.db, logs in {tmp})")
    ctl_cmd = [str(BIN / "tracefleet-controller"), "--listen", addr, "--db",
               str(tmp / "controller.db"), "--stale-after", "5"]  # fmt: skip
    agent_cmd = [str(BIN / "tracefleet-agent"), "run", "--controller", addr, "--node", node,
                 "--labels", "role=demo"]  # fmt: skip
    try:
        with daemon(ctl_cmd, tmp / "controller.log"), daemon(agent_cmd, tmp / "agent.log"):
            say(f"agent {node} (role=demo) probing the kernel and dialing the controller")
            n = wait_for_node(addr, node)
            print(json.dumps({k: n[k] for k in n if k in ("name", "kernel", "strategies")},
                             indent=2))  # fmt: skip
            for es in ("file", "exec", "net"):
                say(f"tracefleet enable {es} --selector role=demo --ttl 5m --wait")
                print(cli(addr, "enable", es, "--selector", "role=demo", "--ttl", "5m",
                          "--wait").stdout.strip())  # fmt: skip
            say("streaming events; running cold-page workloads (args in non-resident pages)")
            follow = subprocess.Popen(
                [str(BIN / "tracefleet"), "--controller", addr, "events", "--follow"],
                stdout=None,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(2.5)  # the controller grants the agents a sampling lease
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                run_workloads()
                time.sleep(1.0)
            follow.terminate()
            follow.wait(timeout=10)
            say("tracefleet status")
            print(cli(addr, "status").stdout)
            say("tracefleet top")
            print(cli(addr, "top").stdout)
            for es in ("file", "exec", "net"):
                cli(addr, "disable", es)
            say("disabled again; shutting down")
    finally:
        if os.environ.get("TRACEFLEET_DEMO_KEEP"):
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
