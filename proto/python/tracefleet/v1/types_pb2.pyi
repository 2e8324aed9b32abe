import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArgStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARG_STATUS_UNSPECIFIED: _ClassVar[ArgStatus]
    ARG_STATUS_OK: _ClassVar[ArgStatus]
    ARG_STATUS_RECOVERED: _ClassVar[ArgStatus]
    ARG_STATUS_LOST: _ClassVar[ArgStatus]
    ARG_STATUS_TRUNCATED: _ClassVar[ArgStatus]
    ARG_STATUS_TORN: _ClassVar[ArgStatus]
    ARG_STATUS_REREAD: _ClassVar[ArgStatus]
    ARG_STATUS_MISMATCH: _ClassVar[ArgStatus]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_SLEEPABLE: _ClassVar[Strategy]
    STRATEGY_FENTRY_SLEEPABLE: _ClassVar[Strategy]
    STRATEGY_EXIT_RETRY: _ClassVar[Strategy]
    STRATEGY_USER_FALLBACK: _ClassVar[Strategy]
    STRATEGY_NOFAULT: _ClassVar[Strategy]
    STRATEGY_FENTRY: _ClassVar[Strategy]
    STRATEGY_TRACEPOINT: _ClassVar[Strategy]
    STRATEGY_REGISTER: _ClassVar[Strategy]
    STRATEGY_KERNEL: _ClassVar[Strategy]
    STRATEGY_USER_SPACE: _ClassVar[Strategy]
    STRATEGY_SYNTHETIC: _ClassVar[Strategy]
ARG_STATUS_UNSPECIFIED: ArgStatus
ARG_STATUS_OK: ArgStatus
ARG_STATUS_RECOVERED: ArgStatus
ARG_STATUS_LOST: ArgStatus
ARG_STATUS_TRUNCATED: ArgStatus
ARG_STATUS_TORN: ArgStatus
ARG_STATUS_REREAD: ArgStatus
ARG_STATUS_MISMATCH: ArgStatus
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_SLEEPABLE: Strategy
STRATEGY_FENTRY_SLEEPABLE: Strategy
STRATEGY_EXIT_RETRY: Strategy
STRATEGY_USER_FALLBACK: Strategy
STRATEGY_NOFAULT: Strategy
STRATEGY_FENTRY: Strategy
STRATEGY_TRACEPOINT: Strategy
STRATEGY_REGISTER: Strategy
STRATEGY_KERNEL: Strategy
STRATEGY_USER_SPACE: Strategy
STRATEGY_SYNTHETIC: Strategy

class Filters(_message.Message):
    __slots__ = ("pids", "comms", "cgroup_ids", "path_prefixes", "workload", "follow")
    PIDS_FIELD_NUMBER: _ClassVar[int]
    COMMS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    pids: _containers.RepeatedScalarFieldContainer[int]
    comms: _containers.RepeatedScalarFieldContainer[str]
    cgroup_ids: _containers.RepeatedScalarFieldContainer[int]
    path_prefixes: _containers.RepeatedScalarFieldContainer[str]
    workload: WorkloadSelector
    follow: bool
    def __init__(self, pids: _Optional[_Iterable[int]] = ..., comms: _Optional[_Iterable[str]] = ..., cgroup_ids: _Optional[_Iterable[int]] = ..., path_prefixes: _Optional[_Iterable[str]] = ..., workload: _Optional[_Union[WorkloadSelector, _Mapping]] = ..., follow: _Optional[bool] = ...) -> None: ...

class WorkloadSelector(_message.Message):
    __slots__ = ("namespace", "pod", "container", "labels")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    container: str
    labels: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ..., container: _Optional[str] = ..., labels: _Optional[str] = ...) -> None: ...

