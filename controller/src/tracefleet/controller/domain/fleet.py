"""The nodes the controller knows: connection, what they applied, when they were last seen."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from tracefleet.controller.domain.aggregate import NodeWindow
from tracefleet.controller.storage.store import NodeRecord
from tracefleet.v1 import types_pb2

# (name, enabled, attached, strategy, error) of each set, as an agent reported them
StatusKey = tuple[tuple[str, bool, bool, str, str], ...]
MAX_SHARED_STATUSES = 4096  # distinct status lists kept shared before the table starts over


class Statuses(list[dict[str, object]]):
    """A node's set statuses (``Node.info["statuses"]``, JSON-ready dicts) shared by every
    node that reported the same ones, with their JSON text and wire form made once: a change
    acked by 1,000 agents with the same statuses is encoded once for the node-record saves
    and built once for WatchAcks and GetStatus, not once per node. Never changed in place."""

    __slots__ = ("_wire", "json", "pb")

    def __init__(self, key: StatusKey) -> None:
        super().__init__(
            {"name": n, "enabled": e, "attached": a, "strategy": s, "error": err}
            for n, e, a, s, err in key
        )
        self.json = json.dumps(list(self), sort_keys=True)
        self.pb = tuple(types_pb2.SetStatus(**d) for d in self)  # type: ignore[arg-type]
        self._wire: dict[type, bytes] = {}

    def wire(self, cls: type) -> bytes:
        """These statuses as the ``statuses`` field of a ``cls`` message, serialized once:
        merged into each node's message (MergeFromString) instead of copying every SetStatus
        into it."""
        data = self._wire.get(cls)
        if data is None:
            data = self._wire[cls] = cls(statuses=self.pb).SerializeToString()
        return data


class StatusTable:
    """One ``Statuses`` per distinct list of statuses reported (bounded). ``by_wire`` finds
    one by the serialized message that reported it (an Ack: its generation and statuses),
    so that the 1,000 agents acking one change with the same statuses are looked up by one
    bytes key each, not checked and keyed field by field again."""

    def __init__(self) -> None:
        self._by_key: dict[StatusKey, Statuses] = {}
        self._by_wire: dict[bytes, Statuses] = {}

    def by_wire(self, data: bytes) -> Statuses | None:
        return self._by_wire.get(data)

    def add_wire(self, data: bytes, statuses: Statuses) -> None:
        """``data`` reported ``statuses`` and nothing was dropped from it by the checks."""
        if len(self._by_wire) >= MAX_SHARED_STATUSES:
            self._by_wire.clear()
        self._by_wire[data] = statuses

    def get(self, statuses: list[types_pb2.SetStatus]) -> Statuses:
        key = tuple((s.name, s.enabled, s.attached, s.strategy, s.error) for s in statuses)
        hit = self._by_key.get(key)
        if hit is None:
            if len(self._by_key) >= MAX_SHARED_STATUSES:
                self._by_key.clear()
            hit = self._by_key[key] = Statuses(key)
        return hit


def status_pbs(info: dict[str, Any]) -> list[types_pb2.SetStatus]:
    """A node's statuses as SetStatus messages (made once per shared list)."""
    value = info.get("statuses", [])
    if isinstance(value, Statuses):
        return list(value.pb)
    return [types_pb2.SetStatus(**s) for s in value]


