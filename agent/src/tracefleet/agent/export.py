"""Durable export of events from the node: every event of the exported sets, not a sample.

An exporter never blocks capture: the consumer thread only appends the event to a bounded
queue; a thread per exporter serialises and writes it. What cannot be written is counted per
exporter and cause (``queue_full``: the writer fell behind; ``write``: the file system refused;
``rotated_out``: written, then deleted with the oldest file of the rotation), never silently
lost, and the node's own accounting (events delivered and dropped in the kernel per set, and
this exporter's counts) is written into the same stream as a typed record, so the store
knows what is missing:

    {"type": "tracefleet.accounting", "time": ..., "node": ..., "exporter": ..., ...}

Event lines are exactly ``capture -o jsonl`` (tracefleet.model.Event) plus ``node``; they
have no ``type`` key, which is how a shipper tells the two apart.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracefleet.model import Event
from tracefleet.model.event import time_text

log = logging.getLogger("tracefleet.agent.export")

ACCOUNTING_TYPE = "tracefleet.accounting"
# causes of undeliverable events (bounded label values)
CAUSES = ("queue_full", "write", "rotated_out", "serialize")

Accounting = Callable[[], Mapping[str, Any]]


class ExportConfigError(ValueError):
    """A bad exporter configuration; the message names the cause and the fix."""


@dataclass(frozen=True)
class FileExportSpec:
    path: str
    max_bytes: int = 64 << 20
    keep: int = 5  # rotated files kept beside the current one (PATH.1 .. PATH.keep)
    queue_size: int = 65536
    accounting_seconds: float = 10.0


class Exporter:
    """Base: a bounded queue drained by its own thread into ``_write``."""

    kind = "base"

    def __init__(self, name: str, *, queue_size: int, node: str = "",
                 accounting: Accounting | None = None,
                 accounting_seconds: float = 10.0) -> None:  # fmt: skip
        self.name = name
        self.node = node
        self._accounting = accounting
        self._accounting_seconds = accounting_seconds
        self._q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._qmax = queue_size
        self._qlen = 0  # approximate is not enough for the counts: guarded by _lock
        self._lock = threading.Lock()
        self.received: collections.Counter[str] = collections.Counter()  # per event set
        self.written = 0
        self.undeliverable: collections.Counter[str] = collections.Counter()  # per cause
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- capture side (consumer thread): never blocks --------------------------------------
    def offer(self, ev: dict[str, Any]) -> None:
        with self._lock:
            self.received[str(ev.get("event_set", ""))] += 1
            if self._closed or self._qlen >= self._qmax:
                self.undeliverable["queue_full"] += 1
                return
            self._qlen += 1
        self._q.put(ev)

    def healthy(self) -> bool:
        """True while the writer thread runs (a dead writer only fills the queue)."""
        t = self._thread
        return t is not None and t.is_alive() and not self._closed

    # ---- writer thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._open()
        self._thread = threading.Thread(target=self._run, name=f"tf-export-{self.name}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, a last accounting record, and stop."""
        with self._lock:
            self._closed = True
        self._q.put(None)
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("exporter %s did not finish its queue in %.0f s", self.name, timeout)
                return
        self._close()

    def _run(self) -> None:
        next_acct = time.monotonic() + self._accounting_seconds
        while True:
            wait = max(0.0, next_acct - time.monotonic())
            try:
                ev = self._q.get(timeout=wait)
            except queue.Empty:
                ev = {}
            if ev is None:
                self._write_accounting()
                return
            if ev:
                with self._lock:
                    self._qlen -= 1
                self._export(ev)
            if time.monotonic() >= next_acct:
                self._write_accounting()
                next_acct = time.monotonic() + self._accounting_seconds

    def _export(self, ev: dict[str, Any]) -> None:
        try:
            obj = Event.from_json(ev).to_json()
            if self.node:
                obj["node"] = self.node
            # ensure_ascii: bytes a traced process chose never reach the file unescaped
            line = json.dumps(obj, separators=(",", ":")) + "\n"
        except Exception as e:
            self._fail("serialize", e)
            return
        try:
            self._write(line.encode(), event=True)
        except Exception as e:
            self._fail("write", e)
            return
        with self._lock:
            self.written += 1

    def _fail(self, cause: str, error: BaseException) -> None:
        with self._lock:
            self.undeliverable[cause] += 1
            n = self.undeliverable[cause]
        if n == 1 or n & (n - 1) == 0:  # 1, 2, 4, 8...: never a line per event
            log.error("exporter %s: %s failed (%d so far): %s", self.name, cause, n,
                      repr(str(error))[:200])  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": sum(self.received.values()),
                "received_by_set": dict(self.received),
                "written": self.written,
                "queued": self._qlen,
                "undeliverable": {c: self.undeliverable.get(c, 0) for c in CAUSES},
            }

    def accounting_record(self) -> dict[str, Any]:
        now = time.time_ns()
        rec: dict[str, Any] = {"type": ACCOUNTING_TYPE, "time": time_text(now), "time_ns": now,
                               "node": self.node, "exporter": self.name,
                               "counts": self.snapshot()}  # fmt: skip
        if self._accounting is not None:
            try:
                rec["event_sets"] = dict(self._accounting())
            except Exception as e:  # the record still carries the exporter's own counts
                rec["event_sets_error"] = f"{type(e).__name__}: {e}"[:200]
        return rec

    def _write_accounting(self) -> None:
        try:
            data = self._accounting_line()
            # a rotation its write would make deletes events after the snapshot: make room
            # first, then count again, so the record's counts hold for the files kept
            if self._make_room(len(data)):
                data = self._accounting_line()
            self._write(data, event=False)
        except Exception as e:
            log.error("exporter %s: cannot write the accounting record: %s", self.name, e)

    def _accounting_line(self) -> bytes:
        return (json.dumps(self.accounting_record(), separators=(",", ":")) + "\n").encode()

    def _make_room(self, n: int) -> bool:
        """Rotate now if a write of n bytes would; True if it did (per kind)."""
        return False

    # ---- per kind ----------------------------------------------------------------------
    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _write(self, data: bytes, *, event: bool) -> None:
        raise NotImplementedError


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
        os.close(self._fd)
        self._fd = -1
        keep = self.spec.keep
        oldest = Path(f"{self.path}.{keep}")
        if keep == 0:
            self._count_rotated_out(self._events_in_file)
            self.path.unlink(missing_ok=True)
        else:
            if oldest.exists() and len(self._rotated) >= keep:
                self._count_rotated_out(self._rotated.pop())
            oldest.unlink(missing_ok=True)
            for i in range(keep - 1, 0, -1):
                src = Path(f"{self.path}.{i}")
                if src.exists():
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
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


