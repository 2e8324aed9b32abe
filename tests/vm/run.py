#!/usr/bin/env python3
"""Run tracefleet's BPF and end-to-end suites inside a Linux guest under qemu.

`make test-vm KERNEL=7.2` calls `tests/vm/run.py --kernel 7.2`. The guest boots the chosen
kernel with the host's root file system exported read-only over virtiofs (the same Python,
.venv and build outputs as the host), runs pytest from tests/vm/init.sh as PID 1, and prints
the junit XML (base64) and pytest's exit status on the serial console between markers. This
script parses them, prints a per-test summary, writes build/vm/junit-<kernel>.xml and
exits with the guest's pytest status. See tests/vm/README.md.

Exit status: pytest's own (0-5) when the guest reported one; otherwise 69 (qemu, virtiofsd
or the kernel is missing), 77 (not root), 70 (the guest crashed, or never reported),
124 (timeout), 130 (interrupted).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

REPO_ROOT = Path(__file__).resolve().parents[2]
INIT_SCRIPT = Path(__file__).resolve().parent / "init.sh"
DEFAULT_TESTS = ("tests/bpf", "tests/e2e")
# The BPF suite alone takes ~25 min under TCG (2026-11: 55 tests, ~25 s each): 20 min is short.
DEFAULT_TIMEOUT_S = 45 * 60
POWEROFF_GRACE_S = 30.0
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")
QEMU = "qemu-system-x86_64"
FIX_HINT = (
    "fix: run deploy/host/install-deps.sh as root (or `make deps`; it installs "
    "qemu-system-x86 and busybox-static), then re-run"
)

EXIT_UNAVAILABLE = 69  # qemu/virtiofsd/kernel/.venv missing
EXIT_GUEST_FAILED = 70  # guest crashed, hung up, or never reported a status
EXIT_NOPERM = 77  # not root
EXIT_TIMEOUT = 124
PYTEST_NO_TESTS = 5  # pytest's exit status when no test was selected
EXIT_INTERRUPTED = 130

# Host mount points not exported to the guest: it mounts its own kernel file systems there.
# Ad-hoc mounts (/mnt, /media) are not needed by the tests either.
EXCLUDED_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/mnt", "/media")
PSEUDO_FSTYPES = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "tracefs", "debugfs",
        "bpf", "securityfs", "pstore", "mqueue", "hugetlbfs", "configfs", "fusectl",
        "binfmt_misc", "autofs", "efivarfs", "nsfs", "rpc_pipefs", "selinuxfs",
    }
)  # fmt: skip


class RunnerError(Exception):
    """A failure before or around the guest, with the exit status to use."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """SIGINT or SIGTERM: clean up and exit 130."""


# --------------------------------------------------------------------------------------------
# Kernel resolution (pure apart from reading files)


@dataclass(frozen=True)
class KernelSpec:
    """Where the guest kernel comes from: a Debian package to unpack, or a bzImage."""

    kind: str  # "deb" or "vmlinuz"
    path: Path
    label: str  # used in file names: build/vm/junit-<label>.xml


_DEB_NAME = re.compile(r"^(?P<pkg>[^_]+)_(?P<version>[^_]+)_(?P<arch>[^_.]+)\.deb$")


def deb_upstream_version(filename: str) -> str | None:
    """`linux-binary-7.2.13+deb14-amd64_7.2.13-1_amd64.deb` -> `7.2.13` (None: not a deb name)."""
    m = _DEB_NAME.match(filename)
    if not m:
        return None
    version = m.group("version").split(":", 1)[-1]  # drop an epoch
    return re.split(r"[-+~]", version, maxsplit=1)[0]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def version_matches(want: str, have: str) -> bool:
    """`7.2` matches `7.2`, `7.2.13`; not `7.20` or `7.1.9`."""
    return have == want or have.startswith(want + ".")


def sanitize_label(text: str) -> str:
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return label or "kernel"


def bzimage_release(path: Path) -> str | None:
    """The kernel release string in an x86 bzImage's setup header (None if not found)."""
    try:
        with path.open("rb") as f:
            head = f.read(0x4000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    start = offset + 0x200
    if offset == 0 or start >= len(head):
        return None
    raw = head[start : start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return raw.split(" ", 1)[0] or None


def default_kernels_dir(repo_root: Path = REPO_ROOT) -> Path:
    env = os.environ.get("TRACEFLEET_KERNELS_DIR")
    return Path(env) if env else repo_root.parent / "shared" / "kernels"


_BZIMAGE_DIR = re.compile(r"^linux-(?P<version>\d+(?:\.\d+)*)(?:[-+~].*)?$")


def _bzimage_dir_version(name: str) -> str | None:
    """`linux-6.12.117-user-events` -> `6.12.117` (None: not a kernel build directory)."""
    m = _BZIMAGE_DIR.match(name)
    return m.group("version") if m else None


def _bzimage_dirs(kernels_dir: Path) -> list[Path]:
    """The `linux-<version>*/bzImage` files in kernels_dir."""
    if not kernels_dir.is_dir():
        return []
    return sorted(p for p in kernels_dir.glob("linux-*/bzImage") if p.is_file())


def resolve_kernel(spec: str, kernels_dir: Path) -> KernelSpec:
    """Map `--kernel` to a KernelSpec: a version (`7.2`, `7.2.13`) looked up among the .debs in
    kernels_dir (then its `linux-<version>*/bzImage` builds), or a path to a .deb or a
    vmlinuz/bzImage."""
    if not spec:
        raise RunnerError("--kernel is empty", EXIT_UNAVAILABLE)
    as_path = Path(spec).expanduser()
    if re.fullmatch(r"\d+(\.\d+)*", spec) and not as_path.exists():
        debs = sorted(kernels_dir.glob("*.deb")) if kernels_dir.is_dir() else []
        found: list[tuple[tuple[int, ...], Path]] = []
        for deb in debs:
            have = deb_upstream_version(deb.name)
            if have and version_matches(spec, have):
                found.append((_version_key(have), deb))
        if not found:
            # A kernel built from source ships as a directory `linux-<version>[-flavour]/bzImage`
            # (e.g. the 6.12 build with user_events); .debs still win when both match.
            for image in _bzimage_dirs(kernels_dir):
                have = _bzimage_dir_version(image.parent.name)
                if have and version_matches(spec, have):
                    found.append((_version_key(have), image))
            if found:
                found.sort()
                return KernelSpec("vmlinuz", found[-1][1], sanitize_label(spec))
        if not found:
            images = [d.parent.name for d in _bzimage_dirs(kernels_dir)]
            avail = (
                ", ".join(
                    [f"{deb_upstream_version(d.name)} ({d.name})" for d in debs]
                    + [f"{_bzimage_dir_version(n)} ({n}/bzImage)" for n in images]
                )
                or "none"
            )
            raise RunnerError(
                f"no kernel package for Linux {spec} in {kernels_dir} (available: {avail}); "
                "pass --kernel PATH to a .deb or vmlinuz, or set TRACEFLEET_KERNELS_DIR",
                EXIT_UNAVAILABLE,
            )
        found.sort()
        return KernelSpec("deb", found[-1][1], sanitize_label(spec))
    if not as_path.is_file():
        raise RunnerError(
            f"kernel {spec!r}: not a version with a package in {kernels_dir}, nor a file",
            EXIT_UNAVAILABLE,
        )
    as_path = as_path.resolve()
    if as_path.name.endswith(".deb"):
        version = deb_upstream_version(as_path.name)
        return KernelSpec("deb", as_path, sanitize_label(version or as_path.stem))
    release = bzimage_release(as_path)
    return KernelSpec("vmlinuz", as_path, sanitize_label(release or as_path.name))


def find_vmlinuz(tree: Path) -> tuple[Path, str]:
    """The kernel image in an unpacked kernel package, and its release."""
    for cand in sorted(tree.glob("usr/lib/modules/*/vmlinuz")) + sorted(
        tree.glob("lib/modules/*/vmlinuz")
    ):
        return cand, cand.parent.name
    for cand in sorted(tree.glob("boot/vmlinuz-*")):
        return cand, cand.name.removeprefix("vmlinuz-")
    raise RunnerError(f"no vmlinuz in the unpacked package {tree}", EXIT_UNAVAILABLE)


def unpack_deb(deb: Path, cache_root: Path) -> tuple[Path, str]:
    """`dpkg-deb -x` the package once into cache_root/<name>/; return (vmlinuz, release)."""
    dest = cache_root / deb.name.removesuffix(".deb")
    stamp = dest / ".tfvm-unpacked"
    st = deb.stat()
    want = f"{st.st_size} {int(st.st_mtime)}\n"
    if stamp.is_file() and stamp.read_text() == want:
        return find_vmlinuz(dest)
    if not shutil.which("dpkg-deb"):
        raise RunnerError(f"dpkg-deb not found to unpack {deb}; {FIX_HINT}", EXIT_UNAVAILABLE)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_root))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        (tmp / ".tfvm-unpacked").write_text(want)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RunnerError(f"cannot unpack {deb}: {e}", EXIT_UNAVAILABLE) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return find_vmlinuz(dest)


