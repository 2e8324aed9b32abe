"""Reliability: kernels and hosts without what the agent needs. For `tracefleet-agent probe`
and `capture`, each missing piece is produced for real around the agent process only:

* no BTF: a private mount namespace (``unshare -m``) with a tmpfs over /sys/kernel/btf;
* tracefs not mounted: the same with tmpfs over /sys/kernel/tracing and /sys/kernel/debug;
* BPF disabled: bpf() denied by a seccomp filter (EPERM, as container runtimes' default
  profiles do; ENOSYS, as a kernel without CONFIG_BPF_SYSCALL answers), and every
  capability dropped (``setpriv``), each checked first to really make bpf() fail.

Each either exits 3 with a one-line cause, a fix and the degradation (none possible), or,
for tracefs with CAP_SYS_ADMIN, degrades: the agent mounts tracefs in a mount namespace of
its own, says so, and captures; the namespace around it is left as it was.

Not covered: lockdown refusing a hook (switching lockdown on is irreversible until reboot,
on a machine shared with other work).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, require_root, scaled

pytestmark = [pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
DENY = [sys.executable, str(Path(__file__).with_name("deny_syscall.py"))]
EXIT_HOST = 3
BPF_ERRNO = [sys.executable, "-c", "from tracefleet.agent.kernel.hostcheck import "
             "bpf_syscall_errno as f; print(f())"]  # fmt: skip
# a private mount namespace: hide PATHS ($1) with tmpfs, run the rest, then report what the
# namespace shows at the first path (so a test sees the agent did not mount into it)
HIDE = (
    'for p in $1; do mount -t tmpfs tf-hide "$p" || exit 90; done; first=${1%% *}; shift; '
    '"$@"; rc=$?; echo "entries-after=$(ls -A "$first" | wc -l)" >&2; exit $rc'
)
COMMANDS = {
    "probe": ["probe"],
    "capture": ["capture", "-e", "file", "--duration", "1", "--metrics-listen", "off"],
}


@pytest.fixture(autouse=True)
def _needs():
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("BPF objects not built: run `make bpf`")
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (util-linux)")


def hidden(paths: list[str], cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", HIDE, "sh", " ".join(paths),
         *cmd],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def refusal(r: subprocess.CompletedProcess, cause: str) -> list[str]:
    """The agent's refusal: exit 3, three lines (cause, fix, degradation), no traceback."""
    err = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("entries-after="))
    assert "Traceback" not in err, err
    assert r.returncode == EXIT_HOST, (r.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("tracefleet-agent: ") and cause in lines[0], lines[0]
    assert lines[1].startswith("  fix: ") and len(lines[1]) > len("  fix: "), lines[1]
    assert lines[2] == (
        "  degradation: none possible: every capture strategy needs it, so the agent exits "
        "(status 3) without loading anything"
    ), lines[2]
    assert r.stdout == "", r.stdout  # probe printed no report, capture no event
    return lines


def kconfig(option: str) -> str | None:
    from tracefleet.agent.kernel.hostcheck import kernel_config

    return kernel_config(option)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_btf(command: str):
    r = hidden(["/sys/kernel/btf"], [*AGENT, *COMMANDS[command]])
    if kconfig("CONFIG_DEBUG_INFO_BTF") == "y":
        cause = (
            "/sys/kernel/btf/vmlinux is missing although this kernel is built with "
            "CONFIG_DEBUG_INFO_BTF=y: /sys is not the host's"
        )
    else:
        cause = "/sys/kernel/btf/vmlinux is missing: this kernel has no BTF"
    lines = refusal(r, cause)
    assert "Mount the host's /sys/kernel/btf" in lines[1] or "CONFIG_DEBUG_INFO_BTF=y" in lines[1]
    print(f"\nHOSTCHECK no BTF ({command}): exit {r.returncode}\n" + "\n".join(lines))


def test_tracefs_unmounted_probe_degrades_to_a_private_mount():
    before = Path("/proc/self/mountinfo").read_text()
    r = hidden(["/sys/kernel/tracing", "/sys/kernel/debug"], [*AGENT, "probe"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["features"]["tracefs_mounted_by_agent"] is True
    assert report["features"]["tracefs"] == "/sys/kernel/tracing"
    assert all(s["strategy"] for s in report["event_sets"].values()), report["event_sets"]
    assert (
        "tracefleet-agent: degraded: tracefs was not mounted; the agent mounted it at "
        "/sys/kernel/tracing in a mount namespace of its own" in r.stderr
    ), r.stderr
    # the namespace the agent ran in still has only the tmpfs there; the host is unchanged
    assert "entries-after=0" in r.stderr, r.stderr
    assert Path("/proc/self/mountinfo").read_text().count("tracefs") == before.count("tracefs")
    print(f"\nHOSTCHECK tracefs hidden (probe): exit 0, {r.stderr.splitlines()[0]}")


def test_tracefs_unmounted_capture_degrades_and_captures(tmp_path: Path):
    ready = tmp_path / "ready"
    marker = str(tmp_path / f"tf-hostcheck-{time.monotonic_ns()}")
    cmd = [*AGENT, "capture", "-e", "file", "--pid", str(os.getpid()),
           "--metrics-listen", "off", "--ready-file", str(ready)]  # fmt: skip
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", HIDE, "sh",
         "/sys/kernel/tracing /sys/kernel/debug", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # the load takes minutes under emulation: a deadline scaled to the machine, and the agent
    # (its pid is in the ready file) stopped only once the opens are made
    deadline = time.monotonic() + scaled(120)
    while not (ready.exists() and ready.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "capture never became ready"
        time.sleep(0.05)
    for _ in range(50):
        with open(marker, "w"):
            pass
    os.unlink(marker)
    os.kill(int(ready.read_text()), signal.SIGINT)
    out, err = proc.communicate(timeout=scaled(120))
    assert proc.returncode == 0, err
    assert "degraded: tracefs was not mounted" in err, err
    assert "capturing file with" in err, err
    assert "entries-after=0" in err, err
    paths = [
        a.get("value")
        for ev in map(json.loads, out.splitlines())
        for a in ev["args"].values()
        if isinstance(a, dict)
    ]
    assert paths.count(marker) >= 50, (paths.count(marker), err)
    print(f"\nHOSTCHECK tracefs hidden (capture): exit 0, {paths.count(marker)} opens captured")


def test_tracefs_unmounted_without_cap_sys_admin_is_refused():
    r = hidden(
        ["/sys/kernel/tracing", "/sys/kernel/debug"],
        ["setpriv", "--bounding-set=-sys_admin", *AGENT, "probe"],
    )
    lines = refusal(r, "tracefs is not mounted (neither /sys/kernel/tracing nor")
    assert "unshare(CLONE_NEWNS): Operation not permitted" in lines[0], lines[0]
    assert "mount -t tracefs tracefs /sys/kernel/tracing" in lines[1]
    print(f"\nHOSTCHECK tracefs hidden, no CAP_SYS_ADMIN: exit {r.returncode}\n" + "\n".join(lines))


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("err", ["EPERM", "ENOSYS"])
def test_bpf_syscall_denied_by_seccomp(command: str, err: str):
    premise = subprocess.run([*DENY, "bpf", err, "--", *BPF_ERRNO], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert premise.stdout.strip() == str(getattr(errno, err)), premise
    r = subprocess.run([*DENY, "bpf", err, "--", *AGENT, *COMMANDS[command]],
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    if err == "EPERM":
        cause = "the bpf() system call is refused (EPERM: Operation not permitted) although"
    elif kconfig("CONFIG_BPF_SYSCALL") == "y":
        cause = "the bpf() system call is not available (ENOSYS): a seccomp filter answers ENOSYS"
    else:
        cause = "the bpf() system call is not available (ENOSYS)"
    lines = refusal(r, cause)
    assert "seccomp" in lines[1]
    print(
        f"\nHOSTCHECK bpf() {err} by seccomp ({command}): exit {r.returncode}\n" + "\n".join(lines)
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_capability_dropped(command: str):
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    premise = subprocess.run([*drop, *BPF_ERRNO], capture_output=True, text=True, timeout=60)
    assert premise.stdout.strip() == str(errno.EPERM), premise  # bpf() really fails
    r = subprocess.run([*drop, *AGENT, *COMMANDS[command]], capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    lines = refusal(r, "missing privileges: loading tracing BPF programs needs CAP_BPF and")
    assert "this process has none" in lines[0], lines[0]
    print(f"\nHOSTCHECK capabilities dropped ({command}): exit {r.returncode}\n" + "\n".join(lines))
