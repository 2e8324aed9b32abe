"""What every exporter shares: the bounded queue and its writer thread (Exporter), the
accounting record, the error type, and the hub that routes events to exporters."""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tracefleet.agent.capture.eventsets import EVENT_SETS
from tracefleet.model import Event
from tracefleet.model.event import time_text

log = logging.getLogger("tracefleet.agent.export")

ACCOUNTING_TYPE = "tracefleet.accounting"
# causes of undeliverable events (bounded label values)
CAUSES = ("queue_full", "write", "rotated_out", "serialize", "shutdown")

Accounting = Callable[[], Mapping[str, Any]]
# On a stop, the exporters' writers have CLOSE_SECONDS together to finish their queues, then
# ABANDON_SECONDS to count what is left and write their last records: with the drain, inside
# Kubernetes' default grace period of 30 s (a SIGKILL loses even the count)
CLOSE_SECONDS = 15.0
ABANDON_SECONDS = 5.0


class ExportConfigError(ValueError):
    """A bad exporter configuration; the message names the cause and the fix."""


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
        self._abandon = threading.Event()  # close() timed out: count the rest, write none

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

    def begin_close(self) -> None:
        """Take no more events; the writer finishes the queue, then writes the last record."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(None)

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Write what is queued, a last accounting record, and stop. A writer that has not
        finished the queue in ``timeout`` s counts the rest as ``shutdown`` instead of
        writing it (a slow destination must not hold the agent past its grace period, nor
        lose events uncounted), then writes the last record. Closing again does nothing."""
        self.begin_close()
        t = self._thread
        if t is not None and t.is_alive():
            t.join(timeout)
            if t.is_alive():
                self._abandon.set()
                with self._lock:
                    left = self._qlen
                log.error("exporter %s did not finish its queue in %.0f s: %d events left, "
                          "counted as undeliverable (shutdown)",
                          self.name, timeout, left)  # fmt: skip
                t.join(ABANDON_SECONDS)
                if t.is_alive():  # stuck in one write: nothing more can be done
                    log.error("exporter %s: its writer is stuck; its last accounting record "
                              "is not written", self.name)  # fmt: skip
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
            if ev and self._dequeued(1):
                self._export(ev)
            if time.monotonic() >= next_acct:
                self._write_accounting()
                next_acct = time.monotonic() + self._accounting_seconds

    def _dequeued(self, n: int) -> bool:
        """n events left the queue; False: close() gave up waiting, they are counted as
        ``shutdown`` and not written."""
        with self._lock:
            self._qlen -= n
            if self._abandon.is_set():
                self.undeliverable["shutdown"] += n
                return False
        return True

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

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Close every exporter within one deadline: all stop taking events at once, then
        each has what is left of ``timeout``."""
        for e in self.exporters.values():
            e.begin_close()
        deadline = time.monotonic() + timeout
        for e in self.exporters.values():
            e.close(max(0.0, deadline - time.monotonic()))


def engine_accounting(engine: Any) -> Accounting:
    """The node's accounting per event set, from the engine: events delivered to user space
    (``delivered``), lost in the kernel because the ring was full (``dropped``), and
    records the agent failed on (``record_errors``). Syscall sets add the rest of the
    engine's call accounting, so a reader of the stream can tell every missing call's fate:
    ``lost`` (in-flight entries lost or reaped: a skipped exit leaves one), ``in_flight``
    (entries not yet completed), ``missed`` and ``missed_exit`` (runs of the set's entry
    and exit programs the kernel skipped; an upper bound, of any process)."""
    call_accounting = getattr(engine, "accounting", None)

    def read() -> dict[str, Any]:
        errors: collections.Counter[str] = collections.Counter()
        for (s, _cause), n in engine.errors.snapshot().items():
            errors[s] += n
        out: dict[str, Any] = {}
        for name, sa in engine.totals().items():
            row = {"delivered": sa.delivered, "dropped": sa.dropped,
                   "record_errors": errors.get(name, 0)}  # fmt: skip
            spec = EVENT_SETS.get(name)
            if call_accounting is not None and spec is not None and spec.calls_accounted:
                acc = call_accounting(name)
                row.update({k: acc[k] for k in ("lost", "in_flight", "missed", "missed_exit")})
            out[name] = row
        return out

    return read