# --------------------------------------------------------------------------------------------
# Console protocol (pure)


@dataclass
class GuestReport:
    """What the guest said between its markers."""

    status: int | None = None
    junit: bytes | None = None
    junit_error: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> guest uptime (s)
    kernel_problems: list[str] = field(default_factory=list)  # panic, oops, BUG, WARNING

    @property
    def panicked(self) -> bool:
        return any("Kernel panic" in p for p in self.kernel_problems)


_B64_LINE = re.compile(r"^[A-Za-z0-9+/=]+$")
_PRINTK = re.compile(r"\[\s*\d+\.\d+\].*$")  # a kernel message, "[   12.345678] ..."
_KERNEL_PROBLEM = re.compile(
    r"Kernel panic - not syncing|\bBUG: |\bOops: |WARNING: CPU: |general protection fault"
    r"|\bsoft lockup\b|\bhung_task\b|Out of memory: Killed"
)
_MAX_PROBLEMS = 20


def marker_regex(nonce: str) -> re.Pattern[str]:
    return re.compile(r"@@TFVM " + re.escape(nonce) + r" (?P<kind>[A-Z]+)(?: (?P<rest>.*?))?@@")


def _b64_fragment(line: str) -> str | None:
    """The base64 text of a console line inside the junit block, dropping a kernel message
    that the console interleaved into it (its text runs to the end of the line)."""
    text = _PRINTK.sub("", line).strip()
    if not text:
        return ""
    return text if _B64_LINE.match(text) else None


def parse_console(lines: Iterable[str], nonce: str) -> GuestReport:
    """Parse the guest console. Only markers carrying this run's nonce count, anywhere in a
    line; \\r and kernel messages interleaved with the base64 block are tolerated, and the
    block is checked against the size and sha256 the guest printed."""
    rx = marker_regex(nonce)
    rep = GuestReport()
    block: list[str] | None = None
    expect: dict[str, str] = {}
    dropped = 0
    for raw in lines:
        line = raw.replace("\r", "")
        m = rx.search(line)
        if _KERNEL_PROBLEM.search(line) and len(rep.kernel_problems) < _MAX_PROBLEMS:
            rep.kernel_problems.append(re.sub(r"^.*?\[\s*\d+\.\d+\]\s*", "", line).strip())
        if m is None:
            if block is not None:
                frag = _b64_fragment(line)
                if frag is None:
                    dropped += 1
                else:
                    block.append(frag)
            continue
        if block is not None:
            # A marker ends the block; a base64 fragment may precede it on the same line.
            frag = _b64_fragment(line[: m.start()])
            if frag:
                block.append(frag)
        kind, rest = m.group("kind"), (m.group("rest") or "").strip()
        if kind == "BEGIN" and rest.startswith("junit"):
            block, dropped = [], 0
            expect = dict(kv.split("=", 1) for kv in rest.split()[1:] if "=" in kv)
        elif kind == "END" and block is not None:
            rep.junit, rep.junit_error = _decode_block(block, expect, dropped)
            block = None
        elif kind == "NOJUNIT":
            rep.junit_error = "the guest wrote no junit XML (pytest did not get to run tests)"
        elif kind == "STATUS":
            try:
                rep.status = int(rest.split()[0])
            except (ValueError, IndexError):
                rep.errors.append(f"malformed status {rest!r}")
        elif kind == "ERROR":
            rep.errors.append(rest)
        elif kind == "WARN":
            rep.warnings.append(rest)
        elif kind == "INFO":
            key, _, value = rest.partition("=")
            rep.info[key] = value
        elif kind == "STAGE":
            name, _, tail = rest.partition(" ")
            up = re.search(r"uptime=([\d.]+)", tail)
            rep.stages[name] = float(up.group(1)) if up else -1.0
    if block is not None:
        rep.junit_error = "the junit block was cut off (no END marker)"
    return rep


