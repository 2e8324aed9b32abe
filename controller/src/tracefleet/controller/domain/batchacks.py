"""When each node's BatchAck is sent.

A BatchAck is cumulative (the highest seq committed), so the controller merges them: a node
gets one when ``burst`` of its batches wait (half the agent's ack window: its send window
must never fill), else at most one per *linger*: ``ack_every`` seconds, or ``gaps`` times
the time between that node's last two batches when it batches less often (an idle agent
every 10 s, a paced one in a fleet of 10,000), at most ``linger_max``. Without the gap rule
every batch of such an agent was acknowledged on its own, a message each way per batch: at
1,000 idle agents a third of the controller's busy time went to writing those acks.

What waits longer costs the agent nothing but a few batches kept in its outbox, which it
resends after a reconnect and the ledger ignores as duplicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Seq = tuple[str, int]  # (agent instance, seq)


@dataclass
class _Node:
    burst: int  # batches held back at most
    acked: Seq | None = None  # the last acknowledged (or announced at registration)
    last_ack: float = -math.inf  # monotonic time of the last BatchAck
    last_batch: float | None = None  # monotonic time of the last batch received
    linger: float = 0.0  # how long an ack may wait now (set from the batches' gap)


class BatchAcks:
    def __init__(self, ack_every: float, burst: int, gaps: float, linger_max: float) -> None:
        self.ack_every = ack_every
        self.burst = burst
        self.gaps = gaps
        self.linger_max = max(ack_every, linger_max)
        self._nodes: dict[str, _Node] = {}
        # committed, not acknowledged yet: node -> seq (scanned twice a second)
        self._held: dict[str, Seq] = {}

    def register(self, name: str, ack_window: int) -> None:
        """A node (re)connected; ``ack_window``: batches its agent sends ahead of the acks
        (0: unknown). Its timing starts over."""
        window = ack_window or 2 * self.burst
        self._held.pop(name, None)
        self._nodes[name] = _Node(max(1, min(self.burst, window // 2)), linger=self.ack_every)

    def forget(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._held.pop(name, None)

    def drop_due(self, name: str) -> None:
        """What was due is no longer known to be committed (the ledger was read again)."""
        self._held.pop(name, None)

    def announced(self, name: str, seq: Seq) -> None:
        """The registration's BatchAck told the agent ``seq``."""
        n = self._node(name)
        n.acked = seq

    def batch(self, name: str, now: float) -> None:
        """A batch of the node arrived: the gap since its last one sets the linger."""
        n = self._node(name)
        if n.last_batch is not None:
            gap = now - n.last_batch
            n.linger = min(self.linger_max, max(self.ack_every, self.gaps * gap))
        n.last_batch = now

    def committed(self, name: str, seq: Seq, now: float) -> bool:
        """``seq`` of the node is committed; True if its BatchAck should go now."""
        n = self._node(name)
        self._held[name] = seq
        acked = n.acked
        waiting = seq[1] - acked[1] if acked is not None and acked[0] == seq[0] else seq[1]
        return waiting >= n.burst or now - n.last_ack >= n.linger

    def due(self, now: float, force: bool = False) -> list[str]:
        """Nodes whose held-back BatchAck's time has come (all with one held back: force)."""
        nodes = self._nodes
        return [
            name for name in self._held if force or now - nodes[name].last_ack >= nodes[name].linger
        ]

    def take(self, name: str, now: float) -> Seq | None:
        """The seq to acknowledge now (None: nothing due), counted as sent."""
        seq = self._held.pop(name, None)
        if seq is not None:
            n = self._nodes[name]
            n.acked, n.last_ack = seq, now
        return seq

    def _node(self, name: str) -> _Node:
        n = self._nodes.get(name)
        if n is None:  # batches committed for a node not registered on this controller
            n = self._nodes[name] = _Node(self.burst, linger=self.ack_every)
        return n