class State(Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # stream closed recently; reconnect expected
    STALE = "stale"  # not heard from for longer than stale_after


class Connection:
    """One open Connect stream: messages to send, and a way to close it from the server.

    The stream's writer takes every message waiting at once (``take``) and sleeps on one
    future while there are none: a change wakes each of 1,000 writers once, without an
    asyncio.Queue's getter bookkeeping per message."""

    def __init__(self) -> None:
        self._outbox: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.sampling = False  # a SampleRequest lease is outstanding on this stream

    def send(self, message: Any) -> None:
        if not self.closed:
            self._put(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._put(None)

    def _put(self, message: Any) -> None:
        self._outbox.append(message)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[Any]:
        """The messages waiting, oldest first (None: the stream is to close), now."""
        out = list(self._outbox)
        self._outbox.clear()
        return out

    async def wait(self) -> list[Any]:
        """The messages waiting, once there is at least one."""
        while not self._outbox:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.take()


@dataclass
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    kernel_version: str = ""
    agent_version: str = ""
    # JSON-ready: {"strategies": [...], "event_sets": [...], "statuses": [...],
    # "capabilities_json": "..."}
    info: dict[str, Any] = field(default_factory=dict)
    applied_generation: int = 0
    last_seen: float = 0.0  # unix seconds
    conn: Connection | None = None
    window: NodeWindow = field(default_factory=NodeWindow)
    # info's values as JSON, each with the object it encodes: an ack replaces the statuses
    # and leaves the capabilities, which are then not encoded again (node-record saves)
    _info_parts: dict[str, tuple[Any, str]] = field(default_factory=dict, repr=False)
    # the labels as JSON, with the dict it encodes (labels are replaced, never changed in
    # place): an ack's node-record save does not encode them again
    _labels_json: tuple[Any, str] = field(default=(None, ""), repr=False)

    def record(self) -> NodeRecord:
        if self._labels_json[0] is not self.labels:
            self._labels_json = (self.labels, json.dumps(self.labels, sort_keys=True))
        return NodeRecord(
            self.name,
            dict(self.labels),
            self.kernel_version,
            self.agent_version,
            self.info,
            self.applied_generation,
            self.last_seen,
            self.info_json(),
            self._labels_json[1],
        )

    def info_json(self) -> str:
        """json.dumps(self.info, sort_keys=True), encoding only the values replaced since
        the last call (values are replaced, never changed in place)."""
        parts = []
        for key in sorted(self.info):
            value = self.info[key]
            hit = self._info_parts.get(key)
            if hit is None or hit[0] is not value:
                encoded = (
                    value.json if isinstance(value, Statuses) else json.dumps(value, sort_keys=True)
                )
                text = f"{json.dumps(key)}: {encoded}"
                hit = self._info_parts[key] = (value, text)
            parts.append(hit[1])
        return "{" + ", ".join(parts) + "}"


class Fleet:
    def __init__(self, stale_after: float = 10.0, window: float = 10.0) -> None:
        self.stale_after = stale_after
        self.window = window
        self.nodes: dict[str, Node] = {}
        # the nodes with a stream (node.conn set): counted and walked by periodic tasks
        # without a pass over every node known (10,000 at fleet scale)
        self._connected: dict[str, Node] = {}
        self._dirty: set[str] = set()

    def load(self, records: list[NodeRecord]) -> None:
        """Nodes known before a restart: listed (as disconnected or stale) until they return."""
        for r in records:
            self.nodes[r.name] = Node(
                r.name,
                r.labels,
                r.kernel_version,
                r.agent_version,
                r.info,
                r.applied_generation,
                r.last_seen,
                window=NodeWindow(self.window),
            )

    def attach(self, name: str, conn: Connection) -> Node:
        """A stream registered as ``name``; an older stream of the same node is closed."""
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = Node(name, window=NodeWindow(self.window))
        if node.conn is not None and node.conn is not conn:
            node.conn.close()
        node.conn = conn
        self._connected[name] = node
        self.seen(node)
        return node

    def detach(self, node: Node, conn: Connection) -> bool:
        """The stream ended; False if a newer stream already replaced it."""
        conn.close()
        if node.conn is not conn:
            return False
        node.conn = None
        del self._connected[node.name]
        self.mark_dirty(node)
        return True

    def seen(self, node: Node) -> None:
        node.last_seen = time.time()

    def mark_dirty(self, node: Node) -> None:
        self._dirty.add(node.name)

    def forget(self, name: str) -> None:
        self.nodes.pop(name, None)
        self._dirty.discard(name)

    def take_dirty(self) -> list[NodeRecord]:
        out = [self.nodes[n].record() for n in sorted(self._dirty) if n in self.nodes]
        self._dirty.clear()
        return out

    def state(self, node: Node, now: float | None = None) -> State:
        now = time.time() if now is None else now
        if now - node.last_seen > self.stale_after:
            return State.STALE
        return State.CONNECTED if node.conn is not None else State.DISCONNECTED

    def connected(self) -> list[Node]:
        return list(self._connected.values())

    def connected_count(self) -> int:
        return len(self._connected)

    def disconnected(self) -> list[Node]:
        if len(self._connected) == len(self.nodes):
            return []
        return [n for n in self.nodes.values() if n.conn is None]

    def registered_event_sets(self) -> set[str]:
        out: set[str] = set()
        for n in self.nodes.values():
            out.update(n.info.get("event_sets", ()))
        return out