class EventSetSpec(_message.Message):
    __slots__ = ("name", "enabled", "filters", "sample_rate", "expires_at_unix_ns", "export")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    filters: Filters
    sample_rate: float
    expires_at_unix_ns: int
    export: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., sample_rate: _Optional[float] = ..., expires_at_unix_ns: _Optional[int] = ..., export: _Optional[_Iterable[str]] = ...) -> None: ...

class SetStatus(_message.Message):
    __slots__ = ("name", "enabled", "attached", "strategy", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    attached: bool
    strategy: str
    error: str
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., attached: _Optional[bool] = ..., strategy: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class UserEventsReport(_message.Message):
    __slots__ = ("available", "reason", "events", "total")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    available: bool
    reason: str
    events: _containers.RepeatedCompositeFieldContainer[UserEventInfo]
    total: int
    def __init__(self, available: _Optional[bool] = ..., reason: _Optional[str] = ..., events: _Optional[_Iterable[_Union[UserEventInfo, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class UserEventInfo(_message.Message):
    __slots__ = ("name", "used_by", "attached")
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    used_by: _containers.RepeatedScalarFieldContainer[str]
    attached: bool
    def __init__(self, name: _Optional[str] = ..., used_by: _Optional[_Iterable[str]] = ..., attached: _Optional[bool] = ...) -> None: ...

class StrategyChoice(_message.Message):
    __slots__ = ("event_set", "strategy", "reason", "available")
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    event_set: str
    strategy: str
    reason: str
    available: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_set: _Optional[str] = ..., strategy: _Optional[str] = ..., reason: _Optional[str] = ..., available: _Optional[_Iterable[str]] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class OutcomeCount(_message.Message):
    __slots__ = ("strategy", "outcome", "count")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    outcome: str
    count: int
    def __init__(self, strategy: _Optional[str] = ..., outcome: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class SetAggregate(_message.Message):
    __slots__ = ("event_set", "events_by_syscall", "outcomes", "delivered", "dropped", "latency", "discarded", "passed", "lost", "lost_inflight_full", "lost_inflight_stale", "lost_deleted", "prefix_filtered", "decode_errors", "kernel_missed_entry", "kernel_missed_exit")
    class EventsBySyscallEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    EVENTS_BY_SYSCALL_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    LOST_INFLIGHT_FULL_FIELD_NUMBER: _ClassVar[int]
    LOST_INFLIGHT_STALE_FIELD_NUMBER: _ClassVar[int]
    LOST_DELETED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FILTERED_FIELD_NUMBER: _ClassVar[int]
    DECODE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_MISSED_ENTRY_FIELD_NUMBER: _ClassVar[int]
    KERNEL_MISSED_EXIT_FIELD_NUMBER: _ClassVar[int]
    event_set: str
    events_by_syscall: _containers.ScalarMap[str, int]
    outcomes: _containers.RepeatedCompositeFieldContainer[OutcomeCount]
    delivered: int
    dropped: int
    latency: Histogram
    discarded: int
    passed: int
    lost: int
    lost_inflight_full: int
    lost_inflight_stale: int
    lost_deleted: int
    prefix_filtered: int
    decode_errors: int
    kernel_missed_entry: int
    kernel_missed_exit: int
    def __init__(self, event_set: _Optional[str] = ..., events_by_syscall: _Optional[_Mapping[str, int]] = ..., outcomes: _Optional[_Iterable[_Union[OutcomeCount, _Mapping]]] = ..., delivered: _Optional[int] = ..., dropped: _Optional[int] = ..., latency: _Optional[_Union[Histogram, _Mapping]] = ..., discarded: _Optional[int] = ..., passed: _Optional[int] = ..., lost: _Optional[int] = ..., lost_inflight_full: _Optional[int] = ..., lost_inflight_stale: _Optional[int] = ..., lost_deleted: _Optional[int] = ..., prefix_filtered: _Optional[int] = ..., decode_errors: _Optional[int] = ..., kernel_missed_entry: _Optional[int] = ..., kernel_missed_exit: _Optional[int] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class SocketAddress(_message.Message):
    __slots__ = ("family", "address", "port", "path", "raw")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    family: str
    address: str
    port: int
    path: str
    raw: bytes
    def __init__(self, family: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., path: _Optional[str] = ..., raw: _Optional[bytes] = ...) -> None: ...

class OpenHow(_message.Message):
    __slots__ = ("flags", "mode", "resolve")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_FIELD_NUMBER: _ClassVar[int]
    flags: int
    mode: int
    resolve: int
    def __init__(self, flags: _Optional[int] = ..., mode: _Optional[int] = ..., resolve: _Optional[int] = ...) -> None: ...

class FlagSet(_message.Message):
    __slots__ = ("raw", "names")
    RAW_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    raw: int
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, raw: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class EventArg(_message.Message):
    __slots__ = ("value", "status", "strategy", "redacted", "status_code", "strategy_code", "error", "addr", "path_kind", "int_value", "string_value", "string_list", "socket_address", "open_how", "flag_set")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REDACTED_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PATH_KIND_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OPEN_HOW_FIELD_NUMBER: _ClassVar[int]
    FLAG_SET_FIELD_NUMBER: _ClassVar[int]
    value: str
    status: str
    strategy: str
    redacted: bool
    status_code: ArgStatus
    strategy_code: Strategy
    error: str
    addr: int
    path_kind: str
    int_value: int
    string_value: str
    string_list: StringList
    socket_address: SocketAddress
    open_how: OpenHow
    flag_set: FlagSet
    def __init__(self, value: _Optional[str] = ..., status: _Optional[str] = ..., strategy: _Optional[str] = ..., redacted: _Optional[bool] = ..., status_code: _Optional[_Union[ArgStatus, str]] = ..., strategy_code: _Optional[_Union[Strategy, str]] = ..., error: _Optional[str] = ..., addr: _Optional[int] = ..., path_kind: _Optional[str] = ..., int_value: _Optional[int] = ..., string_value: _Optional[str] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ..., socket_address: _Optional[_Union[SocketAddress, _Mapping]] = ..., open_how: _Optional[_Union[OpenHow, _Mapping]] = ..., flag_set: _Optional[_Union[FlagSet, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("ts_ns", "node", "event_set", "syscall", "pid", "tid", "comm", "ret", "args", "time", "duration_ns", "delivery_latency_ns", "cgroup_id", "ppid", "uid", "gid", "strategy", "attribution", "container_id", "pod", "namespace", "pod_uid", "container", "exe")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EventArg
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EventArg, _Mapping]] = ...) -> None: ...
    TS_NS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    SYSCALL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    RET_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_LATENCY_NS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    ts_ns: int
    node: str
    event_set: str
    syscall: str
    pid: int
    tid: int
    comm: str
    ret: int
    args: _containers.MessageMap[str, EventArg]
    time: _timestamp_pb2.Timestamp
    duration_ns: int
    delivery_latency_ns: int
    cgroup_id: int
    ppid: int
    uid: int
    gid: int
    strategy: str
    attribution: str
    container_id: str
    pod: str
    namespace: str
    pod_uid: str
    container: str
    exe: str
    def __init__(self, ts_ns: _Optional[int] = ..., node: _Optional[str] = ..., event_set: _Optional[str] = ..., syscall: _Optional[str] = ..., pid: _Optional[int] = ..., tid: _Optional[int] = ..., comm: _Optional[str] = ..., ret: _Optional[int] = ..., args: _Optional[_Mapping[str, EventArg]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ns: _Optional[int] = ..., delivery_latency_ns: _Optional[int] = ..., cgroup_id: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., strategy: _Optional[str] = ..., attribution: _Optional[str] = ..., container_id: _Optional[str] = ..., pod: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_uid: _Optional[str] = ..., container: _Optional[str] = ..., exe: _Optional[str] = ...) -> None: ...
