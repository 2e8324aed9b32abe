"""Pre-flight checks of the host: each failure names the cause, what to do about it, and the
degradation the agent takes.

Order: privileges, the bpf() system call itself (a seccomp profile or a kernel without
CONFIG_BPF_SYSCALL), BTF, tracefs, the BPF objects. Without any of them no capture strategy
works, so the agent exits (status 3) without loading anything. One degrades instead: when
tracefs is not mounted and the caller allows it (the agent's CLI does), the agent mounts it
in a mount namespace of its own (the host's mounts are unchanged) and goes on.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from tracefleet.agent import env

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
LOCKDOWN_PATH = Path("/sys/kernel/security/lockdown")
KCONFIG_PATHS = (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}"))
NO_DEGRADATION = (
    "none possible: every capture strategy needs it, so the agent exits (status 3) without "
    "loading anything"
)

# CAP_SYS_ADMIN=21, CAP_PERFMON=38, CAP_BPF=39, CAP_SYS_PTRACE=19
_CAPS = {"CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


class HostCheckError(RuntimeError):
    """The host cannot run the agent: ``cause`` says what is wrong, ``fix`` what to do,
    ``degradation`` what the agent does about it."""

    def __init__(self, cause: str, fix: str, degradation: str = NO_DEGRADATION):
        super().__init__(f"{cause}. {fix}")
        self.cause = cause
        self.fix = fix
        self.degradation = degradation


@dataclass(frozen=True)
class HostInfo:
    kernel: str
    arch: str
    btf: bool
    tracefs: str
    lockdown: str
    capabilities: tuple[str, ...]
    bpf_dir: str
    # tracefs was not mounted: the agent mounted it in its own mount namespace
    tracefs_mounted_by_agent: bool = False


def effective_caps() -> set[str]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in _CAPS.items() if mask >> bit & 1}
    except OSError:
        pass
    return set()


def tracefs_mount() -> str:
    for p in TRACEFS_PATHS:
        if (p / "events").is_dir():
            return str(p)
    return ""


def lockdown_mode() -> str:
    try:
        text = LOCKDOWN_PATH.read_text()
    except OSError:
        return "unknown"
    # "none [integrity] confidentiality": the bracketed word is the mode
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return "unknown"


def kernel_config(option: str) -> str | None:
    """The kernel's build configuration value of ``option`` ("y", "m", ...), "n" if the
    configuration is readable and does not set it, None if no configuration is readable."""
    for path in KCONFIG_PATHS:
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(f"{option}="):
                return line.split("=", 1)[1].strip()
        return "n"
    return None


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2


def bpf_syscall_errno() -> int:
    """0 if the bpf() system call works here (creates, then closes, a one-entry array map),
    else the errno it failed with."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return 0  # unknown architecture: let libbpf find out
    attr = (ctypes.c_uint32 * 32)()  # union bpf_attr, map-create part zero-padded
    attr[0], attr[1], attr[2], attr[3] = _BPF_MAP_TYPE_ARRAY, 4, 4, 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_BPF_MAP_CREATE), ctypes.byref(attr),
                      ctypes.c_long(ctypes.sizeof(attr)))  # fmt: skip
    if fd < 0:
        return ctypes.get_errno() or errno.EINVAL
    os.close(fd)
    return 0


_CLONE_NEWNS, _MS_REC, _MS_PRIVATE = 0x00020000, 0x4000, 1 << 18


def mount_tracefs_privately() -> tuple[str, str]:
    """Mount tracefs at /sys/kernel/tracing in a new mount namespace of this process (call it
    before starting threads: the other threads would stay in the old one). Returns (path,
    "") on success, ("", why) otherwise. The host's mount table is not touched."""
    target = TRACEFS_PATHS[0]
    if not target.is_dir():
        return "", f"{target} does not exist"
    libc = ctypes.CDLL(None, use_errno=True)

    def fail(what: str) -> tuple[str, str]:
        return "", f"{what}: {os.strerror(ctypes.get_errno())}"

    if libc.unshare(_CLONE_NEWNS) != 0:
        return fail("unshare(CLONE_NEWNS)")
    # nothing mounted from here on may propagate back to the host's namespace
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return fail("making / private in the new mount namespace")
    if libc.mount(b"tracefs", str(target).encode(), b"tracefs", 0, None) != 0:
        return fail(f"mount -t tracefs tracefs {target}")
    if not (target / "events").is_dir():
        return "", f"tracefs mounted at {target} has no events/ directory"
    return str(target), ""


# a source checkout: agent/src/tracefleet/agent/kernel/hostcheck.py -> repo/build/bpf
SOURCE_BPF_DIR = Path(__file__).resolve().parents[5] / "build" / "bpf"


def find_bpf_dir() -> Path | None:
    candidates = []
    if os.environ.get(env.BPF_DIR):
        candidates.append(Path(os.environ[env.BPF_DIR]))
    candidates.append(Path("/usr/lib/tracefleet/bpf"))
    candidates.append(SOURCE_BPF_DIR)
    for c in candidates:
        if (c / "file.bpf.o").is_file():
            return c
    return None


