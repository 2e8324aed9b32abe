"""Controller messages serialized once and written to many agent streams.

A DesiredState of one generation goes to every agent whose rules have the same outcome: the
controller registers the shared message here once, and the AgentService's response serializer
(``serialize``) writes its bytes instead of serializing it again per stream. An entry holds
its message, so the id it is found by cannot be reused while it is registered."""

from __future__ import annotations

from typing import Any


class Preserialized:
    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, bytes]] = {}

    def add(self, msg: Any) -> Any:
        """Serialize ``msg`` now; it must not be changed afterwards. Returns it."""
        self._by_id[id(msg)] = (msg, msg.SerializeToString())
        return msg

    def discard(self, msg: Any) -> None:
        hit = self._by_id.get(id(msg))
        if hit is not None and hit[0] is msg:
            del self._by_id[id(msg)]

    def serialize(self, msg: Any) -> bytes:
        hit = self._by_id.get(id(msg))
        if hit is not None and hit[0] is msg:
            return hit[1]
        return bytes(msg.SerializeToString())

    def __len__(self) -> int:
        return len(self._by_id)


WIRE = Preserialized()  # one per process: the servers' serializer and the controllers share it
