"""The ledger of result batches: every batch counted exactly once, and the totals durable.

Per node and event set it sums what the agents reported (delivered, dropped in the kernel,
discarded from an agent's outbox, and the call accounting: passed the filters, counted lost
and its parts, filtered by path prefix, undecodable); per agent instance it keeps the last
``seq`` applied. A batch whose seq is not above that is a resend of a batch already
applied (the agent did not get the acknowledgement before the stream broke) and is ignored.
The Controller writes the changed rows with the seqs they include in one SQLite transaction
(a group commit of every batch applied since the previous one) and only then acknowledges
those seqs to the agents, so after a crash the store holds exactly the batches that were
acknowledged or that will be ignored when sent again, never a batch counted twice or a seq
without its counts.

Across replicas (``--etcd``) the rows live in etcd, one document per node written by
compare-and-swap (``EtcdStore``): a replica takes a node's rows from etcd when the node
registers with it (``replace_node``), so the batches the old replica committed are
duplicates there, and a commit that finds the document changed by another replica is not
acknowledged: the node's rows are read again and its stream closed, so the agent resends.
``NodeCounts.adopted`` counts resent batches applied for an agent instance this replica first
saw past seq 1 (its earlier batches went elsewhere): with a shared ledger, batches no replica
had committed (not stored).

Not thread-safe for writers (the controller's asyncio loop); ``snapshot()`` may be called
from the metrics thread.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from tracefleet.controller.storage.store import SET_ACCOUNTING, LedgerRows
from tracefleet.v1 import agent_pb2

# Bounds of what one batch may say (checked before anything is applied): SQLite integers are
# signed 64-bit, and no interval of a real agent comes near these.
MAX_SEQ = 2**62
MAX_COUNT = 2**40  # events of one set in one batch
MAX_TOTAL = 2**62  # totals saturate here
MAX_INSTANCE_ID = 64
INSTANCES_PER_NODE = 4  # cursors kept per node (agent restarts); the oldest are forgotten


class Outcome(Enum):
    APPLIED = "applied"  # counted; acknowledged after the next commit
    DUPLICATE = "duplicate"  # seq already applied: ignored
    LEGACY = "legacy"  # no instance_id (an older agent): counted, never acknowledged


# SetAggregate's call accounting, summed like delivered: for the syscall sets, once the
# node is quiet, passed = delivered + dropped + discarded + lost + prefix_filtered +
# decode_errors (lost = lost_inflight_full + lost_inflight_stale + lost_deleted). Summed the
# same way, outside that identity: kernel_missed_entry/_exit, program runs the kernel skipped.
# Totals of a database from before these columns count from the upgrade on.
ACCOUNTING = SET_ACCOUNTING


@dataclass
class SetCounts:
    delivered: int = 0
    dropped: int = 0
    discarded: int = 0
    passed: int = 0
    lost: int = 0
    lost_inflight_full: int = 0
    lost_inflight_stale: int = 0
    lost_deleted: int = 0
    prefix_filtered: int = 0
    decode_errors: int = 0
    kernel_missed_entry: int = 0
    kernel_missed_exit: int = 0

    def copy(self) -> SetCounts:
        return copy.copy(self)  # flat ints: dataclasses.replace re-runs __init__ per copy

    def row(self) -> tuple[int, ...]:
        """The counts in field order (a store row's columns after node and set)."""
        return tuple(_set_count_fields(self))


_set_count_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(SetCounts)))


@dataclass
class NodeCounts:
    sets: dict[str, SetCounts] = field(default_factory=dict)
    applied: int = 0  # batches
    duplicate: int = 0  # batches ignored as already applied
    discarded: int = 0  # batches the agent said it discarded
    adopted: int = 0  # resent batches from an instance first seen past seq 1 (in memory)


@dataclass
class _Cursor:
    applied: int  # last seq applied (in memory, maybe not committed yet)
    committed: int  # last seq written to the store
    updated: float
    adopted: bool = False  # first seen here past seq 1: came from another controller


