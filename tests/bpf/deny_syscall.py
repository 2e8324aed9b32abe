"""Run a command with one system call denied by a seccomp filter, as a container runtime's
profile does: ``python deny_syscall.py bpf EPERM -- CMD ARGS...`` (or ENOSYS, which is
what a kernel without the system call answers). The filter is inherited across exec and by
every child; the process keeps its capabilities (no_new_privs is set, which seccomp needs
without CAP_SYS_ADMIN and which changes nothing for root)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

# (AUDIT_ARCH_*, {syscall: number})
ARCH = {
    "x86_64": (0xC000003E, {"bpf": 321, "perf_event_open": 298}),
    "aarch64": (0xC00000B7, {"bpf": 280, "perf_event_open": 241}),
}
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def deny(syscall: str, err: int) -> None:
    audit, numbers = ARCH[platform.machine()]
    prog = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 0, 3, audit),  # another ABI: allow
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JEQ_K, 0, 1, numbers[syscall]),
        (_RET_K, 0, 0, _RET_ERRNO | err),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _FProg(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    deny(argv[0], getattr(errno, argv[1]))
    os.execvp(argv[3], argv[3:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
