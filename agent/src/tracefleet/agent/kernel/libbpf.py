"""A thin ctypes binding of the system libbpf (libbpf.so.1): the agent's one seam to libbpf.

Only what the agent uses is bound, with Python types around it: objects that can be changed
before load (program flags and autoload, map sizes and shared fds, .rodata settings), links,
map element access, and the ring buffer. Every failure raises ``LibbpfError`` carrying the
errno, the operation and, for a load, the verifier log of each program that failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("tracefleet.agent.libbpf")

BPF_F_SLEEPABLE = 1 << 4
BPF_ANY = 0
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_RINGBUF = 27

_c = ctypes
_vp = ctypes.c_void_p
_cp = ctypes.c_char_p


class LibbpfError(OSError):
    """A libbpf call failed. ``verifier_logs`` maps program names to their verifier log."""

    def __init__(self, err: int, what: str, verifier_logs: dict[str, str] | None = None):
        err = abs(err) or errno.EINVAL
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.verifier_logs = verifier_logs or {}


def _load_lib() -> ctypes.CDLL:
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf") or ""):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise LibbpfError(
        errno.ENOENT,
        "libbpf.so.1 not found: install the libbpf1 package (Debian/Ubuntu: apt-get install "
        "libbpf1; Fedora: dnf install libbpf)",
    )


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _cp, _vp)
_print_cb: Any = None
_libbpf_messages: list[str] = []
_libbpf_count = 0  # messages printed so far (the list keeps only the last 200)


def _on_print(level: int, fmt: bytes, va_list: int) -> int:
    global _libbpf_count
    # libbpf level 0 = warn, 1 = info, 2 = debug. Debug lines (CO-RE relocations, maps
    # created: ~5,000 to load file) are formatted only for a debug log: they were ~50 ms of
    # capture's start-up, and explain() looks for a failure's words among the others
    if level == 2 and not log.isEnabledFor(logging.DEBUG):
        return 0
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, len(buf), fmt, _vp(va_list))
    msg = buf.value.decode(errors="replace").rstrip()
    if msg:
        _libbpf_count += 1
        _libbpf_messages.append(msg)
        del _libbpf_messages[:-200]
        log.log(logging.WARNING if level == 0 else logging.DEBUG, "libbpf: %s", msg)
    return 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [_cp, ctypes.c_size_t, _cp, _vp]


def _sig(fn: Any, restype: Any, *argtypes: Any) -> None:
    fn.restype = restype
    fn.argtypes = list(argtypes)


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with prototypes declared (idempotent, thread-safe)."""
    global _lib, _print_cb
    with _lib_lock:
        if _lib is not None:
            return _lib
        L = _load_lib()
        _sig(L.libbpf_major_version, ctypes.c_uint32)
        _sig(L.libbpf_minor_version, ctypes.c_uint32)
        _sig(L.libbpf_set_print, _vp, _PRINT_FN)
        _sig(L.libbpf_num_possible_cpus, ctypes.c_int)
        _sig(L.bpf_object__open_file, _vp, _cp, _vp)
        _sig(L.bpf_object__load, ctypes.c_int, _vp)
        _sig(L.bpf_object__close, None, _vp)
        _sig(L.bpf_object__next_program, _vp, _vp, _vp)
        _sig(L.bpf_object__find_map_by_name, _vp, _vp, _cp)
        _sig(L.bpf_object__next_map, _vp, _vp, _vp)
        _sig(L.bpf_program__name, _cp, _vp)
        _sig(L.bpf_program__section_name, _cp, _vp)
        _sig(L.bpf_program__set_autoload, ctypes.c_int, _vp, ctypes.c_bool)
        _sig(L.bpf_program__autoload, ctypes.c_bool, _vp)
        _sig(L.bpf_program__set_flags, ctypes.c_int, _vp, ctypes.c_uint32)
        _sig(L.bpf_program__set_log_buf, ctypes.c_int, _vp, _vp, ctypes.c_size_t)
        _sig(L.bpf_program__set_log_level, ctypes.c_int, _vp, ctypes.c_uint32)
        _sig(L.bpf_program__fd, ctypes.c_int, _vp)
        _sig(L.bpf_program__attach, _vp, _vp)
        _sig(L.bpf_link__destroy, ctypes.c_int, _vp)
        _sig(L.bpf_link__fd, ctypes.c_int, _vp)
        _sig(L.bpf_map__name, _cp, _vp)
        _sig(L.bpf_map__fd, ctypes.c_int, _vp)
        _sig(L.bpf_map__reuse_fd, ctypes.c_int, _vp, ctypes.c_int)
        _sig(L.bpf_map__set_max_entries, ctypes.c_int, _vp, ctypes.c_uint32)
        _sig(L.bpf_map__max_entries, ctypes.c_uint32, _vp)
        _sig(L.bpf_map__value_size, ctypes.c_uint32, _vp)
        _sig(L.bpf_map__initial_value, _vp, _vp, ctypes.POINTER(ctypes.c_size_t))
        _sig(L.bpf_map_create, ctypes.c_int, ctypes.c_int, _cp, ctypes.c_uint32,
             ctypes.c_uint32, ctypes.c_uint32, _vp)  # fmt: skip
        _sig(L.bpf_map_lookup_elem, ctypes.c_int, ctypes.c_int, _vp, _vp)
        _sig(L.bpf_map_update_elem, ctypes.c_int, ctypes.c_int, _vp, _vp, ctypes.c_uint64)
        _sig(L.bpf_map_delete_elem, ctypes.c_int, ctypes.c_int, _vp)
        _sig(L.bpf_map_get_next_key, ctypes.c_int, ctypes.c_int, _vp, _vp)
        _sig(L.bpf_enable_stats, ctypes.c_int, ctypes.c_int)
        _sig(
            L.bpf_obj_get_info_by_fd,
            ctypes.c_int,
            ctypes.c_int,
            _vp,
            ctypes.POINTER(ctypes.c_uint32),
        )
        _sig(L.btf__load_vmlinux_btf, _vp)
        _sig(L.btf__free, None, _vp)
        _sig(L.btf__find_by_name_kind, ctypes.c_int32, _vp, _cp, ctypes.c_uint32)
        _sig(L.btf__type_by_id, _vp, _vp, ctypes.c_uint32)
        _sig(L.btf__name_by_offset, _cp, _vp, ctypes.c_uint32)
        _sig(L.ring_buffer__new, _vp, ctypes.c_int, _vp, _vp, _vp)
        _sig(L.ring_buffer__add, ctypes.c_int, _vp, ctypes.c_int, _vp, _vp)
        _sig(L.ring_buffer__poll, ctypes.c_int, _vp, ctypes.c_int)
        _sig(L.ring_buffer__consume, ctypes.c_int, _vp)
        _sig(L.ring_buffer__free, None, _vp)
        _print_cb = _PRINT_FN(_on_print)
        L.libbpf_set_print(_print_cb)
        _lib = L
        return L