def _decode_block(
    block: list[str], expect: dict[str, str], dropped: int
) -> tuple[bytes | None, str | None]:
    try:
        data = base64.b64decode("".join(block), validate=True)
    except (binascii.Error, ValueError) as e:
        return None, f"junit block is not valid base64 ({e}; {dropped} garbled lines)"
    if "bytes" in expect and expect["bytes"].isdigit() and len(data) != int(expect["bytes"]):
        return None, f"junit block has {len(data)} bytes, guest sent {expect['bytes']}"
    if "sha256" in expect and hashlib.sha256(data).hexdigest() != expect["sha256"].lower():
        return None, f"junit block fails its sha256 check ({dropped} garbled lines)"
    return data, None


# --------------------------------------------------------------------------------------------
# junit summary (pure)


@dataclass(frozen=True)
class TestResult:
    nodeid: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    seconds: float = 0.0


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_junit(data: bytes) -> list[TestResult]:
    """Per-test results from pytest's junit XML (either a <testsuites> or a <testsuite> root)."""
    root = ET.fromstring(data)
    results: list[TestResult] = []
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        name = case.get("name", "?")
        nodeid = f"{classname}::{name}" if classname else name
        try:
            seconds = float(case.get("time", "0") or 0)
        except ValueError:
            seconds = 0.0
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = _first_line(child.get("message")) or _first_line(child.text)
                break
            if child.tag == "skipped":
                outcome = "skipped"
                message = _first_line(child.get("message")) or _first_line(child.text)
                if child.get("type") == "pytest.xfail":
                    message = f"xfail: {message}" if message else "xfail"
        results.append(TestResult(nodeid, outcome, message, seconds))
    return results


_PROGRESS = re.compile(
    r"^(?P<nodeid>\S+::\S+?)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
    r"(?:\s+\((?P<reason>.*)\))?"
)
_PROGRESS_OUTCOME = {
    "PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error",
    "SKIPPED": "skipped", "XFAIL": "skipped",
}  # fmt: skip


def parse_progress(lines: Iterable[str], partial: str = "") -> tuple[list[TestResult], str | None]:
    """Per-test results from pytest -v's console lines, for when no junit arrived (timeout,
    panic), and the test that was running: the unfinished last line, or a nodeid line with
    no outcome yet. Setup errors repeat a nodeid; the last outcome of each wins."""
    results: dict[str, TestResult] = {}
    running: str | None = None
    for line in [*lines, partial]:
        line = line.strip()
        m = _PROGRESS.match(line)
        if m:
            outcome = _PROGRESS_OUTCOME[m.group("outcome")]
            if m.group("outcome") == "XFAIL":
                reason = f"xfail: {m.group('reason') or ''}".rstrip(": ")
            else:
                reason = m.group("reason") or ""
            results[m.group("nodeid")] = TestResult(m.group("nodeid"), outcome, reason)
            running = None
        elif re.match(r"^\S+::\S+\s*$", line) or re.match(r"^\S+::\S+ ", line):
            running = line.split()[0]
    if running in results:
        running = None
    return list(results.values()), running


_TAGS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def format_summary(results: Sequence[TestResult]) -> list[str]:
    lines = []
    for r in results:
        tail = f"  -- {r.message}" if r.message else ""
        lines.append(f"{_TAGS.get(r.outcome, r.outcome.upper()):5} {r.nodeid}{tail}")
    counts = {k: sum(1 for r in results if r.outcome == k) for k in _TAGS}
    lines.append(
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped"
    )
    return lines


# --------------------------------------------------------------------------------------------
# Guest configuration and the read-only view (pure)


