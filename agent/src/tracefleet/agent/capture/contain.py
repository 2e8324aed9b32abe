"""Containment of per-record failures: counted per cause, logged once per cause with a count.

A traced process controls the bytes of every record it causes, so no record may take the
consumer down: whatever fails while decoding, patching (user-space fallback), filtering,
sampling or handing a record to a sink is caught at that step, counted under a bounded
``cause`` label (the metric ``tracefleet_agent_record_errors_total``), and the rest of the
record goes on. The log gets one line per distinct (cause, exception type) when first seen and
then at most one line per ``interval`` with the running count: never a traceback per record
(the first occurrence's traceback is logged at debug level).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("tracefleet.agent")

# Every value the ``cause`` label can take (bounded: never text taken from a record).
CAUSES: dict[str, str] = {
    "decode": "record unusable (short, unknown kind, undecodable): counted, not delivered",
    "fallback": "user-space fallback failed on an argument: that argument stays lost",
    "filter": "user-space path filter failed: the event is not delivered (fail closed)",
    "sample": "sampling for the controller failed: the event is not sampled",
    "sink": "a consumer of events (output, follower) failed on the event",
    "redact": "redacting a sampled argument failed: its value is sent as *** (fail closed)",
    "housekeeping": "detaching idle sets or reaping in-flight entries failed (retried)",
    "poll": "reading the ring buffer failed (retried)",
}
# event_set label for failures not tied to one set (bounded with the set names)
ANY_SET = "all"
UNKNOWN_SET = "unknown"
_MAX_TEXT = 200


class ErrorCounter:
    """Thread-safe counts of contained failures per (event set, cause)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # (cause, exception type) -> [count, count at the last log line, time of that line]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def count(self, event_set: str, cause: str, error: BaseException | str) -> None:
        if cause not in CAUSES:  # a programming error, but never a crash on the hot path
            cause = "decode"
        kind = type(error).__name__ if isinstance(error, BaseException) else "error"
        now = time.monotonic()
        with self._lock:
            self.counts[(event_set, cause)] += 1
            seen = self._seen.get((cause, kind))
            if seen is None:
                self._seen[(cause, kind)] = [1, 1, now]
                first = True
            else:
                seen[0] += 1
                if now - seen[2] < self.interval:
                    return
                first = False
                n, since, elapsed = int(seen[0]), int(seen[0] - seen[1]), now - seen[2]
                seen[1], seen[2] = seen[0], now
        # the message may quote bytes of the record: escaped and bounded, never raw
        text = repr(str(error))[:_MAX_TEXT]
        if first:
            log.error("contained %s error (%s: %s) in event set %s: %s; counted under "
                      "cause=%s, further ones are counted and logged at most every %.0f s",
                      cause, kind, text, event_set, CAUSES[cause], cause,
                      self.interval)  # fmt: skip
            if isinstance(error, BaseException):
                log.debug("first %s error", cause, exc_info=error)
        else:
            log.error("contained %s errors (%s): %d so far, %d in the last %.0f s; last: %s",
                      cause, kind, n, since, elapsed, text)  # fmt: skip

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)

    def total(self, event_set: str | None = None) -> int:
        with self._lock:
            return sum(n for (s, _), n in self.counts.items() if event_set in (None, s))