def version() -> str:
    L = lib()
    return f"{L.libbpf_major_version()}.{L.libbpf_minor_version()}"


def num_possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n < 0:
        raise LibbpfError(n, "libbpf_num_possible_cpus")
    return int(n)


def recent_messages(since: int | None = None) -> list[str]:
    """The last messages libbpf printed (warnings and errors), oldest first; with ``since``
    (a message_count() taken earlier), only those printed after it."""
    if since is None:
        return list(_libbpf_messages)
    return _libbpf_messages[len(_libbpf_messages) - min(_libbpf_count - since, 200) :]


def message_count() -> int:
    return _libbpf_count


def _errno() -> int:
    return ctypes.get_errno() or errno.EINVAL


class Program:
    """A program of an opened object: set flags and autoload before load, attach after."""

    def __init__(self, obj: BpfObject, ptr: int):
        self._obj = obj
        self._ptr = ptr
        self.name: str = lib().bpf_program__name(ptr).decode()
        self.section: str = lib().bpf_program__section_name(ptr).decode()
        self._log_map: mmap.mmap | None = None
        self._log_buf: ctypes.Array[ctypes.c_char] | None = None

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        rc = lib().bpf_program__set_autoload(self._ptr, value)
        if rc:
            raise LibbpfError(rc, f"set autoload of {self.name}")

    def set_flags(self, flags: int) -> None:
        rc = lib().bpf_program__set_flags(self._ptr, flags)
        if rc:
            raise LibbpfError(rc, f"set flags of {self.name}")

    def capture_verifier_log(self, size: int = 1 << 20) -> None:
        """Keep the verifier log of this program's load (level 1 on failure)."""
        # anonymous memory, not a zero-filled ctypes buffer: the kernel writes a log only when
        # a load fails, so its pages stay untouched (zeroing 1 MiB for each of file's 38
        # programs took ~40-100 ms of capture's start-up)
        self._log_map = mmap.mmap(-1, size)
        self._log_buf = (ctypes.c_char * size).from_buffer(self._log_map)
        lib().bpf_program__set_log_buf(self._ptr, ctypes.addressof(self._log_buf), size)

    def release_verifier_log(self) -> None:
        if self._log_buf is not None:
            lib().bpf_program__set_log_buf(self._ptr, None, 0)
            self._log_buf = None  # its export of the map first, then the map
            self._log_map = None

    def verifier_log(self) -> str:
        return self._log_buf.value.decode(errors="replace") if self._log_buf else ""

    @property
    def fd(self) -> int:
        return int(lib().bpf_program__fd(self._ptr))

    def attach(self) -> Link:
        ptr = lib().bpf_program__attach(self._ptr)
        if not ptr:
            raise LibbpfError(_errno(), f"attach {self.name} ({self.section})")
        return Link(ptr, self.name)