def _unescape_mountinfo(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def under_any(path: str, prefixes: Iterable[str]) -> bool:
    """Whether path is one of prefixes or below one (`/run/x` is under `/run`, `/runner` not)."""
    return any(path in (p, p.rstrip("/")) or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def view_submounts(mountinfo: str) -> list[str]:
    """Host mount points (besides /) to bind read-only into the exported view, in mount order:
    real file systems, not the kernel's pseudo file systems nor /proc, /sys, /dev, /run, /mnt,
    /media (the guest mounts its own there)."""
    out: list[str] = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields = pre.split()
        if len(fields) < 5:
            continue
        mountpoint = _unescape_mountinfo(fields[4])
        fstype = post.split()[0] if post.split() else ""
        if mountpoint == "/" or fstype in PSEUDO_FSTYPES:
            continue
        if under_any(mountpoint, EXCLUDED_MOUNT_PREFIXES):
            continue
        if mountpoint not in out:
            out.append(mountpoint)
    return out


def needs_host_tmp(paths: Iterable[str]) -> bool:
    """Whether something the guest needs lives under /tmp (then the guest keeps the host's
    /tmp visible, read-only, and uses a tmpfs under /run as its TMPDIR instead)."""
    return any(under_any(p, ("/tmp",)) for p in paths)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `run.py OPTS -- PYTEST_ARGS`."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


# pytest options whose value is the next argument: a -k expression is not a path (one longer
# than NAME_MAX made stat() fail with ENAMETOOLONG and the whole stage with it).
VALUED_OPTIONS = frozenset(
    {
        "-k",
        "-m",
        "-p",
        "-o",
        "-c",
        "-W",
        "--deselect",
        "--junitxml",
        "--rootdir",
        "--confcutdir",
        "--basetemp",
        "--ignore",
        "--timeout",
    }
)


def path_args(args: Sequence[str], repo_root: Path) -> list[Path]:
    """The test paths among pytest arguments: those not starting with '-', not the value of an
    option, that exist (`file.py::test` counts as file.py)."""
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in VALUED_OPTIONS
            continue
        p = Path(a.split("::", 1)[0])
        p = p if p.is_absolute() else repo_root / p
        try:
            if p.exists():
                out.append(p)
        except OSError:  # a name too long, or not a path at all
            continue
    return out


def has_test_path(args: Sequence[str], repo_root: Path) -> bool:
    """Whether pytest arguments already name test paths (then the defaults are not added)."""
    return bool(path_args(args, repo_root))


def pytest_argv(extra: Sequence[str], tests: Sequence[str] | None, repo_root: Path) -> list[str]:
    """Arguments after `python -m pytest` in the guest ($1 of tfvm_pytest is the junit path)."""
    argv = ["-p", "no:cacheprovider", "-rs", "-v", "--color=no", *extra]
    if tests:
        argv += list(tests)
    elif not has_test_path(extra, repo_root):
        argv += list(DEFAULT_TESTS)
    return argv


def mentions_hypothesis(paths: Iterable[Path], repo_root: Path) -> bool:
    """Whether any Python file of the selected tests, or a conftest.py above them up to the
    repo root, mentions hypothesis (then its pytest plugin must stay loaded)."""
    files: set[Path] = set()
    for p in paths:
        p = p if p.is_absolute() else repo_root / p
        if p.is_dir():
            files.update(p.rglob("*.py"))
        elif p.is_file():
            files.add(p)
        for parent in p.parents:
            files.add(parent / "conftest.py")
            if parent == repo_root or parent == parent.parent:
                break
    for f in files:
        try:
            if "hypothesis" in f.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def guest_config(
    *,
    repo_root: Path,
    python: str,
    pytest_args: Sequence[str],
    tmp_tmpfs: bool,
    env: dict[str, str],
) -> str:
    """The shell file init.sh sources: TFVM_* variables, tfvm_env() and tfvm_pytest()."""
    q = shlex.quote
    lines = [
        "# generated by tests/vm/run.py for one guest run",
        f"TFVM_REPO={q(str(repo_root))}",
        f"TFVM_PYTHON={q(python)}",
        f"TFVM_TMP_TMPFS={1 if tmp_tmpfs else 0}",
        "tfvm_env() {",
        *(f"  export {k}={q(v)}" for k, v in sorted(env.items())),
        "  :",
        "}",
        "tfvm_pytest() {",
        f'  "$TFVM_PYTHON" -m pytest --junitxml="$1" {" ".join(q(a) for a in pytest_args)}',
        "}",
        "",
    ]
    return "\n".join(lines)


def passthrough_env(environ: dict[str, str], extra: Sequence[str]) -> dict[str, str]:
    """TRACEFLEET_* variables of the host (but the two the guest sets) plus --env K=V."""
    env = {
        k: v
        for k, v in environ.items()
        if k.startswith("TRACEFLEET_")
        and k
        not in (
            "TRACEFLEET_IN_VM",
            "TRACEFLEET_KERNEL",
            "TRACEFLEET_KERNELS_DIR",
            "TRACEFLEET_VM_TIMEOUT",
        )
    }
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise RunnerError(f"--env wants NAME=VALUE, got {item!r}", 2)
        env[key] = value
    return env


def parse_memory(text: str) -> str:
    """`1G`, `1536M`, `1024` (MiB) -> qemu's size syntax."""
    m = re.fullmatch(r"(\d+)\s*([MmGg])?(?:i?B)?", text.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 1G, 1536M)")
    return f"{m.group(1)}{(m.group(2) or 'M').upper()}"


def qemu_argv(
    *,
    kernel: Path,
    socket: Path,
    cmdline: str,
    memory: str,
    cpus: int,
    accel: str,
) -> list[str]:
    cpu = "max" if accel == "tcg" else "host"
    return [
        QEMU,
        "-machine", f"q35,accel={accel}",
        "-cpu", cpu,
        "-smp", str(cpus),
        "-m", memory,
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vfs,path={socket}",
        "-device", "vhost-user-fs-pci,chardev=vfs,tag=rootfs",
        "-kernel", str(kernel),
        "-append", cmdline,
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
    ]  # fmt: skip


def kernel_cmdline(init_script: Path, nonce: str, config: Path, extra: str) -> str:
    for p in (init_script, config):
        if re.search(r"\s", str(p)):
            raise RunnerError(f"path {p} has white space: not usable on the kernel command line", 2)
    parts = [
        "console=ttyS0",
        "rootfstype=virtiofs",
        "root=rootfs",
        "ro",
        "init=/bin/sh",
        "panic=-1",
        "loglevel=4",
        extra.strip(),
        "--",
        str(init_script),
        nonce,
        str(config),
    ]
    return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# Processes


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if this runner dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def find_virtiofsd() -> str | None:
    for cand in VIRTIOFSD_CANDIDATES:
        found = cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else shutil.which(cand)
        if found:
            return found
    return None


def preflight(repo_root: Path) -> tuple[str, str]:
    """Check tools and privileges; return (virtiofsd, guest python). Fails loudly: in CI the
    install step provides all of it."""
    missing = [t for t in (QEMU, "unshare", "mount") if not shutil.which(t)]
    virtiofsd = find_virtiofsd()
    if virtiofsd is None:
        missing.append("virtiofsd (/usr/lib/qemu/virtiofsd from qemu-system-x86)")
    if not os.access("/bin/busybox", os.X_OK):
        missing.append("/bin/busybox (busybox-static)")
    if missing or virtiofsd is None:
        raise RunnerError(f"missing: {', '.join(missing)}; {FIX_HINT}", EXIT_UNAVAILABLE)
    if os.geteuid() != 0:
        raise RunnerError(
            "the VM runner needs root (read-only bind mounts for virtiofsd); "
            "run it as root, e.g. `sudo make test-vm`",
            EXIT_NOPERM,
        )
    python = repo_root / ".venv" / "bin" / "python"
    if not python.exists():
        raise RunnerError(f"{python} missing; {FIX_HINT}", EXIT_UNAVAILABLE)
    return virtiofsd, str(python)


def view_script(view: Path, submounts: Sequence[str], virtiofsd: str, socket: Path) -> str:
    """Shell run inside a private mount namespace (unshare -m): the read-only view of / dies
    with virtiofsd, so nothing is left mounted on the host whatever happens to the runner."""
    q = shlex.quote
    lines = [
        "set -e",
        f"mount --bind -o ro / {q(str(view))}",
        f"mount -o remount,bind,ro {q(str(view))}",
    ]
    for mp in submounts:
        target = q(str(view) + mp)
        lines.append(
            f"if [ -e {target} ]; then mount --bind -o ro {q(mp)} {target} "
            f"|| echo 'tfvm: warning: cannot expose {mp} read-only' >&2; fi"
        )
    # cache=always: the guest keeps what it looked up (the tree does not change under it
    # during a run); under TCG it halves boot-to-pytest compared with cache=auto.
    lines.append(
        f"exec {q(virtiofsd)} --socket-path={q(str(socket))} -o source={q(str(view))} "
        "-o sandbox=chroot -o cache=always -o log_level=warn"
    )
    return "\n".join(lines)


class Console:
    """Reads the guest console from qemu's stdout: saves it, streams it, spots markers."""

    def __init__(self, stream: IO[bytes], log: Path, nonce: str, prefix: str, echo: bool) -> None:
        self.lines: list[str] = []
        self.stage_times: dict[str, float] = {}  # stage -> host monotonic time
        self.status_seen = threading.Event()
        self.partial = ""  # the console's last, unfinished line
        self.done = 0  # finished tests seen (quiet mode progress)
        self._last_done = time.monotonic()  # each test's wall time shows where a stage's time goes
        self._stream, self._prefix, self._echo = stream, prefix, echo
        self._log = log.open("wb")  # written and closed by the thread only
        self._rx = marker_regex(nonce)
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._read()
        finally:
            self._log.close()

    def _read(self) -> None:
        # Raw chunks, not lines: a test's name shows as soon as pytest starts it, and the
        # unfinished last line (the test running at a timeout) stays in self.partial.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        fd = self._stream.fileno()
        at_line_start = True
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            final = not data
            self._log.write(data)
            self._log.flush()
            text = decoder.decode(data, final).replace("\r", "")
            *complete, self.partial = (self.partial + text).split("\n")
            if final and self.partial:
                complete.append(self.partial)
                self.partial = ""
            for line in complete:
                self._line(line)
            if not self._echo:
                for line in complete:
                    self._progress(line)
            elif text:
                parts = text.split("\n")
                for i, part in enumerate(parts):
                    if part and at_line_start:
                        sys.stderr.write(self._prefix)
                        at_line_start = False
                    sys.stderr.write(part)
                    if i < len(parts) - 1:
                        sys.stderr.write("\n")
                        at_line_start = True
                sys.stderr.flush()
            if final:
                return

    def _progress(self, line: str) -> None:
        """Quiet mode: one line per finished test and the guest's stages (CI sees life)."""
        m = _PROGRESS.match(line.strip())
        if m:
            self.done += 1
            now = time.monotonic()
            took, self._last_done = now - self._last_done, now
            text = f"{m.group('outcome'):7} {m.group('nodeid')} ({self.done} done, {took:.0f} s)"
        elif self._rx.search(line) and ("STAGE" in line or "ERROR" in line):
            text = line[line.index("@@TFVM") :]
        else:
            return
        sys.stderr.write(f"{self._prefix}{text}\n")
        sys.stderr.flush()

    def _line(self, line: str) -> None:
        self.lines.append(line)
        m = self._rx.search(line)
        if m:
            kind, rest = m.group("kind"), m.group("rest") or ""
            if kind == "STAGE":
                self.stage_times[rest.split(" ", 1)[0]] = time.monotonic()
            elif kind == "STATUS" or (kind == "ERROR" and not self.status_seen.is_set()):
                self.status_seen.set()

    def join(self, timeout: float) -> None:
        """Wait for EOF (qemu gone) and the log to be closed."""
        self._thread.join(timeout)


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            tail = " | ".join(_console_tail(log_path, 10))
            raise RunnerError(
                f"virtiofsd exited with status {proc.returncode} before creating its socket"
                f" ({log_path}: {tail})",
                EXIT_GUEST_FAILED,
            )
        time.sleep(0.05)
    raise RunnerError(f"virtiofsd did not create {path} in {timeout:.0f} s", EXIT_GUEST_FAILED)


def _remove_run_dir(d: Path) -> None:
    """Remove a run directory file by known file: never a recursive delete next to a mount
    point (the view is only ever mounted inside virtiofsd's private namespace, but still)."""
    for name in ("guest.sh", "console.log", "pid", "vfs.sock"):
        with contextlib.suppress(OSError):
            (d / name).unlink()
    for sub in (d / "view", d):
        with contextlib.suppress(OSError):
            sub.rmdir()  # refuses if not empty (or a mount point): then it stays


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False  # no pid file, or no such process (EPERM cannot happen as root)
    return True


def _reap_stale_dirs(build_dir: Path, min_age_s: float = 120.0) -> None:
    """Directories left by a runner that was SIGKILLed (its qemu and virtiofsd died with it
    through PR_SET_PDEATHSIG); young ones may belong to a runner still starting."""
    now = time.time()
    for d in [*Path(tempfile.gettempdir()).glob("tfvm-*"), *build_dir.glob("run-*")]:
        with contextlib.suppress(OSError):
            if d.is_dir() and now - d.stat().st_mtime > min_age_s and not _pid_alive(d / "pid"):
                _remove_run_dir(d)


def _install_signal_handlers() -> Callable[[], None]:
    def handler(signum: int, _frame: object) -> NoReturn:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


# --------------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tests/vm/run.py",
        description="Boot a Linux guest under qemu (TCG) with the host's root file system "
        "read-only over virtiofs, run the BPF and e2e pytest suites in it, report per test. "
        "Arguments after `--` go to pytest.",
    )
    p.add_argument(
        "--kernel",
        default="7.2",
        help="a version with a .deb (7.2, 7.2.13) or a linux-VERSION*/bzImage build (6.12) "
        "in ../shared/kernels, or a path to a kernel .deb or vmlinuz (default 7.2)",
    )
    p.add_argument(
        "--kernels-dir",
        type=Path,
        default=None,
        help="where --kernel VERSION looks for .debs (default ../shared/kernels, "
        "or $TRACEFLEET_KERNELS_DIR)",
    )
    p.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        default=None,
        help=f"test paths for pytest instead of {' '.join(DEFAULT_TESTS)}",
    )
    p.add_argument(
        "--pytest-args",
        default="",
        metavar="ARGS",
        help="extra pytest arguments, one shell-quoted string (or after `--`)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("TRACEFLEET_VM_TIMEOUT", DEFAULT_TIMEOUT_S)),
        metavar="SECONDS",
        help="overall limit for the guest, boot included (default $TRACEFLEET_VM_TIMEOUT "
        f"or {DEFAULT_TIMEOUT_S})",
    )
    p.add_argument("--memory", type=parse_memory, default="1G", help="guest RAM (default 1G)")
    p.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument(
        "--accel",
        default="tcg",
        choices=("tcg", "kvm"),
        help="qemu accelerator (default tcg: /dev/kvm here cannot run these kernels)",
    )
    p.add_argument(
        "--append", default="", metavar="CMDLINE", help="extra kernel command line, e.g. 'lsm=...'"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the guest's pytest (repeatable); the host's "
        "TRACEFLEET_* variables are passed through too",
    )
    p.add_argument(
        "--keep-console",
        type=Path,
        default=None,
        metavar="FILE",
        help="also copy the full guest console to FILE",
    )
    p.add_argument(
        "--build-dir",
        type=Path,
        default=REPO_ROOT / "build" / "vm",
        help="kernel cache, console log and junit output (default build/vm)",
    )
    p.add_argument(
        "--hypothesis-plugin",
        choices=("auto", "on", "off"),
        default="auto",
        help="load hypothesis's pytest plugin in the guest (~20 s under TCG); auto: only if a "
        "selected test file or conftest.py mentions hypothesis (default auto)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="do not stream the guest console to stderr (only the summary)",
    )
    p.add_argument(
        "--boot-retries",
        type=int,
        default=2,
        metavar="N",
        help="boot again up to N times if the guest dies before pytest starts (default 2)",
    )
    p.add_argument(
        "--oops-retries",
        type=int,
        default=3,
        metavar="N",
        help="after the guest kernel oopses on an int3 of its own text patching (seen under "
        "TCG), run the tests that did not finish again, up to N times (default 3)",
    )
    return p


