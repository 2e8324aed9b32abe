"""What BpfEngine's parts share: its options and the state of each event set (bpfengine.py
owns and changes them; the ring consumer and the accounting read them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracefleet.agent.capture import cdecode, fastring
from tracefleet.agent.capture.engine import Filters
from tracefleet.agent.capture.eventsets import EventSetSpec
from tracefleet.agent.capture.ladder import Attempt, LoadedSet
from tracefleet.agent.kernel.abi import Strategy


@dataclass
class SetState:
    """One event set in the engine: what it is, how it is loaded, and what was asked of it."""

    spec: EventSetSpec
    loaded: LoadedSet | None = None
    enabled: bool = False
    filters: Filters = field(default_factory=Filters)
    sample_rate: float = 0.0
    disabled_at: float = 0.0
    user_fallback: bool = False
    error: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    forced: Strategy | None = None
    # attachment epoch (tf_control.epoch), changed at each detach: per-thread slots taken
    # under an older one are free in the kernel, their calls counted lost by then
    epoch: int = 1


@dataclass
class EngineOptions:
    bpf_dir: Path | None = None
    ring_bytes: int = 8 << 20  # per event set: each loaded set has its own ring
    wakeup_bytes: int = 1 << 20  # batch: wake the consumer at 1 MiB queued, else poll timer
    poll_ms: int = 20
    hold_seconds: float = 30.0
    inflight_entries: int = 4096
    user_fallback: bool = True
    strategies: Mapping[str, Strategy] = field(default_factory=dict)  # forced, per set
    sample_buffer: int = 10000
    sets: tuple[str, ...] = ()  # event sets this engine offers (default: all)
    # tracefs not mounted: mount it in a mount namespace of this process rather than fail
    # (hostcheck.mount_tracefs_privately; the CLI turns it on, in-process users do not)
    mount_tracefs: bool = False
    # /healthz fails when the consumer's heartbeat (each poll, each record) is older than this
    stale_seconds: float = 30.0
    # the compiled ring consumer (fastring) unless TRACEFLEET_FASTRING=off; the Python one
    # where the library does not load (said once)
    compiled_consumer: bool = field(default_factory=lambda: fastring.requested())
    # the compiled decode (cdecode: batches of the compiled consumer decoded in C) unless
    # TRACEFLEET_DECODE=off; Python's decode where it does not load (said once)
    compiled_decode: bool = field(default_factory=lambda: cdecode.requested())
    # workload identity (workload.Attributor): events get container/pod fields, and
    # workload selectors resolve to cgroup ids; None: neither
    attributor: Any = None
    filter_entries: int = 65536  # cgroup ids / followed processes the kernel maps hold
    # executables whose path the kernel keeps (tf_exes, an LRU: ~300 bytes each)
    exe_entries: int = 4096
    # events per namespace for /metrics: off (0), else at most this many namespace label
    # values; events of namespaces beyond it count under "_other" (bounded cardinality)
    namespace_budget: int = 0