class Link:
    def __init__(self, ptr: int, name: str):
        self._ptr: int | None = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return int(lib().bpf_link__fd(self._ptr)) if self._ptr else -1

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None


class Map:
    """A map of an opened object (before load: resize, share an fd; after: use fd)."""

    def __init__(self, ptr: int):
        self._ptr = ptr
        self.name: str = lib().bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return int(lib().bpf_map__fd(self._ptr))

    @property
    def max_entries(self) -> int:
        return int(lib().bpf_map__max_entries(self._ptr))

    @property
    def value_size(self) -> int:
        return int(lib().bpf_map__value_size(self._ptr))

    def set_max_entries(self, n: int) -> None:
        rc = lib().bpf_map__set_max_entries(self._ptr, n)
        if rc:
            raise LibbpfError(rc, f"resize map {self.name}")

    def reuse_fd(self, fd: int) -> None:
        rc = lib().bpf_map__reuse_fd(self._ptr, fd)
        if rc:
            raise LibbpfError(rc, f"share map {self.name}")

    def initial_value(self) -> memoryview:
        """Writable view of a global-data map's initial contents (before load)."""
        size = ctypes.c_size_t(0)
        ptr = lib().bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not ptr:
            raise LibbpfError(errno.ENOENT, f"no initial value for map {self.name}")
        buf = (ctypes.c_char * size.value).from_address(ptr)
        return memoryview(buf).cast("B")


class BpfObject:
    """An ELF BPF object: open, adjust, load, then attach and use its maps."""

    def __init__(self, path: str):
        self.path = path
        ptr = lib().bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise LibbpfError(_errno(), f"open BPF object {path}")
        self._ptr: int | None = ptr
        self.programs: dict[str, Program] = {}
        p = lib().bpf_object__next_program(ptr, None)
        while p:
            prog = Program(self, p)
            self.programs[prog.name] = prog
            p = lib().bpf_object__next_program(ptr, p)
        self.maps: dict[str, Map] = {}
        m = lib().bpf_object__next_map(ptr, None)
        while m:
            mp = Map(m)
            self.maps[mp.name] = mp
            m = lib().bpf_object__next_map(ptr, m)

    def rodata_map(self) -> Map:
        for name, m in self.maps.items():
            if name.endswith(".rodata"):
                return m
        raise LibbpfError(errno.ENOENT, f"{self.path} has no .rodata")

    def load(self) -> None:
        """Load every autoload program; on failure, attach the verifier logs to the error."""
        assert self._ptr
        for prog in self.programs.values():
            if prog.autoload:
                prog.capture_verifier_log()
        rc = lib().bpf_object__load(self._ptr)
        if rc:
            logs = {p.name: p.verifier_log() for p in self.programs.values() if p.verifier_log()}
            raise LibbpfError(rc, f"load {os.path.basename(self.path)}", logs)
        # loaded: the logs are of no use now (1 MiB each for every program of every loaded
        # set, when they were zero-filled buffers, was most of the agent's idle memory)
        for prog in self.programs.values():
            prog.release_verifier_log()

    def close(self) -> None:
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    fd = lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None)
    if fd < 0:
        raise LibbpfError(fd, f"create map {name}")
    return int(fd)


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    rc = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if rc:
        if ctypes.get_errno() == errno.ENOENT or rc == -errno.ENOENT:
            return False
        raise LibbpfError(rc, "map lookup")
    return True


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, flags: int = BPF_ANY) -> None:
    rc = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
    if rc:
        raise LibbpfError(rc, "map update")


def map_delete(fd: int, key: ctypes._CData) -> bool:
    rc = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    return rc == 0


def map_keys(fd: int, key_type: type[ctypes._SimpleCData]) -> Iterator[Any]:
    """Iterate a hash map's keys (a snapshot-ish walk, as bpftool does)."""
    cur = None
    nxt = key_type()
    while True:
        rc = lib().bpf_map_get_next_key(fd, ctypes.byref(cur) if cur is not None else None,
                                        ctypes.byref(nxt))  # fmt: skip
        if rc:
            return
        yield nxt.value
        cur = key_type(nxt.value)


BTF_KIND_FUNC = 12


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("type", ctypes.c_uint32)]  # fmt: skip


class _BtfParam(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32)]