def log(msg: str) -> None:
    print(f"[test-vm] {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    status: int
    report: GuestReport
    results: list[TestResult]
    boot_s: float | None
    pytest_s: float | None
    wall_s: float
    label: str
    console_path: Path
    junit_path: Path
    from_console: bool = False  # results parsed from pytest -v lines (no junit arrived)
    running: str | None = None  # the test that was running when the guest stopped


def run(args: argparse.Namespace, pytest_extra: list[str]) -> Outcome:
    t0 = time.monotonic()
    repo_root = REPO_ROOT
    build_dir: Path = args.build_dir.resolve()
    kernels_dir = args.kernels_dir or default_kernels_dir(repo_root)
    virtiofsd, python = preflight(repo_root)
    tests = [str(Path(t).resolve()) for t in args.tests] if args.tests else None
    for t in tests or []:
        if not Path(t.split("::", 1)[0]).exists():
            raise RunnerError(f"--tests: {t} does not exist", 4)
    pytest_args = pytest_argv(shlex.split(args.pytest_args) + pytest_extra, tests, repo_root)
    # Loading hypothesis costs ~20 s under TCG: skip its plugin when no selected test uses it.
    if args.hypothesis_plugin == "off" or (
        args.hypothesis_plugin == "auto"
        and not mentions_hypothesis(path_args(pytest_args, repo_root), repo_root)
    ):
        pytest_args = ["-p", "no:hypothesispytest", *pytest_args]
    guest_paths = [str(repo_root), str(Path(python).resolve()), str(build_dir), *(tests or [])]
    hidden = [p for p in guest_paths if under_any(p, EXCLUDED_MOUNT_PREFIXES)]
    if hidden:
        raise RunnerError(
            f"the guest cannot see {', '.join(hidden)} (it has its own /proc, /sys, /dev, /run "
            "and no /mnt, /media): move it, or pass --build-dir",
            2,
        )
    spec = resolve_kernel(args.kernel, kernels_dir)
    if spec.kind == "deb":
        vmlinuz, release = unpack_deb(spec.path, build_dir / "kernels")
    else:
        vmlinuz, release = spec.path, bzimage_release(spec.path) or "unknown"
    log(f"kernel {release} ({vmlinuz})")

    env = passthrough_env(dict(os.environ), args.env)

    build_dir.mkdir(parents=True, exist_ok=True)
    console_path = build_dir / f"console-{spec.label}.log"
    vfs_log_path = build_dir / f"virtiofsd-{spec.label}.log"
    junit_path = build_dir / f"junit-{spec.label}.xml"
    junit_path.unlink(missing_ok=True)  # never leave a stale result behind
    nonce = secrets.token_hex(8)
    # The guest reads its config through the export: it must live in the repo tree, which
    # the guest sees; the socket and the view's mount point are host-only.
    _reap_stale_dirs(build_dir)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{spec.label}-", dir=build_dir))
    host_dir = Path(tempfile.mkdtemp(prefix="tfvm-"))
    for d in (run_dir, host_dir):
        (d / "pid").write_text(f"{os.getpid()}\n")
    config, live_console = run_dir / "guest.sh", run_dir / "console.log"
    config.write_text(
        guest_config(
            repo_root=repo_root,
            python=python,
            pytest_args=pytest_args,
            tmp_tmpfs=not needs_host_tmp(guest_paths),
            env=env,
        )
    )
    socket, view = host_dir / "vfs.sock", host_dir / "view"
    view.mkdir()
    mountinfo = Path("/proc/self/mountinfo").read_text()

    vfs: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    console: Console | None = None
    interrupted: str | None = None
    restore = _install_signal_handlers()
    try:
        with vfs_log_path.open("wb") as vfs_log:  # the child keeps its own descriptor
            vfs = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                 view_script(view, view_submounts(mountinfo), virtiofsd, socket)],
                stdin=subprocess.DEVNULL,
                stdout=vfs_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        _wait_for_socket(socket, vfs, 15.0, vfs_log_path)
        argv = qemu_argv(
            kernel=vmlinuz,
            socket=socket,
            cmdline=kernel_cmdline(INIT_SCRIPT, nonce, config, args.append),
            memory=args.memory,
            cpus=args.cpus,
            accel=args.accel,
        )
        log(f"booting: {shlex.join(argv)}")
        log(f"pytest in guest: python -m pytest {shlex.join(pytest_args)}")
        t_boot = time.monotonic()
        qemu = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert qemu.stdout is not None
        console = Console(qemu.stdout, live_console, nonce, f"[vm {spec.label}] ", not args.quiet)
        timed_out = _wait_guest(qemu, console, t0 + args.timeout)
    except Interrupted as e:
        if console is None:
            raise  # before boot: nothing to report
        interrupted, timed_out = str(e), False
    finally:
        _stop(qemu)
        if console is not None:
            console.join(10.0)
        _stop(vfs)
        restore()
        # Concurrent runs of one kernel each stream into their own run directory; the
        # finished log replaces console-<kernel>.log atomically.
        with contextlib.suppress(OSError):
            if args.keep_console and live_console.exists():
                shutil.copyfile(live_console, args.keep_console)
            os.replace(live_console, console_path)
        _remove_run_dir(run_dir)
        _remove_run_dir(host_dir)

    assert console is not None and qemu is not None  # else the exception propagated
    report = parse_console(console.lines, nonce)
    results: list[TestResult] = []
    if report.junit is not None:
        tmp_junit = run_dir.with_name(run_dir.name + ".junit.xml")
        tmp_junit.write_bytes(report.junit)
        os.replace(tmp_junit, junit_path)
        try:
            results = parse_junit(report.junit)
        except ET.ParseError as e:
            report.junit_error = f"junit XML does not parse: {e}"
    from_console, running = False, None
    if report.junit is None:
        results, running = parse_progress(console.lines, console.partial)
        from_console = bool(results) or running is not None
    st = console.stage_times
    boot_s = st["pytest-start"] - t_boot if "pytest-start" in st else None
    both = {"pytest-start", "pytest-end"} <= st.keys()
    pytest_s = st["pytest-end"] - st["pytest-start"] if both else None
    wall = time.monotonic() - t0

    if interrupted:
        status = EXIT_INTERRUPTED
        report.errors.append(f"interrupted ({interrupted}); qemu and virtiofsd stopped")
    elif timed_out:
        status = EXIT_TIMEOUT
        report.errors.append(f"timed out after {args.timeout:.0f} s (--timeout)")
    elif report.status is None:
        status = EXIT_GUEST_FAILED
        if report.panicked:
            panic = next(p for p in report.kernel_problems if "Kernel panic" in p)
            report.errors.append(f"the guest kernel panicked: {panic}")
        elif not report.errors:
            report.errors.append(
                f"the guest never reported a pytest status (qemu exit status {qemu.returncode}):"
                " kernel panic, init failure or crash"
            )
    elif report.status == 0 and report.junit is None:
        status = EXIT_GUEST_FAILED
        report.errors.append("pytest passed but its junit report did not arrive intact")
    else:
        status = report.status
    return Outcome(
        status,
        report,
        results,
        boot_s,
        pytest_s,
        wall,
        spec.label,
        console_path,
        junit_path,
        from_console,
        running if status in (EXIT_TIMEOUT, EXIT_GUEST_FAILED, EXIT_INTERRUPTED) else None,
    )


