"""The one event model shared by the agent and the controller (no libbpf, no gRPC here).

``event`` defines the typed Event and its JSON shape (the agent's jsonl, ``tracefleet events
-o json``), ``wire`` converts it to and from ``tracefleet.v1.Event``, ``human`` renders it
like strace for terminals (control characters escaped).
"""

from tracefleet.model.event import (
    Arg,
    ArgValue,
    Event,
    FlagSet,
    OpenHow,
    SocketAddress,
    flag_names,
)

__all__ = ["Arg", "ArgValue", "Event", "FlagSet", "OpenHow", "SocketAddress", "flag_names"]
