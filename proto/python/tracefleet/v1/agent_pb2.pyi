import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from tracefleet.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("register", "ack", "result_batch", "node_report")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RESULT_BATCH_FIELD_NUMBER: _ClassVar[int]
    NODE_REPORT_FIELD_NUMBER: _ClassVar[int]
    register: Register
    ack: Ack
    result_batch: ResultBatch
    node_report: NodeReport
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., result_batch: _Optional[_Union[ResultBatch, _Mapping]] = ..., node_report: _Optional[_Union[NodeReport, _Mapping]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("desired_state", "sample_request", "heartbeat", "batch_ack")
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    BATCH_ACK_FIELD_NUMBER: _ClassVar[int]
    desired_state: DesiredState
    sample_request: SampleRequest
    heartbeat: Heartbeat
    batch_ack: BatchAck
    def __init__(self, desired_state: _Optional[_Union[DesiredState, _Mapping]] = ..., sample_request: _Optional[_Union[SampleRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., batch_ack: _Optional[_Union[BatchAck, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_name", "labels", "kernel_version", "agent_version", "capabilities", "capabilities_json", "event_sets", "applied_generation", "statuses", "instance_id", "ack_window")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_JSON_FIELD_NUMBER: _ClassVar[int]
    EVENT_SETS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_WINDOW_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    labels: _containers.ScalarMap[str, str]
    kernel_version: str
    agent_version: str
    capabilities: _containers.RepeatedCompositeFieldContainer[_types_pb2.StrategyChoice]
    capabilities_json: str
    event_sets: _containers.RepeatedScalarFieldContainer[str]
    applied_generation: int
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetStatus]
    instance_id: str
    ack_window: int
    def __init__(self, node_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., kernel_version: _Optional[str] = ..., agent_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[_Union[_types_pb2.StrategyChoice, _Mapping]]] = ..., capabilities_json: _Optional[str] = ..., event_sets: _Optional[_Iterable[str]] = ..., applied_generation: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.SetStatus, _Mapping]]] = ..., instance_id: _Optional[str] = ..., ack_window: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("generation", "statuses")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetStatus]
    def __init__(self, generation: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.SetStatus, _Mapping]]] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("interval_start_ns", "interval_end_ns", "sets", "events", "lost_intervals", "replayed", "instance_id", "seq")
    INTERVAL_START_NS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_END_NS_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOST_INTERVALS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    interval_start_ns: int
    interval_end_ns: int
    sets: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetAggregate]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    lost_intervals: int
    replayed: bool
    instance_id: str
    seq: int
    def __init__(self, interval_start_ns: _Optional[int] = ..., interval_end_ns: _Optional[int] = ..., sets: _Optional[_Iterable[_Union[_types_pb2.SetAggregate, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., lost_intervals: _Optional[int] = ..., replayed: _Optional[bool] = ..., instance_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("statuses", "user_events")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    USER_EVENTS_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.SetStatus]
    user_events: _types_pb2.UserEventsReport
    def __init__(self, statuses: _Optional[_Iterable[_Union[_types_pb2.SetStatus, _Mapping]]] = ..., user_events: _Optional[_Union[_types_pb2.UserEventsReport, _Mapping]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("generation", "event_sets", "redact_patterns", "idle_batch_interval")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EVENT_SETS_FIELD_NUMBER: _ClassVar[int]
    REDACT_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    IDLE_BATCH_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    generation: int
    event_sets: _containers.RepeatedCompositeFieldContainer[_types_pb2.EventSetSpec]
    redact_patterns: _containers.RepeatedScalarFieldContainer[str]
    idle_batch_interval: _duration_pb2.Duration
    def __init__(self, generation: _Optional[int] = ..., event_sets: _Optional[_Iterable[_Union[_types_pb2.EventSetSpec, _Mapping]]] = ..., redact_patterns: _Optional[_Iterable[str]] = ..., idle_batch_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("event_sets", "pids", "sample_rate", "max_events_per_interval", "lease")
    EVENT_SETS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_PER_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    event_sets: _containers.RepeatedScalarFieldContainer[str]
    pids: _containers.RepeatedScalarFieldContainer[int]
    sample_rate: float
    max_events_per_interval: int
    lease: _duration_pb2.Duration
    def __init__(self, event_sets: _Optional[_Iterable[str]] = ..., pids: _Optional[_Iterable[int]] = ..., sample_rate: _Optional[float] = ..., max_events_per_interval: _Optional[int] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("instance_id", "seq", "pace")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    seq: int
    pace: _duration_pb2.Duration
    def __init__(self, instance_id: _Optional[str] = ..., seq: _Optional[int] = ..., pace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...