def _wait_guest(qemu: subprocess.Popen[bytes], console: Console, deadline: float) -> bool:
    """Wait for qemu to exit; True on timeout. Once the guest printed its status it has
    POWEROFF_GRACE_S to power off before qemu is stopped (results are in by then)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        if console.status_seen.wait(min(remaining, 0.5)):
            try:
                qemu.wait(min(POWEROFF_GRACE_S, max(remaining, 0.1)))
            except subprocess.TimeoutExpired:
                log("guest did not power off after reporting; stopping qemu")
            return False
        if qemu.poll() is not None:
            return False


def print_outcome(out: Outcome) -> None:
    rep, label, console_path, junit_path = out.report, out.label, out.console_path, out.junit_path
    print(f"\n== tracefleet VM suite on Linux {rep.info.get('kernel', label)} ==", flush=True)
    for w in rep.warnings:
        print(f"WARNING: guest: {w}")
    for p in rep.kernel_problems:
        print(f"KERNEL: {p}")
    if out.from_console:
        print("(no junit report arrived: results below are read from pytest's console lines)")
    if out.results:
        for line in format_summary(out.results):
            print(line)
    if out.running:
        print(f"RUNNING when the guest stopped: {out.running}")
    if rep.junit_error:
        print(f"WARNING: {rep.junit_error}")
    if rep.errors:
        print("FAILED: " + "; ".join(rep.errors))
        tail = _console_tail(console_path, 40)
        if tail:
            print(f"-- last {len(tail)} console lines ({console_path}):")
            for line in tail:
                print(f"   | {line}")
    print(
        f"boot-to-pytest: {_secs(out.boot_s)}, pytest: {_secs(out.pytest_s)}, "
        f"total wall: {_secs(out.wall_s)}"
    )
    if rep.junit is not None:
        print(f"junit: {junit_path}")
    print(f"console: {console_path}")
    who = "guest pytest" if rep.status is not None and out.status == rep.status else "runner"
    print(f"exit status: {out.status} ({who})", flush=True)


def _secs(s: float | None) -> str:
    return f"{s:.1f} s" if s is not None else "n/a"


def _console_tail(path: Path, n: int) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.replace("\r", "") for line in text.splitlines()[-n:]]


def emulation_int3(problems: Sequence[str]) -> bool:
    """The guest kernel's first problem is an oops on int3: a CPU met a breakpoint of the
    kernel's own text patching (static keys flip as tracepoints attach). Seen under TCG at
    boot (sched_clock_cpu) and once in trace_syscall_exit as a sleepable set attached; not
    proven to be the emulator's, so the first outcome is printed in full before the rerun."""
    return bool(problems) and "Oops: int3" in problems[0]


