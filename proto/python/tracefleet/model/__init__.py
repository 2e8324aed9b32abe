"""The one event model shared by the agent and the controller (no libbpf, no gRPC here).

``event`` defines the typed Event and its JSON shape (the agent's jsonl, ``tracefleet events
-o json``), ``wire`` converts it to and from ``tracefleet.v1.Event``, ``human`` renders it
like strace for terminals (control characters escaped).

``filters`` defines the in-kernel filters of an event set (Filters, WorkloadSelector) and
checks them; ``wire`` converts them to and from ``tracefleet.v1.Filters``.

One home each for what else both sides use: ``histogram`` (the latency histogram and its
bounds), ``names`` (outcomes and strategies), ``netaddr`` (host:port, unix:/PATH),
``labels`` (node labels), ``tlsfiles`` (the mTLS directory), ``argtypes`` (argparse types).
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
from tracefleet.model.filters import FilterError, Filters, WorkloadSelector

__all__ = [
    "Arg",
    "ArgValue",
    "Event",
    "FilterError",
    "Filters",
    "FlagSet",
    "OpenHow",
    "SocketAddress",
    "WorkloadSelector",
    "flag_names",
]
