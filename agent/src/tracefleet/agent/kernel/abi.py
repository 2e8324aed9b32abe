"""Python mirror of bpf/include/tracefleet/events.h, the ABI between BPF and the agent.

Keep in step with the header: tests/bpf/test_abi_layout.py compares every struct here with
the BTF of the built objects, field by field (name, offset, size).
"""

from __future__ import annotations

import ctypes
import enum

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32, s64 = ctypes.c_int32, ctypes.c_int64

TF_COMM_LEN = 16
TF_PATH_MAX = 256
TF_BLOB_MAX = 128
TF_ARGV_COUNT = 16
TF_ARG_MAX = 128
TF_NSTR = 2
TF_SET_MAX = 8
TF_FILTER_PIDS = 8
TF_FILTER_COMMS = 4
TF_PREFIX_MAX = 64


class EventSetId(enum.IntEnum):
    FILE = 0
    EXEC = 1
    NET = 2
    VFS = 3


class Status(enum.IntEnum):
    NONE = 0
    OK = 1
    RECOVERED = 2
    LOST = 3
    TRUNCATED = 4
    PENDING = 5
    TORN = 6
    MISMATCH = 7  # re-read name differs from the file the kernel opened (kernel path in str[1])
    REREAD = 8  # struct re-read after the call: unverifiable

    @property
    def label(self) -> str:
        return self.name.lower()


class Strategy(enum.IntEnum):
    NONE = 0
    SLEEPABLE = 1
    FENTRY_SLEEPABLE = 2
    EXIT_RETRY = 3
    USER_FALLBACK = 4
    NOFAULT = 5
    FENTRY = 6  # vfs set: fentry/fexit on the vfs_* functions
    TRACEPOINT = 7  # vfs set: syscall tracepoints, fds resolved at exit

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Strategy:
        return cls[label.upper().replace("-", "_")]


class Syscall(enum.IntEnum):
    OPENAT = 1
    OPENAT2 = 2
    CREAT = 3
    UNLINKAT = 4
    RENAMEAT2 = 5
    MKDIRAT = 6
    FCHMODAT = 7
    TRUNCATE = 8
    STATX = 9
    READLINKAT = 10
    CHDIR = 11
    OPEN = 12
    MKDIR = 13
    UNLINK = 14
    RMDIR = 15
    RENAME = 16
    CHMOD = 17
    NEWFSTATAT = 18
    READLINK = 19
    EXECVE = 20
    EXECVEAT = 21
    CONNECT = 30
    BIND = 31
    ACCEPT4 = 32
    SENDTO = 33
    VFS_OPEN = 40
    VFS_CLOSE = 41
    VFS_TRUNCATE = 42
    VFS_UNLINK = 43
    VFS_RENAME = 44
    VFS_MKDIR = 45
    VFS_RMDIR = 46
    VFS_LINK = 47
    VFS_SYMLINK = 48
    VFS_SETATTR = 49


class Kind(enum.IntEnum):
    SYSCALL = 1
    EXEC = 2
    VFS = 3


class Stat(enum.IntEnum):
    EVENTS = 0
    DROPPED = 1
    ARG_OK = 2
    ARG_RECOVERED = 3
    ARG_LOST = 4
    ARG_TRUNCATED = 5
    FILTERED = 6
    INFLIGHT_FULL = 7
    ORPHAN_EXIT = 8
    ARG_TORN = 9
    PASSED = 10
    PREFIX_FILTERED = 11
    ARG_MISMATCH = 12
    ARG_REREAD = 13
    INFLIGHT_STALE = 14
    EXE_UNRESOLVED = 15


class PathKind(enum.IntEnum):
    NONE = 0
    D_PATH = 1
    WALK = 2
    MOUNT_REL = 3
    USER = 4
    AT_OPEN = 5  # close: the path resolved at open, kept with the open file (name at open)

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


TF_STAT_MAX = 16


class TfStr(ctypes.Structure):
    _fields_ = [
        ("uptr", u64),
        ("err", s32),
        ("len", u16),
        ("status", u8),
        ("strategy", u8),
        ("data", ctypes.c_char * TF_PATH_MAX),
    ]


class TfBlob(ctypes.Structure):
    _fields_ = [
        ("uptr", u64),
        ("err", s32),
        ("len", u16),
        ("status", u8),
        ("strategy", u8),
        ("data", u8 * TF_BLOB_MAX),
    ]


class TfHdr(ctypes.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("exit_ns", u64),
        ("cgroup_id", u64),
        ("ret", s64),
        ("pid", u32),
        ("tid", u32),
        ("kind", u16),
        ("syscall", u16),
        ("event_set", u8),
        ("strategy", u8),
        ("_pad", u8 * 2),
        ("comm", ctypes.c_char * TF_COMM_LEN),
        ("ppid", u32),
        ("uid", u32),
        ("gid", u32),
        ("ctx_ok", u32),
        ("exe_ino", u64),
        ("exe_dev", u32),
        ("exe_gen", u32),
    ]


class TfExeKey(ctypes.Structure):
    """Key of tf_exes (the executable's identity; its value is a TfStr, the path)."""

    _fields_ = [
        ("ino", u64),
        ("dev", u32),
        ("gen", u32),
    ]


class TfEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", TfHdr),
        ("iargs", s64 * 6),
        ("str", TfStr * TF_NSTR),
        ("blob", TfBlob),
    ]


class TfExecEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", TfHdr),
        ("iargs", s64 * 6),
        ("filename", TfStr),
        ("argv_uptr", u64),
        ("argv_err", s32),
        ("argc", u16),
        ("argv_status", u8),
        ("argv_strategy", u8),
        ("arg_len", u16 * TF_ARGV_COUNT),
        ("argv", (ctypes.c_char * TF_ARG_MAX) * TF_ARGV_COUNT),
    ]


class TfVfsEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", TfHdr),
        ("ino", u64),
        ("bytes_read", u64),
        ("bytes_written", u64),
        ("pos", u64),
        ("arg", u64),
        ("dev", u32),
        ("reads", u32),
        ("writes", u32),
        ("path_kind", u8),
        ("path2_kind", u8),
        ("_pad", u8 * 2),
        ("fstype", ctypes.c_char * 16),
        ("path", TfStr),
        ("path2", TfStr),
    ]


class TfFilter(ctypes.Structure):
    _fields_ = [
        ("npids", u32),
        ("ncomms", u32),
        ("cgroup_filter", u32),
        ("prefix_len", u32),
        ("follow", u32),
        ("_pad", u32),
        ("pids", u32 * TF_FILTER_PIDS),
        ("comms", (ctypes.c_char * TF_COMM_LEN) * TF_FILTER_COMMS),
        ("prefix", ctypes.c_char * TF_PREFIX_MAX),
    ]


class TfControl(ctypes.Structure):
    _fields_ = [
        ("enabled_bits", u64),
        ("filter", TfFilter * TF_SET_MAX),
        ("epoch", u32 * TF_SET_MAX),
    ]


class TfConfig(ctypes.Structure):
    _fields_ = [
        ("agent_tgid", u32),
        ("strategy", u32),
        ("wakeup_bytes", u64),
    ]


# C struct name -> Python mirror, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "tf_str": TfStr,
    "tf_blob": TfBlob,
    "tf_hdr": TfHdr,
    "tf_exe_key": TfExeKey,
    "tf_event": TfEvent,
    "tf_exec_event": TfExecEvent,
    "tf_vfs_event": TfVfsEvent,
    "tf_filter": TfFilter,
    "tf_control": TfControl,
    "tf_config": TfConfig,
}