def done_deselects(results: Sequence[TestResult], repo_root: Path) -> list[str]:
    """`--deselect` arguments for the tests a crashed guest already finished, so that the run
    after an emulator oops repeats only what did not finish (the oops cost the whole stage
    once it came late). Node ids as pytest prints them (relative to the repo root) become
    relative to pytest's rootdir (tests/, where pytest.ini is), which --deselect matches."""
    rootdir = repo_root / "tests" if (repo_root / "tests" / "pytest.ini").is_file() else repo_root
    out: list[str] = []
    for r in results:
        path, sep, rest = r.nodeid.partition("::")
        if not sep or not path.endswith(".py"):
            continue  # junit's dotted class names: not a node id (they never come from a crash)
        full = Path(path) if Path(path).is_absolute() else repo_root / path
        try:
            rel = full.relative_to(rootdir)
        except ValueError:
            continue
        out += ["--deselect", f"{rel}::{rest}"]
    return out


def merge_outcomes(first: Outcome, second: Outcome) -> Outcome:
    """One outcome of a run repeated after an emulator oops: the tests the first guest finished
    (not run again) and the second's. A failure in either fails it; a second run with nothing
    left to run (pytest's 5, all deselected) is the first's results alone."""
    results = [*first.results, *second.results]
    status = second.status
    if status == PYTEST_NO_TESTS and first.results:
        status = 0
    if status == 0 and any(r.outcome in ("failed", "error") for r in results):
        status = 1
    return Outcome(
        status,
        second.report,
        results,
        second.boot_s,
        second.pytest_s,
        first.wall_s + second.wall_s,
        second.label,
        second.console_path,
        second.junit_path,
        first.from_console or second.from_console,
        second.running,
    )


