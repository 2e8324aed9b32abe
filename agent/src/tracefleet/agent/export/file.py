"""The file exporter: JSON lines to a file rotated by size, and its checked spec."""

from __future__ import annotations

import collections
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from tracefleet.agent.export.base import Accounting, ExportConfigError, Exporter


@dataclass(frozen=True)
class FileExportSpec:
    path: str
    max_bytes: int = 64 << 20
    keep: int = 5  # rotated files kept beside the current one (PATH.1 .. PATH.keep)
    queue_size: int = 65536
    accounting_seconds: float = 10.0


class FileExporter(Exporter):
    """JSON lines to PATH, rotated by size: PATH -> PATH.1 -> ... -> PATH.keep (deleted after).
    A line is never split across files; the events of a deleted file are counted as
    ``rotated_out``."""

    kind = "file"

    def __init__(self, name: str, spec: FileExportSpec, *, node: str = "",
                 accounting: Accounting | None = None) -> None:  # fmt: skip
        super().__init__(name, queue_size=spec.queue_size, node=node, accounting=accounting,
                         accounting_seconds=spec.accounting_seconds)  # fmt: skip
        self.spec = spec
        self.path = Path(spec.path)
        self._fd = -1
        self._size = 0
        self._events_in_file = 0
        # events in each rotated file, PATH.1 first (to count what deleting one loses)
        self._rotated: collections.deque[int] = collections.deque()
        self._nrotated = -1  # PATH.1 .. PATH.n present; -1: not looked yet

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)  # fmt: skip
        self._size = os.fstat(self._fd).st_size
        self._events_in_file = 0

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        """PATH -> PATH.1 -> ... -> PATH.keep, the oldest deleted. It touches only the files
        there are (counted once, then tracked): with keep=1000 a rotation was 1,000 stat
        calls, and on a slow file system the writer fell behind the events."""
        os.close(self._fd)
        self._fd = -1
        keep = self.spec.keep
        if self._nrotated < 0:  # rotated files of an earlier run, contiguous from PATH.1
            self._nrotated = 0
            while self._nrotated < keep and os.path.exists(f"{self.path}.{self._nrotated + 1}"):
                self._nrotated += 1
        if keep == 0:
            self._count_rotated_out(self._events_in_file)
            self.path.unlink(missing_ok=True)
        else:
            if self._nrotated >= keep:
                if len(self._rotated) >= keep:
                    self._count_rotated_out(self._rotated.pop())
                Path(f"{self.path}.{keep}").unlink(missing_ok=True)
                self._nrotated = keep - 1
            for i in range(self._nrotated, 0, -1):
                with contextlib.suppress(FileNotFoundError):  # removed by someone else
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            self._nrotated += 1
            self._rotated.appendleft(self._events_in_file)
        self._open()

    def _make_room(self, n: int) -> bool:
        if self._fd < 0:
            self._open()
        if self._size and self._size + n > self.spec.max_bytes:
            self._rotate()
            return True
        return False

    def _count_rotated_out(self, n: int) -> None:
        with self._lock:
            self.undeliverable["rotated_out"] += n
            self.written -= n

    def _write(self, data: bytes, *, event: bool) -> None:
        if self._fd < 0:  # a failed rotation or write closed it: try again
            self._open()
        if self._size and self._size + len(data) > self.spec.max_bytes:
            self._rotate()
        n = os.write(self._fd, data)
        if n != len(data):  # O_APPEND: a short write (ENOSPC midway) leaves a cut line
            self._size += n
            raise OSError(f"short write: {n} of {len(data)} bytes (file system full?)")
        self._size += n
        self._events_in_file += event


def parse_size(text: str) -> int:
    """Bytes with an optional K/M/G suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" and t[-1:] else t
    if not digits.isdigit() or int(digits) * mult < 4096:
        raise ExportConfigError(f"bad size {text!r}: use bytes >= 4096, optionally with K, M "
                                "or G (e.g. 64M)")  # fmt: skip
    return int(digits) * mult


def file_spec(path: str, max_bytes: str | int = 64 << 20, keep: int = 5,
              queue_size: int = 65536) -> FileExportSpec:  # fmt: skip
    """A checked FileExportSpec; ExportConfigError naming the fix."""
    if not path or not path.startswith("/"):
        raise ExportConfigError(f"export file {path!r}: use an absolute path")
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        raise ExportConfigError(f"export file {path}: directory {parent} does not exist: "
                                "create it (or mount a volume there)")  # fmt: skip
    if os.path.isdir(path):
        raise ExportConfigError(f"export file {path} is a directory: name a file in it")
    size = max_bytes if isinstance(max_bytes, int) else parse_size(max_bytes)
    if size < 4096:
        raise ExportConfigError(f"export file max bytes {size}: use >= 4096")
    if not 0 <= keep <= 1000:
        raise ExportConfigError(f"export file keep {keep}: use 0..1000 rotated files")
    return FileExportSpec(path=path, max_bytes=size, keep=keep, queue_size=queue_size)
