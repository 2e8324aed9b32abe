"""The compiled jsonl formatter (agent/native/jsonfmt.c, in libtfring.so beside the compiled
ring consumer): for ``capture -o jsonl``, a syscall record becomes its JSON line in C and is
written to the output fd, with no Python call per record.

The line is the one Python writes (``python_line``: ``Event.to_json`` and ``json.dumps``),
byte for byte. Every table the C code uses is handed over from here, from its one home: the
record layout (abi.py), the names of sets, syscalls, statuses, strategies and errnos, the flag
tables (``tracefleet.model.event.flag_table``), the argument specs (eventsets.py), the
realtime offset (decode.WALL_CLOCK) and each cgroup's workload fields, rendered by the model
(``ident_fragment``) once the workload resolver has settled them. The executable (``exe``) is
resolved in C as capture/exe.py's ExeResolver does it: the header's identity, a bounded cache,
one lookup in the ``tf_exes`` map (its fd handed over) on a miss, ``null`` when unknown with
the cause counted under ExeResolver's names (``exe_counters``). A record the C code cannot
render exactly (an exec or vfs record, a socket address, a cgroup not settled yet, ...) goes
to Python as before, and the reason is counted (``counters``). At start the formatter renders
a made-up record both ways and refuses to run if the two lines differ.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tracefleet.agent.capture.decode import (
    _ARGV_SHOWN,
    _BLOB_SHOWN,
    _INT32_ARGS,
    _PATH_KINDS,
    _SHOWN,
    _VFS_ARG,
    _VFS_PATH2,
    SYSCALL_NAMES,
    TF_ARGVH_SIZE,
    VFS_CLOSE_COUNTERS,
    decode_record,
    encode_record,
)
from tracefleet.agent.capture.eventsets import BY_ID
from tracefleet.agent.capture.exe import CAUSES
from tracefleet.agent.kernel.abi import (
    TF_ARG_MAX,
    TF_ARGV_COUNT,
    TF_BLOB_MAX,
    TF_PATH_MAX,
    Kind,
    PathKind,
    Status,
    Strategy,
    TfEvent,
    TfExecEvent,
    TfExeKey,
    TfHdr,
    TfStr,
    TfVfsEvent,
)
from tracefleet.model import Event
from tracefleet.model.event import FlagTable, flag_table

log = logging.getLogger("tracefleet.agent")

ABI = 3
_NAME_LEN, _MAX_SETS, _MAX_SYSCALLS, _MAX_CODES, _MAX_ERRNO = 48, 16, 128, 32, 256
_MAX_INTS, _MAX_STRS, _MAX_FLAGTABS, _MAX_FLAGBITS, _MAX_PLAIN = 6, 2, 16, 32, 6
_TAB_SET, _TAB_SYSCALL, _TAB_STATUS, _TAB_STRATEGY, _TAB_ERRNO, _TAB_PATHKIND, _TAB_KEY = range(7)
# keys of decode.py's fixed arguments, in jsonfmt.c's KEY_* order
_KEYS = ("filename", "argv", "path", "inode", "dev", "fstype")
# the walker's reasons for leaving a record to Python (walk.h's WHY_*), in its order
DECLINED = ("kind", "malformed", "name", "spec", "blob", "workload", "space", "output",
            "mounts")  # fmt: skip
# a blob's kind (decode.py's blob_arg: a sockaddr, else an open_how); _SPEC_PYTHON: a spec
# that does not fit the tables (its records stay Python's)
_BLOB_NONE, _BLOB_OPEN_HOW, _BLOB_SOCKADDR = 0, 1, 2
_SPEC_VALID, _SPEC_PYTHON = 1, 2
_LINE_MAX = 32768


class _Name(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint8), ("s", ctypes.c_char * _NAME_LEN)]


class _Params(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in (
            "abi", "hdr_size", "off_ts", "off_exit", "off_cgroup", "off_ret", "off_pid",
            "off_tid", "off_kind", "off_syscall", "off_set", "off_strategy", "off_comm",
            "comm_len", "off_ppid", "off_uid", "off_gid", "off_ctx_ok", "kind_syscall",
            "off_iargs", "off_strings", "strh_size", "strh_uptr_off", "strh_err_off",
            "strh_len_off", "strh_status_off", "strh_strategy_off", "str_max", "blob_max",
            "status_none", "shown_mask", "blob_shown_mask", "need_ident", "out_bytes",
            "off_exe_ino", "off_exe_dev", "off_exe_gen", "exe_key_size", "exe_key_ino_off",
            "exe_key_dev_off", "exe_key_gen_off", "exe_value_size", "status_ok",
            "status_truncated",
        )
    ] + [("fd", ctypes.c_int32), ("exe_fd", ctypes.c_int32)] + [
        (n, ctypes.c_uint32)
        for n in (
            "kind_exec", "off_exec_filename", "argvh_size", "argvh_uptr_off", "argvh_err_off",
            "argvh_argc_off", "argvh_status_off", "argvh_strategy_off", "argv_count", "arg_max",
            "argv_shown_mask", "kind_vfs", "off_vfs_ino", "off_vfs_arg", "off_vfs_dev",
            "off_vfs_path_kind", "off_vfs_path2_kind", "off_vfs_fstype", "fstype_len",
            "off_vfs_path", "pathkind_mount_rel",
        )
    ]  # fmt: skip


class _Spec(ctypes.Structure):
    _fields_ = [
        ("nints", ctypes.c_uint32),
        ("nstrs", ctypes.c_uint32),
        ("blob", ctypes.c_uint32),
        ("int_idx", ctypes.c_uint32 * _MAX_INTS),
        ("int32", ctypes.c_uint32 * _MAX_INTS),
        ("flagtab", ctypes.c_int32 * _MAX_INTS),
        ("int_key", _Name * _MAX_INTS),
        ("str_key", _Name * _MAX_STRS),
        ("blob_key", _Name),
        ("kpath_key", _Name),
        ("valid", ctypes.c_uint32),
    ]


class _VfsOp(ctypes.Structure):
    _fields_ = [
        ("path2_key", _Name),
        ("arg_key", _Name),
        ("arg_flagtab", ctypes.c_int32),
        ("nplain", ctypes.c_uint32),
        ("plain_key", _Name * _MAX_PLAIN),
        ("plain_off", ctypes.c_uint32 * _MAX_PLAIN),
        ("plain_size", ctypes.c_uint32 * _MAX_PLAIN),
    ]


class _FlagTab(ctypes.Structure):
    _fields_ = [
        ("accmode", ctypes.c_uint32),
        ("nbits", ctypes.c_uint32),
        ("acc", _Name * 4),
        ("mask", ctypes.c_uint64 * _MAX_FLAGBITS),
        ("bit", _Name * _MAX_FLAGBITS),
    ]


def _json(s: str) -> bytes:
    return json.dumps(s).encode()


def _name(n: _Name, s: str) -> None:
    raw = _json(s)
    if len(raw) >= _NAME_LEN:
        raise ValueError(f"name {s!r} is longer than the formatter's {_NAME_LEN - 1} bytes")
    n.len, n.s = len(raw), raw


def python_line(ev: Mapping[str, Any]) -> bytes:
    """The jsonl line of a decoded event, as Python makes it (the reference)."""
    line = json.dumps(Event.from_json(ev).to_json(), separators=(",", ":"))
    return (line + "\n").encode()


def ident_fragment(ident: Mapping[str, Any]) -> bytes:
    """The workload fields of Event.to_json (what follows "strategy", before "args"), as the
    model renders them for a decoded event annotated with ``ident``."""
    d = Event.from_json({**ident, "args": {}}).to_json()
    keys = list(d)
    inner = keys[keys.index("strategy") + 1 : keys.index("args")]
    return "".join(f",{json.dumps(k)}:{json.dumps(d[k])}" for k in inner).encode()


def _params(fd: int, need_ident: bool, out_bytes: int, exe_fd: int) -> _Params:
    p = _Params()
    p.abi = ABI
    p.hdr_size = ctypes.sizeof(TfHdr)
    (p.off_ts, p.off_exit, p.off_cgroup, p.off_ret, p.off_pid, p.off_tid, p.off_kind,
     p.off_syscall, p.off_set, p.off_strategy, p.off_comm, p.off_ppid, p.off_uid, p.off_gid,
     p.off_ctx_ok) = (getattr(TfHdr, f).offset for f in (
        "ts_ns", "exit_ns", "cgroup_id", "ret", "pid", "tid", "kind", "syscall", "event_set",
        "strategy", "comm", "ppid", "uid", "gid", "ctx_ok"))  # fmt: skip
    p.comm_len = TfHdr.comm.size
    p.kind_syscall = int(Kind.SYSCALL)
    p.off_iargs = TfEvent.iargs.offset
    p.off_strings = TfEvent.str.offset
    p.strh_size = TfStr.data.offset
    p.strh_uptr_off, p.strh_err_off, p.strh_len_off = (TfStr.uptr.offset, TfStr.err.offset,
                                                        TfStr.len.offset)  # fmt: skip
    p.strh_status_off, p.strh_strategy_off = TfStr.status.offset, TfStr.strategy.offset
    p.str_max, p.blob_max = TF_PATH_MAX - 1, TF_BLOB_MAX
    p.status_none = int(Status.NONE)
    p.shown_mask = sum(1 << s for s in _SHOWN)
    p.blob_shown_mask = sum(1 << s for s in _BLOB_SHOWN)
    p.need_ident = int(need_ident)
    p.out_bytes = out_bytes
    p.off_exe_ino, p.off_exe_dev, p.off_exe_gen = (TfHdr.exe_ino.offset, TfHdr.exe_dev.offset,
                                                   TfHdr.exe_gen.offset)  # fmt: skip
    p.exe_key_size = ctypes.sizeof(TfExeKey)
    p.exe_key_ino_off, p.exe_key_dev_off, p.exe_key_gen_off = (
        TfExeKey.ino.offset, TfExeKey.dev.offset, TfExeKey.gen.offset)  # fmt: skip
    p.exe_value_size = ctypes.sizeof(TfStr)  # tf_exes' value
    p.status_ok, p.status_truncated = int(Status.OK), int(Status.TRUNCATED)
    p.fd = fd
    p.exe_fd = exe_fd
    # exec and vfs records (the walker reads them for the compiled decode; the jsonl line is
    # made of syscall records only)
    assert TfExecEvent.iargs.offset == TfEvent.iargs.offset
    p.kind_exec, p.kind_vfs = int(Kind.EXEC), int(Kind.VFS)
    p.off_exec_filename = TfExecEvent.filename.offset
    base = TfExecEvent.argv_uptr.offset
    p.argvh_size = TF_ARGVH_SIZE
    p.argvh_uptr_off, p.argvh_err_off, p.argvh_argc_off = (
        0, TfExecEvent.argv_err.offset - base, TfExecEvent.argc.offset - base)  # fmt: skip
    p.argvh_status_off = TfExecEvent.argv_status.offset - base
    p.argvh_strategy_off = TfExecEvent.argv_strategy.offset - base
    p.argv_count, p.arg_max = TF_ARGV_COUNT, TF_ARG_MAX - 1
    p.argv_shown_mask = sum(1 << s for s in _ARGV_SHOWN)
    p.off_vfs_ino, p.off_vfs_arg, p.off_vfs_dev = (TfVfsEvent.ino.offset, TfVfsEvent.arg.offset,
                                                   TfVfsEvent.dev.offset)  # fmt: skip
    p.off_vfs_path_kind = TfVfsEvent.path_kind.offset
    p.off_vfs_path2_kind = TfVfsEvent.path2_kind.offset
    p.off_vfs_fstype, p.fstype_len = TfVfsEvent.fstype.offset, TfVfsEvent.fstype.size
    p.off_vfs_path = TfVfsEvent.path.offset
    p.pathkind_mount_rel = int(PathKind.MOUNT_REL)
    return p


def _bind(lib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    lib.tf_jfmt_abi.restype = ctypes.c_int
    lib.tf_jfmt_sizeof.restype = ctypes.c_size_t
    lib.tf_jfmt_sizeof.argtypes = [ctypes.c_uint32]
    lib.tf_jfmt_new.restype = vp
    lib.tf_jfmt_new.argtypes = [ctypes.POINTER(_Params)]
    lib.tf_jfmt_free.argtypes = [vp]
    lib.tf_jfmt_free.restype = None
    lib.tf_jfmt_name.argtypes = [vp, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p]
    lib.tf_jfmt_spec.argtypes = [vp, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_Spec)]
    lib.tf_jfmt_vfsop.argtypes = [vp, ctypes.c_uint32, ctypes.POINTER(_VfsOp)]
    lib.tf_jfmt_flagtab.argtypes = [vp, ctypes.c_uint32, ctypes.POINTER(_FlagTab)]
    lib.tf_jfmt_offset.argtypes = [vp, ctypes.c_int64]
    lib.tf_jfmt_offset.restype = None
    lib.tf_jfmt_ident.argtypes = [vp, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint32]
    lib.tf_jfmt_ident_clear.argtypes = [vp]
    lib.tf_jfmt_ident_clear.restype = None
    lib.tf_jfmt_write.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.tf_jfmt_flush.argtypes = [vp]
    lib.tf_jfmt_line.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64,
                                 ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
    lib.tf_jfmt_line.restype = ctypes.c_long
    lib.tf_jfmt_counters.argtypes = [vp, ctypes.POINTER(ctypes.c_uint64)]
    lib.tf_jfmt_counters.restype = None
    lib.tf_jfmt_exe_seed.argtypes = [vp, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                                     ctypes.c_char_p, ctypes.c_uint32]  # fmt: skip
    lib.tf_jfmt_exe_reset.argtypes = [vp]
    lib.tf_jfmt_exe_reset.restype = None
    lib.tf_jfmt_exe_counters.argtypes = [vp, ctypes.POINTER(ctypes.c_uint64)]
    lib.tf_jfmt_exe_counters.restype = None


class FormatterError(RuntimeError):
    """The compiled formatter cannot be used (why is in the message)."""


class JsonFormatter:
    """The C formatter writing jsonl to ``fd``. Not thread-safe: the ring consumer calls it
    from its polling thread, under its lock."""

    def __init__(
        self, lib: ctypes.CDLL, fd: int, need_ident: bool, out_bytes: int = 1 << 20,
        self_check: bool = True, exe_fd: int = -1,
    ) -> None:  # fmt: skip
        """``exe_fd``: the tf_exes map (-1: none, every exe unknown). ``self_check=False``
        only for tests that compare lines themselves."""
        try:
            _bind(lib)
        except AttributeError as e:
            raise FormatterError(f"library lacks the jsonl formatter: {e}") from e
        if lib.tf_jfmt_abi() != ABI:
            raise FormatterError(f"jsonl formatter ABI {lib.tf_jfmt_abi()}, want {ABI}")
        sizes = (ctypes.sizeof(_Params), ctypes.sizeof(_Spec), ctypes.sizeof(_VfsOp),
                 ctypes.sizeof(_FlagTab))  # fmt: skip
        c_sizes = tuple(int(lib.tf_jfmt_sizeof(i)) for i in range(len(sizes)))
        if c_sizes != sizes:
            raise FormatterError(f"jsonl formatter structs of {c_sizes} bytes, here {sizes}")
        self._lib = lib
        self.fd = fd
        self.need_ident = need_ident
        ptr = lib.tf_jfmt_new(ctypes.byref(_params(fd, need_ident, out_bytes, exe_fd)))
        if not ptr:
            raise FormatterError(f"jsonl formatter: {errno.errorcode.get(ctypes.get_errno())}")
        self.ptr: int | None = ptr
        self._known: set[int] = set()
        try:
            self._tables()
            if self_check:
                self._self_check()
        except Exception:
            self.close()
            raise

    # ---- tables, from their one home ----------------------------------------------------
    def _put_name(self, table: int, code: int, name: str) -> None:
        if self._lib.tf_jfmt_name(self.ptr, table, code, _json(name)) < 0:
            raise FormatterError(f"name {name!r} (table {table}, code {code}) does not fit")

    def _tables(self) -> None:
        for set_id, spec in BY_ID.items():
            self._put_name(_TAB_SET, set_id, spec.name)
        for code, name in SYSCALL_NAMES.items():
            self._put_name(_TAB_SYSCALL, code, name)
        for st in Status:
            self._put_name(_TAB_STATUS, int(st), st.label)
        for sg in Strategy:
            self._put_name(_TAB_STRATEGY, int(sg), sg.label)
        for code, name in errno.errorcode.items():
            if 0 < code < _MAX_ERRNO:
                self._put_name(_TAB_ERRNO, code, name)
        for code in range(_MAX_CODES):
            self._put_name(_TAB_PATHKIND, code, _PATH_KINDS.get(code, "none"))
        for code, name in enumerate(_KEYS):
            self._put_name(_TAB_KEY, code, name)
        tables: list[FlagTable] = []

        def flagtab(sc_name: str, name: str) -> int:
            t = flag_table(sc_name, name)
            if t is None:
                return -1
            if t not in tables:
                tables.append(t)
            return tables.index(t)

        ids = {name: code for code, name in SYSCALL_NAMES.items()}
        for set_id, spec in BY_ID.items():
            for sc_name, arg in spec.syscalls.items():
                sc = ids.get(sc_name)
                if sc is None:
                    continue  # no name, no spec: str(code) and no arguments, as arg_spec
                s = _Spec()
                s.valid = _SPEC_VALID
                if len(arg.ints) > _MAX_INTS or len(arg.strs) > _MAX_STRS:
                    s.valid = _SPEC_PYTHON  # Python renders it
                else:
                    s.nints, s.nstrs = len(arg.ints), len(arg.strs)
                    for i, (name, idx) in enumerate(arg.ints):
                        s.int_idx[i], s.int32[i] = idx, int(name in _INT32_ARGS)
                        _name(s.int_key[i], name)
                        s.flagtab[i] = flagtab(sc_name, name)
                    for i, name in enumerate(arg.strs):
                        _name(s.str_key[i], name)
                    _name(s.kpath_key, "kernel_path")
                    if arg.blob:
                        _name(s.blob_key, arg.blob)
                        s.blob = _BLOB_SOCKADDR if arg.blob_kind == "sockaddr" else _BLOB_OPEN_HOW
                if self._lib.tf_jfmt_spec(self.ptr, set_id, sc, ctypes.byref(s)) < 0:
                    raise FormatterError(f"argument spec of {sc_name} does not fit")
        # decode.py's _vfs_args, by operation (keyed by the syscall's name there)
        for sc, sc_name in SYSCALL_NAMES.items():
            counters = VFS_CLOSE_COUNTERS if sc_name == "vfs_close" else ()
            if sc_name not in _VFS_PATH2 and sc_name not in _VFS_ARG and not counters:
                continue
            op = _VfsOp()
            op.arg_flagtab = -1
            if sc_name in _VFS_PATH2:
                _name(op.path2_key, _VFS_PATH2[sc_name])
            if sc_name in _VFS_ARG:
                _name(op.arg_key, _VFS_ARG[sc_name])
                op.arg_flagtab = flagtab(sc_name, _VFS_ARG[sc_name])
            op.nplain = len(counters)
            for i, name in enumerate(counters):
                _name(op.plain_key[i], name)
                field = getattr(TfVfsEvent, name)
                op.plain_off[i], op.plain_size[i] = field.offset, field.size
            if self._lib.tf_jfmt_vfsop(self.ptr, sc, ctypes.byref(op)) < 0:
                raise FormatterError(f"vfs arguments of {sc_name} do not fit")
        if len(tables) > _MAX_FLAGTABS:
            raise FormatterError(f"{len(tables)} flag tables, the formatter holds {_MAX_FLAGTABS}")
        for i, t in enumerate(tables):
            ft = _FlagTab()
            if t.accmode:
                ft.accmode = 1
                for k, name in enumerate(t.accmode):
                    _name(ft.acc[k], name)
            if len(t.bits) > _MAX_FLAGBITS:
                raise FormatterError(f"{len(t.bits)} flag bits, the formatter holds "
                                     f"{_MAX_FLAGBITS}")  # fmt: skip
            ft.nbits = len(t.bits)
            for k, (name, bit) in enumerate(t.bits):
                ft.mask[k] = bit
                _name(ft.bit[k], name)
            if self._lib.tf_jfmt_flagtab(self.ptr, i, ctypes.byref(ft)) < 0:
                raise FormatterError("flag table does not fit")

    def _self_check(self) -> None:
        """A made-up openat record (hostile path, flag names, a lost kernel path) rendered
        both ways: the formatter is used only if the lines are the same."""
        from tracefleet.agent.kernel.abi import EventSetId, Syscall

        rec = TfEvent()
        h = rec.hdr
        h.ts_ns, h.exit_ns, h.cgroup_id, h.ret, h.pid, h.tid = (
            5_000_000_123,
            5_000_009_999,
            7,
            -2,
            42,
            43,
        )
        h.kind, h.syscall, h.event_set = (
            int(Kind.SYSCALL),
            int(Syscall.OPENAT),
            int(EventSetId.FILE),
        )
        h.strategy, h.comm, h.ctx_ok, h.ppid, h.uid, h.gid = 3, b'a"\\\x01\xff', 1, 1, 0, 0
        rec.iargs[0], rec.iargs[2], rec.iargs[3] = -100, 0o2101101 | (1 << 40), 0o644
        path = b'/t/\xff\xc3\xa9"\\\n\x1f\x7f\xf0\x9f\x98\x80'
        rec.str[0].uptr, rec.str[0].len, rec.str[0].status, rec.str[0].strategy = (
            0x7F00,
            len(path),
            1,
            3,
        )
        ctypes.memmove(ctypes.addressof(rec.str[0]) + TfStr.data.offset, path, len(path))
        rec.str[1].status, rec.str[1].err, rec.str[1].strategy = int(Status.LOST), -14, 3
        h.exe_ino, h.exe_dev, h.exe_gen = 0x1_0000_0001, 0xFD00001, 7
        exe = b'/usr/b\xffin/"\\\x01\xe2\x82\xac (deleted)'
        self.seed_exe((h.exe_ino, h.exe_dev, h.exe_gen), exe)
        raw = encode_record(rec)
        ident = {"attribution": "host", "container_id": "", "pod": "", "namespace": "",
                 "pod_uid": "", "container": ""}  # fmt: skip
        if self.need_ident:
            self.add_ident(7, ident)
        self.set_offset(1_700_000_000_000_000_000)
        got = self.line(raw, 5_000_100_000)
        ev, _ = decode_record(raw, 5_000_100_000)
        ev["time_ns"] = h.ts_ns + 1_700_000_000_000_000_000  # the same offset
        ev["exe"] = exe.decode("utf-8", "backslashreplace")  # as ExeResolver decodes it
        if self.need_ident:
            ev.update(ident)
        want = python_line(ev)
        self.clear_idents()
        self._lib.tf_jfmt_exe_reset(self.ptr)
        if got != want:
            raise FormatterError(f"the compiled line differs from the model's: {got!r} != "
                                 f"{want!r}")  # fmt: skip

    # ---- per run ------------------------------------------------------------------------
    def set_offset(self, offset_ns: int) -> None:
        self._lib.tf_jfmt_offset(self.ptr, offset_ns)

    def knows(self, cgroup_id: int) -> bool:
        return cgroup_id in self._known

    def add_ident(self, cgroup_id: int, ident: Mapping[str, Any]) -> bool:
        """The settled workload fields of a cgroup: its next records are rendered in C.
        False when the formatter's table is full."""
        frag = ident_fragment(ident)
        if self._lib.tf_jfmt_ident(self.ptr, cgroup_id, frag, len(frag)) != 0:
            return False
        self._known.add(cgroup_id)
        return True

    def clear_idents(self) -> None:
        self._known = set()
        if self.ptr:
            self._lib.tf_jfmt_ident_clear(self.ptr)

    def refresh_idents(
        self, cgroups: Iterable[int], settled: Callable[[int], Mapping[str, Any] | None]
    ) -> None:
        """After the workload resolver refreshed: every cgroup it knows whose fields are
        settled, handed over before their records come (until the table is full; the rest
        are handed over by their first record, from Python)."""
        self.clear_idents()
        for cg in cgroups:
            ident = settled(cg)
            if ident is not None and not self.add_ident(cg, ident):
                break

    def seed_exe(self, identity: tuple[int, int, int], path: bytes) -> None:
        """Cache an executable's path as if read from tf_exes (the self-check and tests,
        before the formatter runs)."""
        if self._lib.tf_jfmt_exe_seed(self.ptr, *identity, path, len(path)) != 0:
            raise FormatterError(f"executable {path!r} not cached")

    def exe_counters(self) -> tuple[dict[str, int], int]:
        """Lines made with an unknown exe, per cause (exe.py's CAUSES), and the tf_exes
        lookups made (cache misses)."""
        out = (ctypes.c_uint64 * (len(CAUSES) + 1))()
        if self.ptr:
            self._lib.tf_jfmt_exe_counters(self.ptr, out)
        return {c: int(out[i]) for i, c in enumerate(CAUSES) if out[i]}, int(out[len(CAUSES)])

    def write(self, line: bytes) -> None:
        """A line Python made, into the same buffer (lines never interleave)."""
        if not self.ptr:
            raise OSError(errno.EBADF, "jsonl output closed")
        err = self._lib.tf_jfmt_write(self.ptr, line, len(line))
        if err < 0:
            raise OSError(-err, f"jsonl output: {errno.errorcode.get(-err, -err)}")

    def flush(self) -> None:
        if not self.ptr:
            return
        err = self._lib.tf_jfmt_flush(self.ptr)
        if err < 0:
            raise OSError(-err, f"jsonl output: {errno.errorcode.get(-err, -err)}")

    @property
    def broken(self) -> bool:
        """The output failed (a closed pipe, say): nothing more is written."""
        return bool(self.counters()["write_errno"])

    def line(self, raw: bytes, now_ns: int) -> bytes | None:
        """The line the formatter makes of one record (not written), or None when it leaves
        the record to Python. For tests and the self-check."""
        assert self.ptr
        buf = ctypes.create_string_buffer(_LINE_MAX)
        n = self._lib.tf_jfmt_line(self.ptr, raw, len(raw), now_ns, buf, _LINE_MAX)
        return buf.raw[:n] if n >= 0 else None

    def counters(self) -> dict[str, Any]:
        out = (ctypes.c_uint64 * (3 + len(DECLINED)))()
        if self.ptr:
            self._lib.tf_jfmt_counters(self.ptr, out)
        return {
            "compiled": int(out[0]),
            "bytes": int(out[1]),
            "write_errno": int(out[2]),
            "declined": {k: int(out[3 + i]) for i, k in enumerate(DECLINED) if out[3 + i]},
            "exe_lookups": self.exe_counters()[1],
        }

    def close(self) -> None:
        if self.ptr:
            self._lib.tf_jfmt_free(self.ptr)
            self.ptr = None