def rerun_after_emulator_oops(
    args: argparse.Namespace,
    pytest_extra: list[str],
    out: Outcome,
    run_fn: Callable[[argparse.Namespace, list[str]], Outcome],
) -> Outcome:
    """The same class of oops as at boot, while pytest ran (CI saw int3 in trace_syscall_exit
    at 500 s and in trace_syscall_enter at 44 s, as tests attached syscall tracepoints): run
    what did not finish again, up to --oops-retries times in the time the limit leaves. One
    rerun was not enough to make a CI stage trustworthy: two oopses in one stage happen."""
    for attempt in range(1, args.oops_retries + 1):
        if not (out.status == EXIT_GUEST_FAILED and emulation_int3(out.report.kernel_problems)):
            break
        left = args.timeout - out.wall_s
        if left <= 60:
            log(f"the guest kernel oopsed on an int3 of its own live patching, and only "
                f"{left:.0f} s of the limit are left: not run again")  # fmt: skip
            break
        print_outcome(out)
        n = f"{attempt}/{args.oops_retries}"
        log(f"the guest kernel oopsed on an int3 of its own live patching: running what did "
            f"not finish again ({n}) in the {left:.0f} s left")  # fmt: skip
        again = done_deselects(out.results, REPO_ROOT)
        log(f"{len(again) // 2} tests finished before the oops: not run again")
        out = merge_outcomes(out, run_fn(argparse.Namespace(**{**vars(args), "timeout": left}),
                                         [*pytest_extra, *again]))  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    own, pytest_extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if args.cpus < 1:
        build_parser().error("--cpus must be at least 1")
    try:
        out = run(args, pytest_extra)
        # A guest that dies before pytest starts never ran our code: under TCG the stock
        # kernel occasionally oopses while it live-patches its own text at boot (seen: int3
        # in sched_clock_cpu at 2 s). Boot again, a bounded number of times, and say so. A
        # crash after pytest started is never retried: that may be ours.
        for attempt in range(1, args.boot_retries + 1):
            if not (out.status == EXIT_GUEST_FAILED and out.boot_s is None and not out.results):
                break
            print_outcome(out)
            log(f"the guest died before pytest started: booting again ({attempt}/"
                f"{args.boot_retries})")  # fmt: skip
            out = run(args, pytest_extra)
        out = rerun_after_emulator_oops(args, pytest_extra, out, run)
    except RunnerError as e:
        print(f"[test-vm] FAILED: {e}", file=sys.stderr, flush=True)
        return e.status
    except (Interrupted, KeyboardInterrupt) as e:
        print(
            f"[test-vm] interrupted ({e or 'SIGINT'}); qemu and virtiofsd stopped", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    print_outcome(out)
    return out.status


if __name__ == "__main__":
    sys.exit(main())
