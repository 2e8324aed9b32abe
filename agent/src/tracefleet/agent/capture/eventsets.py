"""The event sets: named groups of probes, one BPF object each (bpf/<name>.bpf.c).

Each syscall of a set is built from program variants named ``<variant>_<syscall>`` (see
bpf/include/tracefleet/syscall_event.bpf.h); the strategy picks which entry variant loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracefleet.agent.kernel.abi import EventSetId, Strategy


@dataclass(frozen=True)
class ArgSpec:
    """How to name and decode a syscall's arguments in an event."""

    ints: tuple[tuple[str, int], ...] = ()  # (name, index into iargs)
    strs: tuple[str, ...] = ()  # names of str[0], str[1]
    blob: str = ""  # name of the blob argument, if any
    blob_kind: str = ""  # "open_how" | "sockaddr"
    # index of the argument holding the blob's length; -1 when it is not an argument value
    # (accept4 passes a pointer to it), as in the TF_SYSCALL table of the .bpf.c
    blob_len: int = -1


@dataclass(frozen=True)
class KernelHook:
    """Programs of one operation that attach to a kernel function (fentry/fexit) and read
    its parameters by position: loaded only if the running kernel's BTF has the function
    with those parameter names at those positions, so a changed signature is skipped with
    its reason instead of read wrong."""

    op: str
    function: str
    programs: tuple[str, ...]
    params: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class EventSetSpec:
    name: str
    set_id: EventSetId
    object_file: str
    syscalls: dict[str, ArgSpec]
    extra_programs: tuple[str, ...] = ()  # attached with every strategy (e.g. exec hook)
    # per-thread state between entry and exit: a tid-keyed hash the agent sizes, counts and
    # reaps (exec, vfs), or "" for task-local storage (syscall_event.bpf.h), whose calls in
    # flight the kernel counts in ``inflight_counter`` (per CPU)
    inflight_map: str = ""
    summary: str = ""
    # sets whose rungs are hooks rather than ways to read user memory (vfs): the rungs,
    # best first, and the programs of each
    ladder: tuple[Strategy, ...] = ()
    hook_programs: dict[Strategy, tuple[str, ...]] | None = None
    kernel_hooks: tuple[KernelHook, ...] = ()

    @property
    def inflight_counter(self) -> str:
        """The per-CPU count of calls in flight of a task-storage set ("" for a hash set)."""
        return "" if self.inflight_map else "tf_inflight_n"

    @property
    def calls_accounted(self) -> bool:
        """Syscall sets keep the call identity (passed = written + dropped + lost + ...);
        hook sets (vfs) have no entry/exit pairing to account."""
        return not self.ladder

    def entry_program(self, syscall: str, strategy: Strategy) -> str:
        prefix = {
            Strategy.SLEEPABLE: "tps_enter",
            Strategy.FENTRY_SLEEPABLE: "fs_enter",
            Strategy.EXIT_RETRY: "tp_enter",
            Strategy.USER_FALLBACK: "tp_enter",
            Strategy.NOFAULT: "tp_enter",
        }[strategy]
        return f"{prefix}_{syscall}"

    def programs(self, strategy: Strategy) -> list[str]:
        if self.hook_programs is not None:
            return list(self.hook_programs.get(strategy, ()))
        progs = []
        for sc in self.syscalls:
            progs += [self.entry_program(sc, strategy), f"tp_exit_{sc}"]
        return progs + list(self.extra_programs)


_DFD = ("dfd", 0)

