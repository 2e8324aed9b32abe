"""The API edge of the model: Event <-> tracefleet.v1.Event, Filters <-> tracefleet.v1.Filters.

Events: the typed oneof carries the value; the deprecated string
fields (value, status, strategy) stay filled so older clients still show something, and an
event from an older agent (no oneof, no enums) is read back from those strings."""

from __future__ import annotations

import json
from typing import cast

from tracefleet.model.event import (
    STATUSES,
    Arg,
    ArgValue,
    Event,
    FlagSet,
    OpenHow,
    SocketAddress,
)
from tracefleet.model.filters import NO_FILTERS, Filters, WorkloadSelector
from tracefleet.v1 import types_pb2

# every status of the model has its enum value (ARG_STATUS_<NAME>): a status missing from the
# enum would go out as UNSPECIFIED, and only clients reading the string would see it
_STATUS_CODE: dict[str, types_pb2.ArgStatus] = {
    name: cast(types_pb2.ArgStatus, types_pb2.ArgStatus.Value(f"ARG_STATUS_{name.upper()}"))
    for name in STATUSES
}
_STRATEGY_CODE: dict[str, types_pb2.Strategy] = {
    name.removeprefix("STRATEGY_").lower().replace("_", "-"): cast(
        types_pb2.Strategy, types_pb2.Strategy.Value(name)
    )
    for name in types_pb2.Strategy.keys()
    if name != "STRATEGY_UNSPECIFIED"
}


def _legacy_text(v: ArgValue) -> str:
    """The deprecated EventArg.value: plain text for scalars, JSON for lists and objects."""
    if v is None:
        return ""
    if isinstance(v, FlagSet):
        return str(v.raw)
    if isinstance(v, SocketAddress | OpenHow):
        return json.dumps(v.to_json())
    if isinstance(v, list):
        return json.dumps(v)
    return str(v)


def arg_to_pb(a: Arg) -> types_pb2.EventArg:
    pb = types_pb2.EventArg()
    _fill_arg(pb, a)
    return pb


def _fill_arg(pb: types_pb2.EventArg, a: Arg) -> None:
    # fields set in place (no intermediate messages): this runs per forwarded event
    pb.value = _legacy_text(a.value)
    pb.status = a.status
    pb.strategy = a.strategy
    if a.redacted:
        pb.redacted = True
    pb.status_code = _STATUS_CODE.get(a.status, types_pb2.ARG_STATUS_UNSPECIFIED)
    pb.strategy_code = _STRATEGY_CODE.get(a.strategy, types_pb2.STRATEGY_UNSPECIFIED)
    if a.error:
        pb.error = a.error
    if a.addr:
        pb.addr = a.addr
    if a.path_kind:
        pb.path_kind = a.path_kind
    v = a.value
    if isinstance(v, bool):  # not a kind of the API: keep it as text
        pb.string_value = str(v)
    elif isinstance(v, int):
        pb.int_value = v
    elif isinstance(v, str):
        pb.string_value = v
    elif isinstance(v, list):
        pb.string_list.values.extend(v)
    elif isinstance(v, SocketAddress):
        sa = pb.socket_address
        sa.family, sa.address, sa.port, sa.path, sa.raw = (
            v.family, v.address, v.port, v.path, v.raw
        )  # fmt: skip
    elif isinstance(v, OpenHow):
        pb.open_how.flags, pb.open_how.mode, pb.open_how.resolve = v.flags, v.mode, v.resolve
    elif isinstance(v, FlagSet):
        pb.flag_set.raw = v.raw & ((1 << 64) - 1)
        pb.flag_set.names.extend(v.names)