class KernelBtf:
    """The running kernel's BTF (/sys/kernel/btf/vmlinux), for questions asked before load:
    does a function exist, and what are its parameters called."""

    def __init__(self) -> None:
        self._ptr = lib().btf__load_vmlinux_btf()
        if not self._ptr:
            raise LibbpfError(_errno(), "load the kernel's BTF")

    def func_params(self, name: str) -> list[str] | None:
        """Parameter names of kernel function ``name``, or None if the kernel has none."""
        L = lib()
        fid = L.btf__find_by_name_kind(self._ptr, name.encode(), BTF_KIND_FUNC)
        if fid < 0:
            return None
        func = _BtfType.from_address(L.btf__type_by_id(self._ptr, fid))
        proto_ptr = L.btf__type_by_id(self._ptr, func.type)
        proto = _BtfType.from_address(proto_ptr)
        vlen = proto.info & 0xFFFF
        params = (_BtfParam * vlen).from_address(proto_ptr + ctypes.sizeof(_BtfType))
        return [(L.btf__name_by_offset(self._ptr, p.name_off) or b"").decode() for p in params]

    def close(self) -> None:
        if self._ptr:
            lib().btf__free(self._ptr)
            self._ptr = None

    def __enter__(self) -> KernelBtf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_stats() -> int:
    """Turn on the kernel's run-time accounting of BPF programs while the fd stays open."""
    fd = lib().bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
    if fd < 0:
        raise LibbpfError(fd, "enable BPF run-time stats")
    return int(fd)


class _BpfProgInfo(ctypes.Structure):
    # The leading part of struct bpf_prog_info (uapi/linux/bpf.h); the kernel fills what fits.
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
    ]  # fmt: skip


def _prog_info(prog_fd: int) -> _BpfProgInfo:
    """The kernel's bpf_prog_info of a loaded program."""
    info = _BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size))
    if rc:
        raise LibbpfError(rc, "bpf_obj_get_info_by_fd")
    return info


def prog_stats(prog_fd: int) -> tuple[int, int, int]:
    """(program id, run time ns, run count) from the kernel's bpf_prog_info."""
    info = _prog_info(prog_fd)
    return int(info.id), int(info.run_time_ns), int(info.run_cnt)


def prog_recursion_misses(prog_fd: int) -> int:
    """Runs of the program the kernel skipped (bpf_prog_info.recursion_misses): another BPF
    program was running on that CPU. Counted whether or not BPF stats are on."""
    return int(_prog_info(prog_fd).recursion_misses)


def prog_verified_insns(prog_fd: int) -> int:
    """Instructions the verifier processed to load the program (bpf_prog_info, Linux 5.16+):
    what its load cost, as a count rather than a time."""
    return int(_prog_info(prog_fd).verified_insns)


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, ctypes.c_size_t)


class RingBuffer:
    """Consumer of a BPF ring buffer map; ``callback(bytes)`` runs for each record."""

    def __init__(self, map_fd: int, callback: Callable[[bytes], None]):
        self._user_cb = callback
        self._errors: list[BaseException] = []

        self.aborted = False

        def _cb(_ctx: int, data: int, size: int) -> int:
            # libbpf has already moved its consumer position past this record: deliver it
            # even when aborted, or it is neither delivered nor counted
            try:
                callback(ctypes.string_at(data, size))
            except BaseException as e:  # never unwind through C
                self._errors.append(e)
                return -1
            return -1 if self.aborted else 0  # -1 stops ring_buffer__consume/poll

        self._cb = _SAMPLE_FN(_cb)
        ptr = lib().ring_buffer__new(map_fd, ctypes.cast(self._cb, _vp), None, None)
        if not ptr:
            raise LibbpfError(_errno(), "create ring buffer consumer")
        self._ptr: int | None = ptr

    def add(self, map_fd: int) -> None:
        """Consume one more ring in the same poll (one epoll set, one callback). Not
        concurrently with poll/consume: the caller serialises them."""
        assert self._ptr
        err = lib().ring_buffer__add(self._ptr, map_fd, ctypes.cast(self._cb, _vp), None)
        if err < 0:
            raise LibbpfError(err, "add a ring buffer to the consumer")

    def _raise_pending(self) -> None:
        if self._errors:
            err = self._errors[0]
            self._errors.clear()
            raise err

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for a wakeup, then consume everything queued."""
        assert self._ptr
        n = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if self.aborted:
            return 0
        self._raise_pending()
        if n < 0 and n != -errno.EINTR:
            raise LibbpfError(n, "ring buffer poll")
        # Records submitted without a wakeup are not signalled: always drain.
        m = lib().ring_buffer__consume(self._ptr)
        self._raise_pending()
        return max(n, 0) + max(m, 0)

    def consume(self) -> int:
        assert self._ptr
        n = lib().ring_buffer__consume(self._ptr)
        self._raise_pending()
        return max(n, 0)

    def abort(self) -> None:
        """Make a poll or consume in progress (in another thread) return at its next record,
        before close(): freeing the ring under a running consumer unmaps what it reads."""
        self.aborted = True

    def close(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None
