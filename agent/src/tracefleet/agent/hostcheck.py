"""Pre-flight checks of the host: each failure names the cause and what to do about it."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from tracefleet.agent._internal import env

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
LOCKDOWN_PATH = Path("/sys/kernel/security/lockdown")

# CAP_SYS_ADMIN=21, CAP_PERFMON=38, CAP_BPF=39, CAP_SYS_PTRACE=19
_CAPS = {"CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


class HostCheckError(RuntimeError):
    """The host cannot run the agent: ``cause`` says what is wrong, ``fix`` what to do."""

    def __init__(self, cause: str, fix: str):
        super().__init__(f"{cause}. {fix}")
        self.cause = cause
        self.fix = fix


@dataclass(frozen=True)
class HostInfo:
    kernel: str
    arch: str
    btf: bool
    tracefs: str
    lockdown: str
    capabilities: tuple[str, ...]
    bpf_dir: str


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


def find_bpf_dir() -> Path | None:
    candidates = []
    if os.environ.get(env.BPF_DIR):
        candidates.append(Path(os.environ[env.BPF_DIR]))
    candidates.append(Path("/usr/lib/tracefleet/bpf"))
    # a source checkout: agent/src/tracefleet/agent/hostcheck.py -> repo/build/bpf
    candidates.append(Path(__file__).resolve().parents[4] / "build" / "bpf")
    for c in candidates:
        if (c / "file.bpf.o").is_file():
            return c
    return None


def check_host(*, need_bpf_objects: bool = True) -> HostInfo:
    """Raise HostCheckError for the first thing that makes BPF capture impossible here."""
    caps = effective_caps()
    if not ({"CAP_BPF", "CAP_PERFMON"} <= caps or "CAP_SYS_ADMIN" in caps):
        raise HostCheckError(
            "missing privileges: loading tracing BPF programs needs CAP_BPF and CAP_PERFMON "
            f"(or CAP_SYS_ADMIN); this process has {sorted(caps) or 'none'}",
            "Run as root (sudo tracefleet-agent ...) or grant those capabilities",
        )
    if not BTF_PATH.exists():
        raise HostCheckError(
            f"{BTF_PATH} is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF=n), so the "
            "CO-RE objects cannot be relocated",
            "Use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's "
            "kernel since 2021 is)",
        )
    tracefs = tracefs_mount()
    if not tracefs:
        raise HostCheckError(
            "tracefs is not mounted: syscall tracepoints cannot be attached",
            "Mount it: mount -t tracefs tracefs /sys/kernel/tracing (in a container, "
            "mount the host's /sys/kernel/tracing)",
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
    )


def btf_has_name(name: str) -> bool:
    """Whether the kernel's BTF mentions ``name`` (e.g. a kfunc); a cheap presence test."""
    try:
        return f"\0{name}\0".encode() in BTF_PATH.read_bytes()
    except OSError:
        return False