def _s64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def arg_from_pb(pb: types_pb2.EventArg) -> Arg:
    kind = pb.WhichOneof("typed")
    value: ArgValue
    if kind == "int_value":
        value = pb.int_value
    elif kind == "string_value":
        value = pb.string_value
    elif kind == "string_list":
        value = list(pb.string_list.values)
    elif kind == "socket_address":
        s = pb.socket_address
        value = SocketAddress(s.family, s.address, s.port, s.path, bytes(s.raw))
    elif kind == "open_how":
        value = OpenHow(pb.open_how.flags, pb.open_how.mode, pb.open_how.resolve)
    elif kind == "flag_set":
        value = FlagSet(_s64(pb.flag_set.raw), tuple(pb.flag_set.names))
    elif pb.status_code != types_pb2.ARG_STATUS_UNSPECIFIED:
        value = None  # a typed peer sent no value: nothing was captured
    else:
        # an agent older than the oneof: its value is Python's str() of the object
        value = None if pb.value in ("", "None") else pb.value
    status = pb.status
    if not status and pb.status_code:
        status = types_pb2.ArgStatus.Name(pb.status_code).removeprefix("ARG_STATUS_").lower()
    strategy = pb.strategy
    if not strategy and pb.strategy_code:
        name = types_pb2.Strategy.Name(pb.strategy_code)
        strategy = name.removeprefix("STRATEGY_").lower().replace("_", "-")
    return Arg(
        value=value,
        status=status or "ok",
        strategy=strategy,
        error=pb.error,
        addr=pb.addr if pb.addr else None,
        redacted=pb.redacted,
        path_kind=pb.path_kind,
    )


def event_to_pb(e: Event) -> types_pb2.Event:
    pb = types_pb2.Event(
        ts_ns=e.ts_ns,
        node=e.node,
        event_set=e.event_set,
        syscall=e.syscall,
        pid=e.pid,
        tid=e.tid,
        comm=e.comm,
        ret=e.ret,
        duration_ns=e.duration_ns,
        delivery_latency_ns=e.delivery_latency_ns,
        cgroup_id=e.cgroup_id,
        ppid=e.ppid,
        uid=e.uid,
        gid=e.gid,
        exe=e.exe,
        strategy=e.strategy,
        attribution=e.attribution,
        container_id=e.container_id,
        pod=e.pod,
        namespace=e.namespace,
        pod_uid=e.pod_uid,
        container=e.container,
    )
    if e.time_ns:
        pb.time.FromNanoseconds(e.time_ns)
    for name, a in e.args.items():
        _fill_arg(pb.args[name], a)
    return pb


def event_from_pb(pb: types_pb2.Event) -> Event:
    return Event(
        ts_ns=pb.ts_ns,
        event_set=pb.event_set,
        syscall=pb.syscall,
        pid=pb.pid,
        tid=pb.tid,
        comm=pb.comm,
        ret=pb.ret,
        args={k: arg_from_pb(pb.args[k]) for k in pb.args},
        time_ns=pb.time.ToNanoseconds() if pb.HasField("time") else 0,
        duration_ns=pb.duration_ns,
        delivery_latency_ns=pb.delivery_latency_ns,
        cgroup_id=pb.cgroup_id,
        strategy=pb.strategy,
        ppid=pb.ppid if pb.HasField("ppid") else None,
        uid=pb.uid if pb.HasField("uid") else None,
        gid=pb.gid if pb.HasField("gid") else None,
        exe=pb.exe if pb.HasField("exe") else None,
        node=pb.node,
        attribution=pb.attribution,
        container_id=pb.container_id,
        pod=pb.pod,
        namespace=pb.namespace,
        pod_uid=pb.pod_uid,
        container=pb.container,
    )


def filters_to_pb(f: Filters) -> types_pb2.Filters:
    w = f.workload
    return types_pb2.Filters(
        pids=f.pids,
        comms=f.comms,
        cgroup_ids=f.cgroup_ids,
        path_prefixes=f.path_prefixes,
        workload=types_pb2.WorkloadSelector(
            namespace=w.namespace, pod=w.pod, container=w.container, labels=w.labels
        ),
        follow=f.follow,
    )


def filters_from_pb(pb: types_pb2.Filters) -> Filters:
    """Not checked here: the receiver calls Filters.check() (controller: refuses the request;
    agent: the set's status says why)."""
    w = pb.workload
    if not (pb.pids or pb.comms or pb.cgroup_ids or pb.path_prefixes or pb.follow or w.namespace
            or w.pod or w.container or w.labels):  # fmt: skip
        return NO_FILTERS  # no filter at all, the usual case: the shared frozen value
    return Filters(
        pids=tuple(pb.pids),
        comms=tuple(pb.comms),
        cgroup_ids=tuple(pb.cgroup_ids),
        path_prefixes=tuple(pb.path_prefixes),
        workload=WorkloadSelector(
            namespace=w.namespace, pod=w.pod, container=w.container, labels=w.labels
        ),
        follow=pb.follow,
    )
