"""Events for people, like strace:

    21:14:58.123456  4242 cat              openat(AT_FDCWD, "/nonexistent", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory) <0.000012>

Every text that came from the traced process (comm, paths, argv, node names) is escaped
like ``strace -x``: control characters never reach the terminal raw (an ANSI sequence in a
file name could rewrite the screen). JSON output is not escaped: it stays exact.
"""

from __future__ import annotations

import errno
import os
import time

from tracefleet.model.event import Arg, Event, FlagSet, OpenHow, SocketAddress, flag_names

_ESC = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", '"': '\\"'}


def escape(s: str, quote: bool = False) -> str:
    """Non-printable characters (C0/C1 controls, DEL, bidi and other format characters) as
    \\xNN / \\uNNNN; with quote, also \\ and " so the quoted string reads back unambiguous."""
    out = []
    for ch in s:
        if quote and ch in _ESC:
            out.append(_ESC[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ch in "\n\t\r":
            out.append(_ESC[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def quoted(s: str) -> str:
    return '"' + escape(s, quote=True) + '"'


_FD_ARGS = frozenset({"dfd", "olddfd", "newdfd", "fd"})
_AT_FDCWD = -100
_FAMILIES = {"inet": "AF_INET", "inet6": "AF_INET6", "unix": "AF_UNIX"}
# strace's argument order per syscall (the decoder emits integer arguments first)
_ORDER = {
    "openat": ("dfd", "pathname", "flags", "mode"),
    "openat2": ("dfd", "pathname", "how", "usize"),
    "open": ("pathname", "flags", "mode"),
    "creat": ("pathname", "mode"),
    "unlinkat": ("dfd", "pathname", "flags"),
    "renameat2": ("olddfd", "oldname", "newdfd", "newname", "flags"),
    "mkdirat": ("dfd", "pathname", "mode"),
    "fchmodat": ("dfd", "pathname", "mode"),
    "truncate": ("pathname", "length"),
    "statx": ("dfd", "pathname", "flags", "mask"),
    "readlinkat": ("dfd", "pathname", "bufsiz"),
    "newfstatat": ("dfd", "pathname", "flags"),
    "readlink": ("pathname", "bufsiz"),
    "mkdir": ("pathname", "mode"),
    "chmod": ("pathname", "mode"),
    "execve": ("filename", "argv"),
    "execveat": ("dfd", "filename", "argv", "flags"),
    "connect": ("fd", "addr", "addrlen"),
    "bind": ("fd", "addr", "addrlen"),
    "accept4": ("fd", "peer", "flags"),
    "sendto": ("fd", "len", "flags", "addr"),
}
_CREATES = getattr(os, "O_CREAT", 0o100) | getattr(os, "O_TMPFILE", 0)


def sockaddr_text(s: SocketAddress) -> str:
    fam = _FAMILIES.get(s.family, s.family)
    if s.family == "inet":
        return (f"{{sa_family={fam}, sin_port=htons({s.port}), "
                f"sin_addr=inet_addr({quoted(s.address)})}}")  # fmt: skip
    if s.family == "inet6":
        return (f"{{sa_family={fam}, sin6_port=htons({s.port}), "
                f"sin6_addr={quoted(s.address)}}}")  # fmt: skip
    if s.family == "unix":
        return f"{{sa_family={fam}, sun_path={quoted(s.path)}}}"
    return f"{{sa_family={escape(fam)}, sa_data=0x{s.raw.hex()}}}"


def _flags(names: tuple[str, ...] | list[str], raw: int) -> str:
    return "|".join(escape(n) for n in names) if names else str(raw)


def value_text(name: str, a: Arg, syscall: str = "") -> str:
    v = a.value
    if v is None:
        err = f" {escape(a.error)}" if a.error else ""
        return f"<{escape(a.status)}{err}>"
    if isinstance(v, FlagSet):
        text = _flags(v.names, v.raw)
    elif isinstance(v, bool):
        text = str(v)
    elif isinstance(v, int):
        if name in _FD_ARGS and v == _AT_FDCWD:
            text = "AT_FDCWD"
        elif name == "mode":
            text = f"0{v:o}" if v else "0"
        else:
            names = flag_names(syscall, name, v)
            text = _flags(names, v) if names is not None else str(v)
    elif isinstance(v, str):
        text = quoted(v) + ("..." if a.status == "truncated" else "")
    elif isinstance(v, list):
        text = "[" + ", ".join(quoted(x) for x in v) + "]"
        text += "..." if a.status == "truncated" else ""
    elif isinstance(v, SocketAddress):
        text = sockaddr_text(v)
    elif isinstance(v, OpenHow):
        oflags = flag_names("openat", "flags", v.flags) or ()
        text = (f"{{flags={_flags(oflags, v.flags)}, mode=0{v.mode:o}, "
                f"resolve={v.resolve:#x}}}")  # fmt: skip
    if a.status in ("recovered", "torn"):
        text += f"<{a.status}:{escape(a.strategy)}>"
    return text


def _ordered(e: Event) -> list[str]:
    order = _ORDER.get(e.syscall, ())
    names = [n for n in order if n in e.args]
    names += [n for n in e.args if n not in names]
    if e.syscall in ("open", "openat") and "mode" in names:
        flags = e.args.get("flags")
        raw = (
            flags.value.raw if flags and isinstance(flags.value, FlagSet) else flags and flags.value
        )
        if isinstance(raw, int) and not raw & _CREATES:
            names.remove("mode")  # strace prints the mode only when the call can create
    return names


def call_text(e: Event) -> str:
    """``syscall(args) = ret <duration>``; vfs operations (not syscalls) name their args."""
    named = not e.syscall or e.syscall.startswith("vfs_") or e.syscall not in _ORDER
    parts = []
    for n in _ordered(e):
        text = value_text(n, e.args[n], e.syscall)
        parts.append(f"{escape(n)}={text}" if named else text)
    ret = ret_text(e.ret)
    dur = f" <{e.duration_ns / 1e9:.6f}>" if e.duration_ns else ""
    return f"{escape(e.syscall)}({', '.join(parts)}) = {ret}{dur}"


def ret_text(ret: int) -> str:
    if -4096 < ret < 0:
        name = errno.errorcode.get(-ret, str(-ret))
        return f"-1 {name} ({os.strerror(-ret)})"
    return str(ret)


def clock_text(time_ns: int) -> str:
    """HH:MM:SS.uuuuuu UTC; dashes when the wall-clock time is unknown (older agent)."""
    if not time_ns:
        return "--:--:--.------"
    secs = time_ns // 1_000_000_000
    return time.strftime("%H:%M:%S", time.gmtime(secs)) + f".{time_ns % 1_000_000_000 // 1000:06d}"


def workload_text(e: Event) -> str:
    """NAMESPACE POD CONTAINER columns: ``-`` for what is not known; a container without pod
    metadata shows its short id; a process in no container shows ``(host)``."""
    if e.attribution == "host":
        return f"{'-':<14} {'(host)':<28} {'-':<14}"
    cont = e.container or (e.container_id[:12] if e.container_id else "-")
    return f"{escape(e.namespace or '-'):<14} {escape(e.pod or '-'):<28} {escape(cont):<14}"


EXE_WIDTH = 32  # the EXE column of wide tables; a longer path pushes the call right


def line(e: Event, node_width: int = 0, workload: bool = False, exe: bool = False) -> str:
    """One aligned line; with node_width, a NODE column after the time; with workload, the
    NAMESPACE, POD and CONTAINER columns; with exe (wide tables), EXE after COMM (``-``:
    not known)."""
    node = f" {escape(e.node):<{node_width}}" if node_width else ""
    wl = f" {workload_text(e)}" if workload else ""
    x = f" {escape(e.exe or '-'):<{EXE_WIDTH}}" if exe else ""
    return (f"{clock_text(e.time_ns)}{node}{wl} {e.pid:>7} {escape(e.comm):<16}{x} "
            f"{call_text(e)}")  # fmt: skip


def header(node_width: int = 0, workload: bool = False, exe: bool = False) -> str:
    node = f" {'NODE':<{node_width}}" if node_width else ""
    wl = f" {'NAMESPACE':<14} {'POD':<28} {'CONTAINER':<14}" if workload else ""
    x = f" {'EXE':<{EXE_WIDTH}}" if exe else ""
    return f"{'TIME (UTC)':<15}{node}{wl} {'PID':>7} {'COMM':<16}{x} CALL"
