"""User-space fallback: read what the kernel could not, from the traced process itself.

process_vm_readv faults pages in on the remote side, so it reads memory that a non-sleepable
BPF program cannot. It is racy, and every result says so with strategy ``user-fallback``: by
the time the agent reads, the process may have exited (the argument stays ``lost``), or
changed or unmapped the memory (the value read may differ from what the syscall saw).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from tracefleet.agent._internal.abi import (
    TF_ARG_MAX,
    TF_ARGV_COUNT,
    TF_BLOB_MAX,
    TF_PATH_MAX,
    Status,
    Strategy,
    TfBlob,
    TfExecEvent,
    TfStr,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def read_remote(pid: int, addr: int, size: int) -> bytes:
    """Read up to ``size`` bytes at ``addr`` in ``pid``; stops early at an unreadable page.
    Raises OSError if nothing at all could be read."""
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = _IoVec(addr, size)
    n = _pvr(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[:n]


def read_remote_str(pid: int, addr: int, limit: int) -> tuple[bytes, bool]:
    """A NUL-terminated string of at most ``limit - 1`` bytes: (bytes, truncated)."""
    out = b""
    while len(out) < limit:
        chunk = min(limit - len(out), PAGE - ((addr + len(out)) % PAGE))
        part = read_remote(pid, addr + len(out), chunk)
        nul = part.find(b"\0")
        if nul >= 0:
            return out + part[:nul], False
        out += part
        if len(part) < chunk:
            raise OSError(errno.EFAULT, "string runs into an unreadable page")
    return out[: limit - 1], True


def _put(struct: ctypes.Structure, field_offset: int, data: bytes) -> None:
    """Write into a char-array field in place (reading such a field yields a bytes copy)."""
    ctypes.memmove(ctypes.addressof(struct) + field_offset, data, len(data))


class UserFallback:
    """Recovers lost arguments of decoded records in place; counts what it did."""

    def __init__(self) -> None:
        self.recovered = 0
        self.failed = 0
        self.available, self.reason = self._probe()

    @staticmethod
    def _probe() -> tuple[bool, str]:
        try:
            read_remote(os.getpid(), ctypes.addressof(ctypes.c_int(1)), 4)
        except OSError as e:
            return False, f"process_vm_readv unavailable: {e.strerror}"
        return True, "process_vm_readv (needs CAP_SYS_PTRACE for other users' processes)"

    def fix_str(self, pid: int, s: TfStr, limit: int = TF_PATH_MAX) -> bool:
        if s.status != Status.LOST or not s.uptr or not self.available:
            return False
        try:
            data, truncated = read_remote_str(pid, s.uptr, limit)
        except OSError as e:
            self.failed += 1
            s.err = -(e.errno or errno.EFAULT)
            return False
        _put(s, TfStr.data.offset, data)
        s.len = len(data)
        s.err = 0
        s.status = Status.TRUNCATED if truncated else Status.RECOVERED
        s.strategy = Strategy.USER_FALLBACK
        self.recovered += 1
        return True

    def fix_blob(self, pid: int, b: TfBlob, length: int) -> bool:
        if b.status != Status.LOST or not b.uptr or not self.available:
            return False
        n = max(0, min(length, TF_BLOB_MAX))
        try:
            data = read_remote(pid, b.uptr, n)
            if len(data) < n:
                raise OSError(errno.EFAULT, "short read")
        except OSError as e:
            self.failed += 1
            b.err = -(e.errno or errno.EFAULT)
            return False
        _put(b, TfBlob.data.offset, data)
        b.len = n
        b.err = 0
        b.status = Status.TRUNCATED if length > TF_BLOB_MAX else Status.RECOVERED
        b.strategy = Strategy.USER_FALLBACK
        self.recovered += 1
        return True

    def fix_argv(self, pid: int, e: TfExecEvent) -> bool:
        """Only meaningful when the exec failed: after a successful exec the pointers belong
        to the old address space."""
        if e.argv_status != Status.LOST or not e.argv_uptr or not self.available:
            return False
        if e.hdr.ret == 0:
            return False
        try:
            ptrs = read_remote(pid, e.argv_uptr, 8 * (TF_ARGV_COUNT + 1))
            argc = 0
            truncated = False
            for i in range(TF_ARGV_COUNT + 1):
                (p,) = struct.unpack_from("=Q", ptrs, 8 * i)
                if not p:
                    break
                if i == TF_ARGV_COUNT:
                    truncated = True
                    break
                data, t = read_remote_str(pid, p, TF_ARG_MAX)
                truncated |= t
                _put(e, TfExecEvent.argv.offset + i * TF_ARG_MAX, data)
                e.arg_len[i] = len(data)
                argc = i + 1
        except OSError as err:
            self.failed += 1
            e.argv_err = -(err.errno or errno.EFAULT)
            return False
        e.argc = argc
        e.argv_err = 0
        e.argv_status = Status.TRUNCATED if truncated else Status.RECOVERED
        e.argv_strategy = Strategy.USER_FALLBACK
        self.recovered += 1
        return True
