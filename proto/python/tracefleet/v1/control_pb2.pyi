import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tracefleet.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_CONNECTED: _ClassVar[NodeState]
    NODE_STATE_DISCONNECTED: _ClassVar[NodeState]
    NODE_STATE_STALE: _ClassVar[NodeState]

class AckState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATE_UNSPECIFIED: _ClassVar[AckState]
    ACK_STATE_PENDING: _ClassVar[AckState]
    ACK_STATE_APPLIED: _ClassVar[AckState]
    ACK_STATE_NOT_CONNECTED: _ClassVar[AckState]
    ACK_STATE_UNKNOWN: _ClassVar[AckState]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_CONNECTED: NodeState
NODE_STATE_DISCONNECTED: NodeState
NODE_STATE_STALE: NodeState
ACK_STATE_UNSPECIFIED: AckState
ACK_STATE_PENDING: AckState
ACK_STATE_APPLIED: AckState
ACK_STATE_NOT_CONNECTED: AckState
ACK_STATE_UNKNOWN: AckState

class ConfigureEventSetRequest(_message.Message):
    __slots__ = ("event_set", "enabled", "selector", "ttl", "filters", "canary_percent", "sample_rate", "export")
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    event_set: str
    enabled: bool
    selector: str
    ttl: _duration_pb2.Duration
    filters: _types_pb2.Filters
    canary_percent: int
    sample_rate: float
    export: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_set: _Optional[str] = ..., enabled: _Optional[bool] = ..., selector: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., filters: _Optional[_Union[_types_pb2.Filters, _Mapping]] = ..., canary_percent: _Optional[int] = ..., sample_rate: _Optional[float] = ..., export: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigureEventSetResponse(_message.Message):
    __slots__ = ("generation", "changed", "matched_nodes", "selected_count", "expires_at")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MATCHED_NODES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    generation: int
    changed: bool
    matched_nodes: _containers.RepeatedScalarFieldContainer[str]
    selected_count: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, generation: _Optional[int] = ..., changed: _Optional[bool] = ..., matched_nodes: _Optional[_Iterable[str]] = ..., selected_count: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: str
    def __init__(self, selector: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "labels", "kernel_version", "agent_version", "strategies", "state", "applied_generation", "desired_generation", "pending", "last_seen", "statuses", "events_per_second", "faults_per_second", "drops_per_second", "totals", "batches_applied", "batches_duplicate", "batches_discarded", "user_events")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FAULTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DROPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    USER_EVENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    kernel_version: str
    agent_version: str
    strategies: _containers.RepeatedCompositeFieldContainer[_types_pb2.StrategyChoice]
    state: NodeState
    applied_generation: int
    desired_generation: int
    pending: bool
    last_seen: _timestamp_pb2.Timestamp
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetStatus]
    events_per_second: float
    faults_per_second: float
    drops_per_second: float
    totals: _containers.RepeatedCompositeFieldContainer[SetTotals]
    batches_applied: int
    batches_duplicate: int
    batches_discarded: int
    user_events: _types_pb2.UserEventsReport
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., kernel_version: _Optional[str] = ..., agent_version: _Optional[str] = ..., strategies: _Optional[_Iterable[_Union[_types_pb2.StrategyChoice, _Mapping]]] = ..., state: _Optional[_Union[NodeState, str]] = ..., applied_generation: _Optional[int] = ..., desired_generation: _Optional[int] = ..., pending: _Optional[bool] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.SetStatus, _Mapping]]] = ..., events_per_second: _Optional[float] = ..., faults_per_second: _Optional[float] = ..., drops_per_second: _Optional[float] = ..., totals: _Optional[_Iterable[_Union[SetTotals, _Mapping]]] = ..., batches_applied: _Optional[int] = ..., batches_duplicate: _Optional[int] = ..., batches_discarded: _Optional[int] = ..., user_events: _Optional[_Union[_types_pb2.UserEventsReport, _Mapping]] = ...) -> None: ...