def batch_problem(batch: agent_pb2.ResultBatch) -> str:
    """Why a ResultBatch cannot be applied, or "" if it can."""
    if len(batch.instance_id) > MAX_INSTANCE_ID:
        return f"instance_id longer than {MAX_INSTANCE_ID} characters"
    if batch.instance_id and not 1 <= batch.seq <= MAX_SEQ:
        return f"seq {batch.seq} out of range 1..{MAX_SEQ}"
    for s in batch.sets:
        if max(s.delivered, s.dropped, s.discarded, *(getattr(s, f) for f in ACCOUNTING)) > (
            MAX_COUNT
        ):
            return f"event set {s.event_set[:40]!r}: a count beyond {MAX_COUNT}"
    return ""


class Ledger:
    def __init__(self, rows: LedgerRows | None = None, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self.nodes: dict[str, NodeCounts] = {}
        self._cursors: dict[tuple[str, str], _Cursor] = {}
        # node -> its instances in _cursors: a node's cursors found without a scan of the
        # fleet's (the first batch of every agent instance, a registration on etcd)
        self._instances: dict[str, set[str]] = {}
        self._dirty_sets: set[tuple[str, str]] = set()
        self._dirty_nodes: set[str] = set()
        self._dirty_cursors: set[tuple[str, str]] = set()
        self._dropped_cursors: set[tuple[str, str]] = set()
        if rows is not None:
            for node, name, *counts in rows.set_totals:
                self._node(node).sets[name] = SetCounts(*counts)
            for node, applied, duplicate, discarded in rows.node_batches:
                n = self._node(node)
                n.applied, n.duplicate, n.discarded = applied, duplicate, discarded
            for node, instance, seq, updated in rows.cursors:
                self._add_cursor(node, instance, _Cursor(seq, seq, updated))

    def _add_cursor(self, node: str, instance: str, cursor: _Cursor) -> _Cursor:
        self._cursors[(node, instance)] = cursor
        self._instances.setdefault(node, set()).add(instance)
        return cursor

    def _drop_cursors(self, node: str) -> None:
        for instance in self._instances.pop(node, ()):
            del self._cursors[(node, instance)]

    def _node(self, name: str) -> NodeCounts:
        n = self.nodes.get(name)
        if n is None:
            n = self.nodes[name] = NodeCounts()
        return n

    # reading ----------------------------------------------------------------------------

    def committed_seq(self, node: str, instance: str) -> int:
        """Last seq of ``instance`` that is in the store (0: none)."""
        c = self._cursors.get((node, instance))
        return c.committed if c else 0

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, NodeCounts]:
        """A copy of the counts of ``names`` (None: every node)."""
        with self._lock:
            nodes = self.nodes
            pick = nodes.items() if names is None else ((k, nodes.get(k)) for k in names)
            return {
                name: NodeCounts(
                    {k: v.copy() for k, v in n.sets.items()},
                    n.applied,
                    n.duplicate,
                    n.discarded,
                    n.adopted,
                )
                for name, n in pick
                if n is not None
            }

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_nodes or self._dirty_cursors or self._dropped_cursors)

    # writing ----------------------------------------------------------------------------

    def apply(self, node: str, batch: agent_pb2.ResultBatch) -> Outcome:
        """Count ``batch`` unless it was applied before; check batch_problem() first."""
        key = (node, batch.instance_id)
        cursor = self._cursors.get(key) if batch.instance_id else None
        with self._lock:
            n = self._node(node)
            if cursor is not None and batch.seq <= cursor.applied:
                n.duplicate += 1
                self._dirty_nodes.add(node)
                return Outcome.DUPLICATE
            for s in batch.sets:
                c = n.sets.get(s.event_set)
                if c is None:
                    c = n.sets[s.event_set] = SetCounts()
                c.delivered = min(MAX_TOTAL, c.delivered + s.delivered)
                c.dropped = min(MAX_TOTAL, c.dropped + s.dropped)
                c.discarded = min(MAX_TOTAL, c.discarded + s.discarded)
                for f in ACCOUNTING:
                    setattr(c, f, min(MAX_TOTAL, getattr(c, f) + getattr(s, f)))
                self._dirty_sets.add((node, s.event_set))
            n.applied += 1
            n.discarded = min(MAX_TOTAL, n.discarded + batch.lost_intervals)
            self._dirty_nodes.add(node)
        if not batch.instance_id:
            return Outcome.LEGACY
        now = self._clock()
        if cursor is None:
            cursor = self._add_cursor(node, key[1], _Cursor(0, 0, now, adopted=batch.seq > 1))
            self._forget_old_instances(node)
        if cursor.adopted and batch.replayed:
            n.adopted += 1  # perhaps applied by the replica it came from too
        cursor.applied, cursor.updated = batch.seq, now
        self._dirty_cursors.add(key)
        self._dropped_cursors.discard(key)
        return Outcome.APPLIED

    def replace_node(self, node: str, rows: LedgerRows) -> None:
        """Take ``node``'s counts and cursors from ``rows`` (the store, as another replica
        left them); what was applied here and not committed is dropped (never acknowledged:
        the agent sends it again)."""
        with self._lock:
            old = self.nodes.pop(node, None)
            self._drop_cursors(node)
            for dirty in (self._dirty_sets, self._dirty_cursors, self._dropped_cursors):
                dirty -= {k for k in dirty if k[0] == node}
            self._dirty_nodes.discard(node)
            n = self._node(node)
            n.adopted = old.adopted if old is not None else 0
            for name, event_set, *counts in rows.set_totals:
                if name == node:
                    n.sets[event_set] = SetCounts(*counts)
            for name, applied, duplicate, discarded in rows.node_batches:
                if name == node:
                    n.applied, n.duplicate, n.discarded = applied, duplicate, discarded
            for name, instance, seq, updated in rows.cursors:
                if name == node:
                    self._add_cursor(node, instance, _Cursor(seq, seq, updated))

    def forget(self, node: str) -> None:
        """Drop a removed node's counts and cursors (the store deletes its rows)."""
        with self._lock:
            self.nodes.pop(node, None)
            self._drop_cursors(node)
            for dirty in (self._dirty_sets, self._dirty_cursors, self._dropped_cursors):
                dirty -= {k for k in dirty if k[0] == node}
            self._dirty_nodes.discard(node)

    def _forget_old_instances(self, node: str) -> None:
        instances = self._instances.get(node, set())
        if len(instances) <= INSTANCES_PER_NODE:
            return
        mine = sorted((self._cursors[(node, inst)].updated, inst) for inst in instances)
        for _, inst in mine[: len(mine) - INSTANCES_PER_NODE]:
            del self._cursors[(node, inst)]
            instances.discard(inst)
            self._dirty_cursors.discard((node, inst))
            self._dropped_cursors.add((node, inst))

    def changes(self) -> LedgerRows:
        """The rows changed since the last ``committed()``, as absolute values."""
        rows = LedgerRows()
        for node, name in sorted(self._dirty_sets):
            c = self.nodes[node].sets[name]
            rows.set_totals.append((node, name, *c.row()))
        for node in sorted(self._dirty_nodes):
            n = self.nodes[node]
            rows.node_batches.append((node, n.applied, n.duplicate, n.discarded))
        for key in sorted(self._dirty_cursors):
            cur = self._cursors[key]
            rows.cursors.append((key[0], key[1], cur.applied, cur.updated))
        rows.dropped_cursors = sorted(self._dropped_cursors)
        return rows

    def committed(self, rows: LedgerRows) -> list[tuple[str, str, int]]:
        """``rows`` (from changes(), with nothing applied in between) are in the store;
        returns the (node, instance, seq) to acknowledge."""
        acks = []
        for node, instance, seq, _ in rows.cursors:
            c = self._cursors.get((node, instance))
            if c is not None and seq > c.committed:
                c.committed = seq
                acks.append((node, instance, seq))
        self._dirty_sets.clear()
        self._dirty_nodes.clear()
        self._dirty_cursors.clear()
        self._dropped_cursors.clear()
        return acks
