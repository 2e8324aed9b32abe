"""User-space fallback: read what the kernel could not, from the traced process itself.

process_vm_readv faults pages in on the remote side, so it reads memory that a non-sleepable
BPF program cannot. It is racy, and every result says so with strategy ``user-fallback``: by
the time the agent reads, the process may have exited (the argument stays ``lost``), or
changed or unmapped the memory (the value read may differ from what the syscall saw).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

from tracefleet.agent.capture.contain import ErrorCounter
from tracefleet.agent.capture.decode import SYSCALL_NAMES, decode_struct
from tracefleet.agent.capture.eventsets import arg_spec
from tracefleet.agent.kernel.abi import (
    TF_ARG_MAX,
    TF_ARGV_COUNT,
    TF_BLOB_MAX,
    TF_PATH_MAX,
    Status,
    Strategy,
    TfBlob,
    TfEvent,
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


def read_remote_prefix(pid: int, addr: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``addr``, page by page: the readable prefix, stopping at the
    first unreadable page (a read crossing into it returns only what precedes it). Raises
    OSError if nothing at all could be read."""
    out = b""
    while len(out) < size:
        chunk = min(size - len(out), PAGE - ((addr + len(out)) % PAGE))
        try:
            part = read_remote(pid, addr + len(out), chunk)
        except OSError:
            if out:
                break
            raise
        out += part
        if len(part) < chunk:
            break
    return out


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


# ---- identity of the caller ----------------------------------------------------------------
# A record names its caller by tid only, and the agent reads later: the thread may have exited
# and its tid been given to another process. So a read is kept only if (1) a pidfd opened on
# the tid before reading still shows the task alive after the last read (while it lives its
# tid cannot be reused, so every read by tid in between reached it), and (2) that task started
# no later than the call (/proc/<tid>/stat starttime against the record's timestamp).
# Residual: /proc gives the start time in clock ticks (10 ms), so a tid reused within the tick
# of the call passes (2); it would also need the caller to exit and the tid to come round.

_SYS_PIDFD_OPEN = 434  # same number on every architecture (asm-generic)
_PIDFD_THREAD = os.O_EXCL  # a pidfd on a thread, not only a thread-group leader (Linux 6.9)
_libc.syscall.restype = ctypes.c_long
TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_STAT_MAX = 4096  # /proc/<tid>/stat is one short line; comm is at most 15 bytes


# every value of CallerGone.cause (a bounded metric label), plus the exit seen after the reads
CALLER_CAUSES = ("pid-reused", "caller-exited", "caller-unpinnable")