FILE = EventSetSpec(
    name="file",
    set_id=EventSetId.FILE,
    object_file="file.bpf.o",
    extra_programs=("tp_thread_exit",),
    summary="path-taking file syscalls (open, unlink, rename, mkdir, chmod, stat, ...)",
    syscalls={
        "openat": ArgSpec(ints=(_DFD, ("flags", 2), ("mode", 3)), strs=("pathname",)),
        "openat2": ArgSpec(
            ints=(_DFD, ("usize", 3)),
            strs=("pathname",),
            blob="how",
            blob_kind="open_how",
            blob_len=3,
        ),
        "creat": ArgSpec(ints=(("mode", 1),), strs=("pathname",)),
        "unlinkat": ArgSpec(ints=(_DFD, ("flags", 2)), strs=("pathname",)),
        "renameat2": ArgSpec(
            ints=(("olddfd", 0), ("newdfd", 2), ("flags", 4)), strs=("oldname", "newname")
        ),
        "mkdirat": ArgSpec(ints=(_DFD, ("mode", 2)), strs=("pathname",)),
        "fchmodat": ArgSpec(ints=(_DFD, ("mode", 2)), strs=("pathname",)),
        "truncate": ArgSpec(ints=(("length", 1),), strs=("pathname",)),
        "statx": ArgSpec(ints=(_DFD, ("flags", 2), ("mask", 3)), strs=("pathname",)),
        "readlinkat": ArgSpec(ints=(_DFD, ("bufsiz", 3)), strs=("pathname",)),
        "chdir": ArgSpec(strs=("pathname",)),
        # legacy x86-64 entry points that glibc still uses
        "open": ArgSpec(ints=(("flags", 1), ("mode", 2)), strs=("pathname",)),
        "mkdir": ArgSpec(ints=(("mode", 1),), strs=("pathname",)),
        "unlink": ArgSpec(strs=("pathname",)),
        "rmdir": ArgSpec(strs=("pathname",)),
        "rename": ArgSpec(strs=("oldname", "newname")),
        "chmod": ArgSpec(ints=(("mode", 1),), strs=("pathname",)),
        "newfstatat": ArgSpec(ints=(_DFD, ("flags", 3)), strs=("pathname",)),
        "readlink": ArgSpec(ints=(("bufsiz", 2),), strs=("pathname",)),
    },
)

EXEC = EventSetSpec(
    name="exec",
    set_id=EventSetId.EXEC,
    object_file="exec.bpf.o",
    summary="execve and execveat with filename and argv",
    syscalls={
        "execve": ArgSpec(strs=("filename",)),
        "execveat": ArgSpec(ints=(_DFD, ("flags", 4)), strs=("filename",)),
    },
    extra_programs=("tp_sched_exec",),
    inflight_map="tf_exec_inflight",
)

NET = EventSetSpec(
    name="net",
    set_id=EventSetId.NET,
    object_file="net.bpf.o",
    extra_programs=("tp_thread_exit",),
    summary="connect, bind, accept4, sendto with the socket address",
    syscalls={
        "connect": ArgSpec(
            ints=(("fd", 0), ("addrlen", 2)), blob="addr", blob_kind="sockaddr", blob_len=2
        ),
        "bind": ArgSpec(
            ints=(("fd", 0), ("addrlen", 2)), blob="addr", blob_kind="sockaddr", blob_len=2
        ),
        "accept4": ArgSpec(ints=(("fd", 0), ("flags", 3)), blob="peer", blob_kind="sockaddr"),
        "sendto": ArgSpec(
            ints=(("fd", 0), ("len", 2), ("flags", 3)),
            blob="addr",
            blob_kind="sockaddr",
            blob_len=5,
        ),
    },
)