def check_host(*, need_bpf_objects: bool = True, mount_tracefs: bool = False) -> HostInfo:
    """Raise HostCheckError for the first thing that makes BPF capture impossible here.
    ``mount_tracefs``: if tracefs is not mounted, mount it in a mount namespace of this
    process (see mount_tracefs_privately) instead of failing."""
    caps = effective_caps()
    if not ({"CAP_BPF", "CAP_PERFMON"} <= caps or "CAP_SYS_ADMIN" in caps):
        raise HostCheckError(
            "missing privileges: loading tracing BPF programs needs CAP_BPF and CAP_PERFMON "
            f"(or CAP_SYS_ADMIN); this process has {sorted(caps) or 'none'}",
            "Run as root (sudo tracefleet-agent ...) or grant those capabilities",
        )
    err = bpf_syscall_errno()
    if err == errno.ENOSYS:
        built = kernel_config("CONFIG_BPF_SYSCALL")
        raise HostCheckError(
            "the bpf() system call is not available (ENOSYS): "
            + (
                "this kernel is built without CONFIG_BPF_SYSCALL"
                if built == "n"
                else "a seccomp filter answers ENOSYS for it"
                + (" (the kernel has CONFIG_BPF_SYSCALL=y)" if built else "")
            ),
            "Use a kernel with CONFIG_BPF_SYSCALL=y"
            if built == "n"
            else "Allow bpf() in the process's seccomp profile (Kubernetes: a Localhost "
            "seccompProfile that adds bpf and perf_event_open, or Unconfined; docker run "
            "--security-opt seccomp=unconfined)",
        )
    if err:
        raise HostCheckError(
            f"the bpf() system call is refused ({errno.errorcode.get(err, err)}: "
            f"{os.strerror(err)}) although this process has {', '.join(sorted(caps))}: a "
            "seccomp filter (container runtimes' default profiles block bpf()) or a security "
            "module (SELinux, AppArmor, BPF LSM) denies it",
            "Run the agent with a seccomp profile that allows bpf() (Kubernetes: a Localhost "
            "seccompProfile that adds bpf and perf_event_open, or Unconfined; docker run "
            "--security-opt seccomp=unconfined) and allow it in the security module's policy",
        )
    if not BTF_PATH.exists():
        built = kernel_config("CONFIG_DEBUG_INFO_BTF")
        if built == "y":
            cause = (
                f"{BTF_PATH} is missing although this kernel is built with "
                "CONFIG_DEBUG_INFO_BTF=y: /sys is not the host's (a container without the "
                "host's /sys/kernel/btf, or something mounted over it), so the CO-RE objects "
                "cannot be relocated"
            )
            fix = "Mount the host's /sys/kernel/btf into the agent's container (read-only)"
        else:
            cause = (
                f"{BTF_PATH} is missing: this kernel has no BTF "
                + ("(CONFIG_DEBUG_INFO_BTF is not set)" if built else "(CONFIG_DEBUG_INFO_BTF=n?)")
                + ", so the CO-RE objects cannot be relocated"
            )
            fix = (
                "Use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's "
                "kernel since 2021 is)"
            )
        raise HostCheckError(cause, fix)
    tracefs = tracefs_mount()
    mounted_by_agent = False
    if not tracefs:
        why = "the agent was not allowed to mount it itself"
        if mount_tracefs:
            tracefs, why = mount_tracefs_privately()
            mounted_by_agent = bool(tracefs)
            why = f"mounting it in the agent's own mount namespace failed: {why}"
        if not tracefs:
            raise HostCheckError(
                f"tracefs is not mounted (neither {' nor '.join(map(str, TRACEFS_PATHS))} has "
                f"an events/ directory), so syscall tracepoints cannot be attached, and {why}",
                "Mount it: mount -t tracefs tracefs /sys/kernel/tracing (in a container, "
                "mount the host's /sys/kernel/tracing), or give the agent CAP_SYS_ADMIN so it "
                "mounts it for itself",
            )
    bpf_dir = find_bpf_dir()
    if need_bpf_objects and bpf_dir is None:
        raise HostCheckError(
            "BPF objects (file.bpf.o, ...) not found",
            f"Build them with `make bpf`, or set {env.BPF_DIR} to their directory",
        )
    lockdown = lockdown_mode()
    return HostInfo(
        kernel=platform.release(),
        arch=platform.machine(),
        btf=True,
        tracefs=tracefs,
        lockdown=lockdown,
        capabilities=tuple(sorted(caps)),
        bpf_dir=str(bpf_dir or ""),
        tracefs_mounted_by_agent=mounted_by_agent,
    )


TRACEFS_NOTE = (
    "tracefs was not mounted; the agent mounted it at {path} in a mount namespace of its own "
    "(the host's mounts are unchanged) and goes on"
)


def btf_has_name(name: str) -> bool:
    """Whether the kernel's BTF mentions ``name`` (e.g. a kfunc); a cheap presence test."""
    try:
        return f"\0{name}\0".encode() in BTF_PATH.read_bytes()
    except OSError:
        return False