EXPORTER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # as the controller checks it


def parse_exporter(text: str) -> tuple[str, Any]:
    """``NAME=file:/PATH[,max_bytes=SIZE][,keep=N]``, ``NAME=otlp-grpc:HOST:PORT`` or
    ``NAME=otlp-http:URL`` (tracefleet-agent run --exporter): (name, FileExportSpec or
    (protocol, endpoint))."""
    usage = ("use NAME=file:/PATH[,max_bytes=64M][,keep=5], NAME=otlp-grpc:HOST:PORT or "
             "NAME=otlp-http:http://HOST:PORT/v1/logs")  # fmt: skip
    name, sep, rest = text.partition("=")
    if not sep or not EXPORTER_NAME.fullmatch(name):
        raise ExportConfigError(
            f"bad exporter {text[:80]!r}: NAME is 1..63 of [a-z0-9_.-]; {usage}"
        )
    kind, sep, rest = rest.partition(":")
    if kind in ("otlp-grpc", "otlp-http") and sep:
        from tracefleet.agent.otlp import parse_otlp

        return name, parse_otlp(name, kind, rest)
    if kind != "file" or not sep:
        raise ExportConfigError(
            f"exporter {name}: unknown kind {kind[:20]!r} (known: file, otlp-grpc, otlp-http); "
            f"{usage}"
        )
    path, *opts = rest.split(",")
    kw: dict[str, Any] = {}
    for opt in opts:
        k, sep, v = opt.partition("=")
        if k == "max_bytes" and sep:
            kw["max_bytes"] = v
        elif k == "keep" and sep and v.isdigit():
            kw["keep"] = int(v)
        else:
            raise ExportConfigError(f"exporter {name}: bad option {opt[:40]!r}; {usage}")
    return name, file_spec(path, **kw)


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


class ExportHub:
    """The engine sink that routes each event to the exporters of its set.

    ``routes`` maps an event set to the names of the exporters it goes to; a set without an
    entry goes to ``default`` (the exporters named for every set, e.g. ``--export-file``).
    """

    def __init__(self, exporters: Iterable[Exporter], default: Iterable[str] = ()) -> None:
        self.exporters = {e.name: e for e in exporters}
        self.default = tuple(default)
        self._routes: dict[str, tuple[Exporter, ...]] = {}
        self._default = tuple(self.exporters[n] for n in self.default)

    def set_routes(self, routes: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
        """Route sets to exporters by name; returns, per set, the names this agent lacks
        (those are not exported, and the caller reports them in the set's status)."""
        new: dict[str, tuple[Exporter, ...]] = {}
        missing: dict[str, list[str]] = {}
        for name, wanted in routes.items():
            names = list(dict.fromkeys(wanted))
            new[name] = tuple(self.exporters[n] for n in names if n in self.exporters)
            if lacking := [n for n in names if n not in self.exporters]:
                missing[name] = lacking
        self._routes = new  # replaced whole: the consumer thread reads it without a lock
        return missing

    @property
    def active(self) -> bool:
        """True if any event set is routed to an exporter."""
        return bool(self._default) or any(self._routes.values())

    def __call__(self, ev: dict[str, Any]) -> None:
        key = ev.get("event_set", "")
        if key == "user":  # an application event: its rule is the set user:NAME
            key = f"user:{ev.get('syscall', '')}"
        for exp in self._routes.get(key, self._default):
            exp.offer(ev)

    def start(self) -> None:
        for e in self.exporters.values():
            e.start()

    def close(self) -> None:
        for e in self.exporters.values():
            e.close()


def engine_accounting(engine: Any) -> Accounting:
    """The node's accounting per event set, from the engine: events delivered to user space
    (``delivered``), lost in the kernel because the ring was full (``dropped``), and
    records the agent failed on (``record_errors``)."""

    def read() -> dict[str, Any]:
        errors: collections.Counter[str] = collections.Counter()
        for (s, _cause), n in engine.errors.snapshot().items():
            errors[s] += n
        return {
            name: {
                "delivered": sa.delivered,
                "dropped": sa.dropped,
                "record_errors": errors.get(name, 0),
            }
            for name, sa in engine.totals().items()
        }

    return read