# vfs: one operation per record, whichever hook saw it (bpf/vfs.bpf.c)
_VFS_HOOKS = (
    KernelHook("open (bpf_d_path)", "security_file_open", ("vf_open_lsm",), ((0, "file"),)),
    KernelHook("open", "vfs_open", ("vf_open",), ((0, "path"), (1, "file"))),
    KernelHook("read", "vfs_read", ("vf_read",), ((0, "file"), (3, "pos"))),
    KernelHook("write", "vfs_write", ("vf_write",), ((0, "file"), (3, "pos"))),
    KernelHook("readv", "vfs_readv", ("vf_readv",), ((0, "file"), (3, "pos"))),
    KernelHook("writev", "vfs_writev", ("vf_writev",), ((0, "file"), (3, "pos"))),
    KernelHook("close", "filp_flush", ("vf_close",), ((0, "filp"),)),
    KernelHook("truncate", "vfs_truncate", ("vf_truncate",), ((0, "path"), (1, "length"))),
    KernelHook("ftruncate", "do_ftruncate", ("vf_ftruncate",), ((0, "file"), (1, "length"))),
    KernelHook("unlink", "vfs_unlink", ("vf_unlink_enter", "vf_unlink"), ((2, "dentry"),)),
    KernelHook("rmdir", "vfs_rmdir", ("vf_rmdir_enter", "vf_rmdir"), ((2, "dentry"),)),
    KernelHook("rename", "vfs_rename", ("vf_rename_enter", "vf_rename"), ((0, "rd"),)),
    KernelHook("mkdir", "vfs_mkdir", ("vf_mkdir",), ((2, "dentry"), (3, "mode"))),
    KernelHook("symlink", "vfs_symlink", ("vf_symlink",), ((2, "dentry"), (3, "oldname"))),
    KernelHook("link", "vfs_link", ("vf_link",), ((0, "old_dentry"), (3, "new_dentry"))),
    KernelHook("setattr", "notify_change", ("vf_setattr",), ((1, "dentry"), (2, "attr"))),
)
_VFS_OPS = ("open", "close", "truncate", "unlink", "rename", "mkdir", "rmdir", "link",
            "symlink", "setattr")  # fmt: skip
# syscalls of the tracepoint hook, as in the TF_VFS_SC* table of bpf/vfs.bpf.c
_VFS_SYSCALLS = (
    "openat", "openat2", "read", "pread64", "readv", "preadv", "preadv2", "write",
    "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "truncate", "unlinkat",
    "renameat", "renameat2", "mkdirat", "linkat", "symlinkat", "fchmod", "fchmodat", "fchown",
    "fchownat", "utimensat",
    # legacy x86-64 entry points
    "open", "creat", "unlink", "rmdir", "rename", "mkdir", "link", "symlink", "chmod", "chown",
    "lchown",
)  # fmt: skip

VFS = EventSetSpec(
    name="vfs",
    set_id=EventSetId.VFS,
    object_file="vfs.bpf.o",
    summary="file activity on any file system: open, close (with bytes read and written), "
    "truncate, unlink, rename, mkdir, rmdir, link, symlink, setattr",
    syscalls={f"vfs_{op}": ArgSpec() for op in _VFS_OPS},
    inflight_map="tf_vfs_inflight",
    ladder=(Strategy.FENTRY, Strategy.TRACEPOINT),
    hook_programs={
        Strategy.FENTRY: tuple(p for h in _VFS_HOOKS for p in h.programs),
        Strategy.TRACEPOINT: (*(f"vt_{sc}" for sc in _VFS_SYSCALLS), "vt_close_enter", "vt_close"),
    },
    kernel_hooks=_VFS_HOOKS,
)

EVENT_SETS: dict[str, EventSetSpec] = {s.name: s for s in (FILE, EXEC, NET, VFS)}
BY_ID: dict[int, EventSetSpec] = {int(s.set_id): s for s in EVENT_SETS.values()}


def arg_spec(set_id: int, syscall: str) -> ArgSpec:
    """How to read the arguments of ``syscall`` in event set ``set_id`` (empty if unknown)."""
    spec = BY_ID.get(set_id)
    return spec.syscalls.get(syscall, ArgSpec()) if spec else ArgSpec()


class UnknownEventSet(ValueError):
    pass


def parse_event_sets(text: str) -> list[EventSetSpec]:
    """``"file,exec"`` -> specs; unknown names raise UnknownEventSet listing the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownEventSet(f"no event set given; known: {', '.join(EVENT_SETS)}")
    out = []
    for n in names:
        if n not in EVENT_SETS:
            raise UnknownEventSet(f"unknown event set {n!r}; known: {', '.join(EVENT_SETS)}")
        if EVENT_SETS[n] not in out:
            out.append(EVENT_SETS[n])
    return out