class SetTotals(_message.Message):
    __slots__ = ("event_set", "delivered", "dropped", "discarded", "passed", "lost", "lost_inflight_full", "lost_inflight_stale", "lost_deleted", "prefix_filtered", "decode_errors", "kernel_missed_entry", "kernel_missed_exit")
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
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
    delivered: int
    dropped: int
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
    def __init__(self, event_set: _Optional[str] = ..., delivered: _Optional[int] = ..., dropped: _Optional[int] = ..., discarded: _Optional[int] = ..., passed: _Optional[int] = ..., lost: _Optional[int] = ..., lost_inflight_full: _Optional[int] = ..., lost_inflight_stale: _Optional[int] = ..., lost_deleted: _Optional[int] = ..., prefix_filtered: _Optional[int] = ..., decode_errors: _Optional[int] = ..., kernel_missed_entry: _Optional[int] = ..., kernel_missed_exit: _Optional[int] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("event_set", "enabled", "selector", "filters", "canary_percent", "sample_rate", "expires_at", "expired", "generation", "matched_nodes", "export")
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MATCHED_NODES_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    event_set: str
    enabled: bool
    selector: str
    filters: _types_pb2.Filters
    canary_percent: int
    sample_rate: float
    expires_at: _timestamp_pb2.Timestamp
    expired: bool
    generation: int
    matched_nodes: _containers.RepeatedScalarFieldContainer[str]
    export: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_set: _Optional[str] = ..., enabled: _Optional[bool] = ..., selector: _Optional[str] = ..., filters: _Optional[_Union[_types_pb2.Filters, _Mapping]] = ..., canary_percent: _Optional[int] = ..., sample_rate: _Optional[float] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expired: _Optional[bool] = ..., generation: _Optional[int] = ..., matched_nodes: _Optional[_Iterable[str]] = ..., export: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("generation", "nodes", "rules", "known_event_sets", "changes_refused")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    KNOWN_EVENT_SETS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    generation: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    known_event_sets: _containers.RepeatedScalarFieldContainer[str]
    changes_refused: str
    def __init__(self, generation: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., known_event_sets: _Optional[_Iterable[str]] = ..., changes_refused: _Optional[str] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("nodes", "event_sets", "pids", "sample_rate")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EVENT_SETS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    event_sets: _containers.RepeatedScalarFieldContainer[str]
    pids: _containers.RepeatedScalarFieldContainer[int]
    sample_rate: float
    def __init__(self, nodes: _Optional[_Iterable[str]] = ..., event_sets: _Optional[_Iterable[str]] = ..., pids: _Optional[_Iterable[int]] = ..., sample_rate: _Optional[float] = ...) -> None: ...

class StreamEventsResponse(_message.Message):
    __slots__ = ("event", "missed")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    event: _types_pb2.Event
    missed: int
    def __init__(self, event: _Optional[_Union[_types_pb2.Event, _Mapping]] = ..., missed: _Optional[int] = ...) -> None: ...

class GetTopRequest(_message.Message):
    __slots__ = ("node", "event_set", "limit")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    node: str
    event_set: str
    limit: int
    def __init__(self, node: _Optional[str] = ..., event_set: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class TopRow(_message.Message):
    __slots__ = ("node", "event_set", "syscall", "events_per_second")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    SYSCALL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    node: str
    event_set: str
    syscall: str
    events_per_second: float
    def __init__(self, node: _Optional[str] = ..., event_set: _Optional[str] = ..., syscall: _Optional[str] = ..., events_per_second: _Optional[float] = ...) -> None: ...

class SetSummary(_message.Message):
    __slots__ = ("event_set", "nodes", "events_per_second", "drops_per_second", "faults_per_second", "latency", "latency_p50_seconds", "latency_p99_seconds")
    EVENT_SET_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DROPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FAULTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    event_set: str
    nodes: int
    events_per_second: float
    drops_per_second: float
    faults_per_second: float
    latency: _types_pb2.Histogram
    latency_p50_seconds: float
    latency_p99_seconds: float
    def __init__(self, event_set: _Optional[str] = ..., nodes: _Optional[int] = ..., events_per_second: _Optional[float] = ..., drops_per_second: _Optional[float] = ..., faults_per_second: _Optional[float] = ..., latency: _Optional[_Union[_types_pb2.Histogram, _Mapping]] = ..., latency_p50_seconds: _Optional[float] = ..., latency_p99_seconds: _Optional[float] = ...) -> None: ...

class GetTopResponse(_message.Message):
    __slots__ = ("window", "rows", "sets")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    window: _duration_pb2.Duration
    rows: _containers.RepeatedCompositeFieldContainer[TopRow]
    sets: _containers.RepeatedCompositeFieldContainer[SetSummary]
    def __init__(self, window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[TopRow, _Mapping]]] = ..., sets: _Optional[_Iterable[_Union[SetSummary, _Mapping]]] = ...) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveNodeResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchAcksRequest(_message.Message):
    __slots__ = ("generation", "nodes")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, generation: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class NodeAck(_message.Message):
    __slots__ = ("name", "state", "applied_generation", "statuses")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: AckState
    applied_generation: int
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetStatus]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[AckState, str]] = ..., applied_generation: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.SetStatus, _Mapping]]] = ...) -> None: ...

class WatchAcksResponse(_message.Message):
    __slots__ = ("generation", "nodes", "applied_count", "pending_count", "not_connected_count", "unknown_count")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_COUNT_FIELD_NUMBER: _ClassVar[int]
    PENDING_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_CONNECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    generation: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeAck]
    applied_count: int
    pending_count: int
    not_connected_count: int
    unknown_count: int
    def __init__(self, generation: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeAck, _Mapping]]] = ..., applied_count: _Optional[int] = ..., pending_count: _Optional[int] = ..., not_connected_count: _Optional[int] = ..., unknown_count: _Optional[int] = ...) -> None: ...
