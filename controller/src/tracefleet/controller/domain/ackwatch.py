"""Watches of acknowledgements (ControlService.WatchAcks): which watched nodes applied a
generation, pushed as it changes. The controller calls ``AckWatches.changed(node)`` when a
node acks, registers or disconnects: O(watches) per call, never a scan of the fleet, and the
changes of one loop iteration (1,000 acks of one push) are coalesced into one message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from enum import IntEnum
from typing import Any

from tracefleet.controller.domain.fleet import Node


class AckState(IntEnum):  # values of tracefleet.v1.AckState
    PENDING = 1
    APPLIED = 2
    NOT_CONNECTED = 3
    UNKNOWN = 4


def ack_state(node: Node | None, generation: int) -> AckState:
    if node is None:
        return AckState.UNKNOWN
    if node.applied_generation >= generation:
        # counted as applied even when disconnected since: it applied it
        return AckState.APPLIED
    return AckState.PENDING if node.conn is not None else AckState.NOT_CONNECTED


class AckWatch:
    """One client's watch: the state of every watched node, and the names changed since the
    client last took them."""

    def __init__(self, generation: int, names: Iterable[str] | None) -> None:
        self.generation = generation
        self.names: frozenset[str] | None = None if names is None else frozenset(names)
        self.states: dict[str, AckState] = {}
        self.counts: dict[AckState, int] = dict.fromkeys(AckState, 0)
        self.changed: set[str] = set()
        self.wakeup = asyncio.Event()

    def watches(self, name: str) -> bool:
        return self.names is None or name in self.names

    def set(self, name: str, state: AckState) -> None:
        old = self.states.get(name)
        if old is state:
            return
        if old is not None:
            self.counts[old] -= 1
        self.states[name] = state
        self.counts[state] += 1
        self.changed.add(name)
        self.wakeup.set()

    def take(self) -> list[str]:
        out = sorted(self.changed)
        self.changed.clear()
        self.wakeup.clear()
        return out


class AckWatches:
    def __init__(self) -> None:
        self.watches: set[AckWatch] = set()

    def add(self, generation: int, names: Iterable[str] | None, nodes: dict[str, Any]) -> AckWatch:
        w = AckWatch(generation, names)
        for name in nodes if w.names is None else w.names:  # take() sorts what it hands out
            w.set(name, ack_state(nodes.get(name), generation))
        self.watches.add(w)
        return w

    def remove(self, w: AckWatch) -> None:
        self.watches.discard(w)

    def changed(self, node: Node, forgotten: bool = False) -> None:
        for w in self.watches:
            if w.watches(node.name):
                w.set(node.name, AckState.UNKNOWN if forgotten else ack_state(node, w.generation))
