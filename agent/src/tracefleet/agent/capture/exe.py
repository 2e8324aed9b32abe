"""The process's executable: a record's header carries its identity (inode, device,
i_generation of ``task->mm->exe_file``), the kernel keeps identity -> path in the shared LRU
hash ``tf_exes`` (bpf/include/tracefleet/exe.bpf.h), and this resolver turns an identity into
the path: from its own cache, or on a miss with one map lookup. It runs only for records that
are decoded (a sink, a sample, the fallback), never in the compiled consumer's aggregate-only
path.

Unknown is ``None``, never a guess, with the reason counted (``reasons``): ``no-mm`` (a kernel
thread: not a failure), ``not-in-map`` (the kernel could not walk the path, or the LRU evicted
it before this agent read it), ``truncated`` (longer than the kernel's buffer), ``lookup``
(the map lookup failed). A path stays cached here after the kernel's map evicted it.
"""

from __future__ import annotations

import ctypes
import threading

from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import TF_PATH_MAX, Status, TfExeKey, TfHdr, TfStr

Identity = tuple[int, int, int]
CAUSES = ("no-mm", "not-in-map", "truncated", "lookup")  # why an exe is unknown


class ExeResolver:
    """identity -> path, cached; ``fd`` is tf_exes (-1: no map, every exe unknown)."""

    def __init__(self, fd: int, max_cached: int = 65536) -> None:
        self.fd = fd
        self.max_cached = max_cached
        self._cache: dict[Identity, str] = {}
        self._lock = threading.Lock()
        self.reasons: dict[str, int] = {}
        self.lookups = 0  # map lookups made (cache misses)

    def _unknown(self, reason: str) -> None:
        with self._lock:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def path(self, h: TfHdr) -> str | None:
        if not h.exe_ino:
            self._unknown("no-mm")
            return None
        ident = (h.exe_ino, h.exe_dev, h.exe_gen)
        hit = self._cache.get(ident)
        if hit is not None:
            return hit
        return self._lookup(ident)

    def _lookup(self, ident: Identity) -> str | None:
        if self.fd < 0:
            self._unknown("not-in-map")
            return None
        value = TfStr()
        self.lookups += 1
        try:
            found = libbpf.map_lookup(self.fd, TfExeKey(*ident), value)
        except libbpf.LibbpfError:
            self._unknown("lookup")
            return None
        if not found:
            self._unknown("not-in-map")
            return None
        if value.status != Status.OK:
            self._unknown("truncated" if value.status == Status.TRUNCATED else "not-in-map")
            return None
        n = min(int(value.len), TF_PATH_MAX - 1)
        raw = ctypes.string_at(ctypes.addressof(value) + TfStr.data.offset, n)
        path = raw.decode("utf-8", "backslashreplace")  # as paths are
        with self._lock:
            if len(self._cache) >= self.max_cached:
                self._cache.clear()  # bounded; refilled from the kernel's map on demand
            self._cache[ident] = path
        return path

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.reasons)
