from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Filters(_message.Message):
    __slots__ = ("pids", "comms", "cgroup_ids", "path_prefixes")
    PIDS_FIELD_NUMBER: _ClassVar[int]
    COMMS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    pids: _containers.RepeatedScalarFieldContainer[int]
    comms: _containers.RepeatedScalarFieldContainer[str]
    cgroup_ids: _containers.RepeatedScalarFieldContainer[int]
    path_prefixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pids: _Optional[_Iterable[int]] = ..., comms: _Optional[_Iterable[str]] = ..., cgroup_ids: _Optional[_Iterable[int]] = ..., path_prefixes: _Optional[_Iterable[str]] = ...) -> None: ...

class EventSetSpec(_message.Message):
    __slots__ = ("name", "enabled", "filters", "sample_rate", "expires_at_unix_ns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    filters: Filters
    sample_rate: float
    expires_at_unix_ns: int
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., sample_rate: _Optional[float] = ..., expires_at_unix_ns: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("event_set", "events_by_syscall", "outcomes", "delivered", "dropped", "latency", "discarded")
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
    event_set: str
    events_by_syscall: _containers.ScalarMap[str, int]
    outcomes: _containers.RepeatedCompositeFieldContainer[OutcomeCount]
    delivered: int
    dropped: int
    latency: Histogram
    discarded: int
    def __init__(self, event_set: _Optional[str] = ..., events_by_syscall: _Optional[_Mapping[str, int]] = ..., outcomes: _Optional[_Iterable[_Union[OutcomeCount, _Mapping]]] = ..., delivered: _Optional[int] = ..., dropped: _Optional[int] = ..., latency: _Optional[_Union[Histogram, _Mapping]] = ..., discarded: _Optional[int] = ...) -> None: ...

class EventArg(_message.Message):
    __slots__ = ("value", "status", "strategy", "redacted")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REDACTED_FIELD_NUMBER: _ClassVar[int]
    value: str
    status: str
    strategy: str
    redacted: bool
    def __init__(self, value: _Optional[str] = ..., status: _Optional[str] = ..., strategy: _Optional[str] = ..., redacted: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("ts_ns", "node", "event_set", "syscall", "pid", "tid", "comm", "ret", "args")
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
    ts_ns: int
    node: str
    event_set: str
    syscall: str
    pid: int
    tid: int
    comm: str
    ret: int
    args: _containers.MessageMap[str, EventArg]
    def __init__(self, ts_ns: _Optional[int] = ..., node: _Optional[str] = ..., event_set: _Optional[str] = ..., syscall: _Optional[str] = ..., pid: _Optional[int] = ..., tid: _Optional[int] = ..., comm: _Optional[str] = ..., ret: _Optional[int] = ..., args: _Optional[_Mapping[str, EventArg]] = ...) -> None: ...
