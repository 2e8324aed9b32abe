"""Clients following sampled events, and what agents must sample for them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Follower:
    nodes: frozenset[str] = frozenset()
    event_sets: frozenset[str] = frozenset()
    pids: frozenset[int] = frozenset()
    sample_rate: float = 1.0
    queue: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    missed: int = 0

    def wants_node(self, node: str) -> bool:
        return not self.nodes or node in self.nodes

    def wants(self, node: str, event: Any) -> bool:
        return (
            self.wants_node(node)
            and (not self.event_sets or event.event_set in self.event_sets)
            and (not self.pids or event.pid in self.pids)
        )


@dataclass(frozen=True)
class SampleSpec:
    """Union of what the followers of one node want."""

    event_sets: tuple[str, ...]  # empty = all
    pids: tuple[int, ...]  # empty = all
    sample_rate: float


class EventHub:
    def __init__(self) -> None:
        self.followers: set[Follower] = set()
        self.changed = asyncio.Event()  # wakes the sampling loop when followers come and go

    def add(self, f: Follower) -> None:
        self.followers.add(f)
        self.changed.set()

    def remove(self, f: Follower) -> None:
        self.followers.discard(f)
        self.changed.set()

    def dispatch(self, node: str, events: Iterable[Any]) -> None:
        if not self.followers:
            return
        for ev in events:
            for f in self.followers:
                if f.wants(node, ev):
                    try:
                        f.queue.put_nowait(ev)
                    except asyncio.QueueFull:
                        f.missed += 1

    def sample_spec(self, node: str) -> SampleSpec | None:
        mine = [f for f in self.followers if f.wants_node(node)]
        if not mine:
            return None
        sets: set[str] = set()
        pids: set[int] = set()
        all_sets = any(not f.event_sets for f in mine)
        all_pids = any(not f.pids for f in mine)
        for f in mine:
            sets.update(f.event_sets)
            pids.update(f.pids)
        return SampleSpec(
            () if all_sets else tuple(sorted(sets)),
            () if all_pids else tuple(sorted(pids)),
            max(f.sample_rate for f in mine),
        )
