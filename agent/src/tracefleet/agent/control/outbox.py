"""The agent's outbox: ResultBatches the controller has not acknowledged yet, within a memory
budget, with exact accounting of what the budget forced the agent to discard.

Life of a batch: ``add()`` numbers it (``seq`` 1, 2, ... of this agent instance) -> the send
loop writes it (``next_to_send()`` / ``mark_sent()``; at most ``window`` batches written and
not acknowledged) -> the controller applies it durably and answers with a cumulative
BatchAck -> ``ack()`` forgets it. After a reconnect every batch not acknowledged is sent
again; the controller ignores the ones it had applied (it keeps the last seq per instance).

Budget: at most ``max_batches`` batches and ``max_bytes`` serialized bytes. When a new
batch does not fit, the oldest batches *never written to any stream* are discarded first: a
batch that was written may have been applied by the controller before the stream broke, so
discarding it could count its events twice (applied and reported discarded); at most
``window`` of those exist. If the new batch still does not fit, it is discarded itself.
A discarded batch was never sent (its seq, if it had one, is a gap the controller never
sees); its events (delivered + dropped, per event set) and the number of batches are
carried into the next batch that is kept (``SetAggregate.discarded``,
``ResultBatch.lost_intervals``), so that for every event the agent produced the controller
receives exactly one of: the event counted, or the event counted as discarded. The call
accounting of a discarded batch (``passed``, ``lost`` and its parts, ``prefix_filtered``,
``decode_errors``, and the kernel's skipped runs: counts, not events) is carried into that
batch as is, so the controller's ``passed = delivered + dropped + discarded + lost +
prefix_filtered + decode_errors`` holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tracefleet.v1 import agent_pb2

# SetAggregate counts carried unchanged from a discarded batch into the next one kept
_CARRIED = ("passed", "lost", "lost_inflight_full", "lost_inflight_stale", "lost_deleted",
            "prefix_filtered", "decode_errors", "kernel_missed_entry",
            "kernel_missed_exit")  # fmt: skip


@dataclass
class _Entry:
    batch: agent_pb2.ResultBatch
    size: int  # serialized bytes


class Outbox:
    def __init__(
        self, instance_id: str, max_batches: int = 600, max_bytes: int = 32 << 20, window: int = 32
    ) -> None:
        if not instance_id:
            raise ValueError("instance_id must not be empty")
        self.instance_id = instance_id
        self.max_batches = max(2, max_batches)
        self.max_bytes = max(1, max_bytes)
        # room for at least one batch never written, whatever the written ones hold
        self.window = max(1, min(window, self.max_batches - 1))
        self._q: deque[_Entry] = deque()
        self.bytes = 0
        self.last_seq = 0  # seq of the newest batch kept
        self.acked = 0  # every seq <= acked is applied by the controller
        self.written = 0  # every seq <= written was written to some stream at least once
        # what discarded batches held, not reported yet
        self._carry_batches = 0
        self._carry_events: dict[str, int] = {}
        self._carry_counts: dict[str, dict[str, int]] = {}
        # cumulative counters of this instance
        self.discarded_batches = 0
        self.discarded_events = 0
        self.acked_batches = 0

    def __len__(self) -> int:
        return len(self._q)

    @property
    def pending_discards(self) -> tuple[int, int]:
        """(batches, events) discarded and not yet reported in a kept batch."""
        return self._carry_batches, sum(self._carry_events.values())

    def batches(self) -> list[agent_pb2.ResultBatch]:
        return [e.batch for e in self._q]

    # producer ---------------------------------------------------------------------------

    def add(self, batch: agent_pb2.ResultBatch) -> bool:
        """Keep ``batch`` (numbered, carrying the discards not reported yet) or discard it;
        True if kept."""
        self._attach_carry(batch)
        size = batch.ByteSize()
        while not self._fits(size):
            i = self._oldest_unwritten()
            if i is None:
                break
            victim = self._q[i]
            del self._q[i]
            self.bytes -= victim.size
            self._discard(victim.batch)
            # the new batch reports this discard too
            self._attach_carry(batch)
            size = batch.ByteSize()
        if not self._fits(size):
            self._discard(batch)
            return False
        self.last_seq += 1
        batch.instance_id = self.instance_id
        batch.seq = self.last_seq
        size = batch.ByteSize()
        self._q.append(_Entry(batch, size))
        self.bytes += size
        return True

    def _fits(self, size: int) -> bool:
        return len(self._q) + 1 <= self.max_batches and self.bytes + size <= self.max_bytes

    def _oldest_unwritten(self) -> int | None:
        for i, e in enumerate(self._q):
            if e.batch.seq > self.written:
                return i
        return None

    def _discard(self, batch: agent_pb2.ResultBatch) -> None:
        """Account for a batch that will never be sent (it holds its own carry, if any)."""
        self.discarded_batches += 1
        self._carry_batches += 1 + batch.lost_intervals
        for s in batch.sets:
            n = s.delivered + s.dropped
            self.discarded_events += n
            self._carry_events[s.event_set] = (
                self._carry_events.get(s.event_set, 0) + n + s.discarded
            )
            carry = self._carry_counts.setdefault(s.event_set, {})
            for f in _CARRIED:
                carry[f] = carry.get(f, 0) + getattr(s, f)

    def _attach_carry(self, batch: agent_pb2.ResultBatch) -> None:
        if not self._carry_batches and not self._carry_events:
            return
        batch.lost_intervals += self._carry_batches
        by_name = {s.event_set: s for s in batch.sets}
        for name, n in sorted(self._carry_events.items()):
            target = by_name.get(name)
            if target is None:
                target = by_name[name] = batch.sets.add(event_set=name)
            target.discarded += n
            for f, v in self._carry_counts.get(name, {}).items():
                setattr(target, f, getattr(target, f) + v)
        self._carry_batches = 0
        self._carry_events = {}
        self._carry_counts = {}

    # sender -----------------------------------------------------------------------------

    def next_to_send(self, cursor: int) -> agent_pb2.ResultBatch | None:
        """The batch after ``cursor`` (the last seq written on the current stream), if the
        window allows another one in flight."""
        cursor = max(cursor, self.acked)
        if cursor - self.acked >= self.window:
            return None
        for e in self._q:
            if e.batch.seq > cursor:
                return e.batch
        return None

    def mark_written(self, seq: int) -> bool:
        """``seq`` is about to be written; True if it was written before (a resend)."""
        resend = seq <= self.written
        self.written = max(self.written, seq)
        return resend

    def ack(self, instance_id: str, seq: int) -> int:
        """The controller applied every batch up to ``seq``; returns how many were
        forgotten. Acks of another instance, or beyond what was ever written, are ignored."""
        if instance_id != self.instance_id or seq <= self.acked or seq > self.written:
            return 0
        self.acked = seq
        n = 0
        while self._q and self._q[0].batch.seq <= seq:
            self.bytes -= self._q.popleft().size
            n += 1
        self.acked_batches += n
        return n