class CallerGone(Exception):
    """The task that made the call cannot be read safely; ``cause`` is a short label."""

    def __init__(self, cause: str, err: int, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.errno = err


def start_ticks(tid: int) -> int:
    """Start time of task ``tid`` in clock ticks since boot (/proc/<tid>/stat field 22)."""
    fd = os.open(f"/proc/{tid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        line = os.read(fd, _STAT_MAX)
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and ')': fields 3.. follow the last ')'
    rest = line.rpartition(b")")[2].split()
    if len(rest) < 20:
        raise OSError(errno.EINVAL, f"/proc/{tid}/stat: unexpected format")
    return int(rest[19])


def _pidfd_open(pid: int, flags: int) -> int:
    fd = _libc.syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(flags))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def _gone(tid: int, e: OSError) -> CallerGone:
    if e.errno == errno.ESRCH:
        return CallerGone("caller-exited", errno.ESRCH, f"tid {tid} has exited")
    return CallerGone("caller-unpinnable", e.errno or errno.ESRCH,
                      f"pidfd_open({tid}): {e.strerror}")  # fmt: skip


def _boot_offset_ns() -> int:
    """CLOCK_BOOTTIME - CLOCK_MONOTONIC: the record's timestamp is bpf_ktime_get_ns()
    (monotonic), /proc start times count from boot including suspend."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Caller:
    """The task that made one call, pinned by a pidfd for the duration of the reads.

    ``tid`` is the id to read through: the calling thread where the kernel gives pidfds on
    threads (Linux 6.9+, PIDFD_THREAD), else its thread group (memory is shared by threads;
    a pidfd without PIDFD_THREAD can only name a group leader)."""

    def __init__(self, tid: int, tgid: int, call_ns: int) -> None:
        self.tid = tid
        try:
            self.pidfd = _pidfd_open(tid, _PIDFD_THREAD)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise _gone(tid, e) from e
            self.tid = tgid  # before Linux 6.9
            try:
                self.pidfd = _pidfd_open(tgid, 0)
            except OSError as e2:
                raise _gone(tgid, e2) from e2
        try:
            started = start_ticks(self.tid) * TICK_NS
        except (OSError, ValueError) as e:
            os.close(self.pidfd)
            raise CallerGone("caller-exited", errno.ESRCH, f"/proc/{self.tid}/stat: {e}") from e
        if started > call_ns + _boot_offset_ns():
            os.close(self.pidfd)
            why = f"tid {self.tid} now belongs to a task started after the call"
            raise CallerGone("pid-reused", errno.ESRCH, why)

    def alive(self) -> bool:
        """True while the pinned task has not exited (a pidfd polls readable once it has)."""
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)

    def close(self) -> None:
        os.close(self.pidfd)


class UserFallback:
    """Recovers lost arguments of decoded records in place; counts what it did.

    Use: ``caller = fb.caller(tid, pid, ts_ns)`` (CallerGone if the tid cannot be tied to the
    call), the fix_* methods with ``caller.tid``, then ``caller.alive()`` before trusting
    what was read, and ``caller.close()``."""

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

    @staticmethod
    def caller(tid: int, tgid: int, call_ns: int) -> Caller:
        return Caller(tid, tgid, call_ns)

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
        to the old address space. The pointer array and every string are read bounded and
        length-checked: an array that runs into unreadable memory before its NULL (what made
        the kernel fail with EFAULT) gives the strings before it, ``truncated`` with EFAULT."""
        if e.argv_status != Status.LOST or not e.argv_uptr or not self.available:
            return False
        if e.hdr.ret == 0:
            return False
        try:
            ptrs = read_remote_prefix(pid, e.argv_uptr, 8 * (TF_ARGV_COUNT + 1))
        except OSError as err:
            self.failed += 1
            e.argv_err = -(err.errno or errno.EFAULT)
            return False
        argc = 0
        truncated = False
        fault = 0
        for i in range(TF_ARGV_COUNT + 1):
            if 8 * (i + 1) > len(ptrs):  # the array runs into unreadable memory
                fault = errno.EFAULT
                break
            (p,) = struct.unpack_from("=Q", ptrs, 8 * i)
            if not p:
                break
            if i == TF_ARGV_COUNT:
                truncated = True
                break
            try:
                data, t = read_remote_str(pid, p, TF_ARG_MAX)
            except OSError as err:
                fault = err.errno or errno.EFAULT
                break
            truncated |= t
            _put(e, TfExecEvent.argv.offset + i * TF_ARG_MAX, data)
            e.arg_len[i] = len(data)
            argc = i + 1
        if fault and not argc:
            self.failed += 1
            e.argv_err = -fault
            return False
        e.argc = argc
        e.argv_err = -fault
        e.argv_status = Status.TRUNCATED if truncated or fault else Status.RECOVERED
        e.argv_strategy = Strategy.USER_FALLBACK
        self.recovered += 1
        return True


# ---- per record ----------------------------------------------------------------------------
class RecordFallback:
    """Applies the fallback to one decoded record of the ring: finds its lost arguments, reads
    them from the caller (only while the record's tid provably is the caller) and re-decodes.
    What it did is reported to ``recovered(set, n, truncated)`` and ``rejected[(set, cause)]``
    (the engine's accounting); its own failures go to ``errors``, never to the consumer."""

    def __init__(
        self,
        fallback: UserFallback,
        errors: ErrorCounter,
        recovered: Callable[[str, int, int], None],
        rejected: collections.Counter[tuple[str, str]],
    ) -> None:
        self.fb = fallback
        self.errors = errors
        self._recovered = recovered
        self._rejected = rejected

    def event(
        self, ev: dict[str, Any], rec: ctypes.Structure, name: str, now: int
    ) -> dict[str, Any]:
        """``ev`` with what the user-space fallback recovered; on any failure the affected
        argument stays as the kernel left it, with a ``fallback`` note saying why."""
        try:
            changed, notes = self.apply(rec, name)
        except Exception as e:
            self.errors.count(name, "fallback", e)
            return ev
        if changed:
            try:
                ev = decode_struct(rec, now)  # re-decode with the recovered values
            except Exception as e:
                self.errors.count(name, "decode", e)
        for arg, note in notes.items():
            if isinstance(ev["args"].get(arg), dict):
                ev["args"][arg]["fallback"] = note
        return ev

    def targets(self, rec: ctypes.Structure) -> list[tuple[str, int, int, Any]]:
        """(argument name, offset, size, fix) of each lost argument the fallback may re-read;
        ``fix(tid)`` patches it in ``rec`` and returns its new status, or 0 if it did not."""
        fb = self.fb

        def lost(arg: TfStr | TfBlob) -> bool:
            return arg.status == Status.LOST and bool(arg.uptr)

        out: list[tuple[str, int, int, Any]] = []
        if isinstance(rec, TfExecEvent):
            # after a successful exec the pointers belong to the old address space
            if rec.hdr.ret == 0:
                return out
            if lost(rec.filename):
                out.append(("filename", TfExecEvent.filename.offset, ctypes.sizeof(TfStr),
                            lambda tid: fb.fix_str(tid, rec.filename)
                            and rec.filename.status))  # fmt: skip
            off = TfExecEvent.argv_uptr.offset
            if rec.argv_status == Status.LOST and rec.argv_uptr:
                out.append(("argv", off, ctypes.sizeof(TfExecEvent) - off,
                            lambda tid: fb.fix_argv(tid, rec) and rec.argv_status))  # fmt: skip
        elif isinstance(rec, TfEvent):
            spec = arg_spec(rec.hdr.event_set, SYSCALL_NAMES.get(rec.hdr.syscall, ""))
            for i, s in enumerate(rec.str):
                if not lost(s):
                    continue
                arg = spec.strs[i] if i < len(spec.strs) else f"str{i}"
                out.append((arg, TfEvent.str.offset + i * ctypes.sizeof(TfStr),
                            ctypes.sizeof(TfStr),
                            lambda tid, s=s: fb.fix_str(tid, s) and s.status))  # fmt: skip
            # a length behind a pointer (accept4) is not re-read
            if spec.blob_len >= 0 and lost(rec.blob):
                n = int(rec.iargs[spec.blob_len])
                out.append((spec.blob or "blob", TfEvent.blob.offset, ctypes.sizeof(TfBlob),
                            lambda tid: fb.fix_blob(tid, rec.blob, n)
                            and rec.blob.status))  # fmt: skip
        return out

    def apply(self, rec: ctypes.Structure, set_name: str) -> tuple[bool, dict[str, str]]:
        """Re-read lost arguments from the caller, only if the record's tid still is the task
        that made the call (Caller). Returns (anything recovered, notes per argument for the
        event). Each argument is contained on its own: a failure restores its bytes."""
        notes: dict[str, str] = {}
        targets = self.targets(rec)
        if not targets:
            return False, notes
        hdr = rec.hdr
        base = ctypes.addressof(rec)
        saved = bytes(rec)
        try:
            caller = self.fb.caller(hdr.tid, hdr.pid, hdr.ts_ns)
        except CallerGone as e:
            self._rejected[(set_name, e.cause)] += 1
            for arg, *_ in targets:
                notes[arg] = e.cause
            return False, notes
        n = truncated = 0
        try:
            for arg, off, size, fix in targets:
                try:
                    status = fix(caller.tid)
                    n += bool(status)
                    truncated += status == Status.TRUNCATED
                except Exception as e:
                    ctypes.memmove(base + off, saved[off : off + size], size)
                    self.errors.count(set_name, "fallback", e)
                    notes[arg] = f"agent error: {type(e).__name__}"
            if n and not caller.alive():
                # it exited during the reads: its tid may have reached another task
                ctypes.memmove(base, saved, len(saved))
                self._rejected[(set_name, "caller-exited")] += 1
                for arg, *_ in targets:
                    notes.setdefault(arg, "caller-exited")
                return False, notes
        finally:
            caller.close()
        if n:
            self._recovered(set_name, n, truncated)
        return bool(n), notes
