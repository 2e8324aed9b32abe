"""The agent's side of the controller stream (``tracefleet.v1.AgentService/Connect``).

``run_agent(engine, controller, node_name, labels, stop_event)`` dials the controller,
registers with the engine's capabilities, applies every DesiredState through
``engine.apply()`` and acks its generation with the per-set statuses, and sends the engine's
aggregates every interval (plus sampled events while the controller asks for them).

Failure behaviour:

* fail-static: while the controller is unreachable the engine keeps the last desired state;
* reconnect with exponential backoff and jitter; on reconnect the agent registers again with
  the generation it applied, and the controller answers with its current desired state
  (a state already applied is acked, not applied again);
* several controller addresses (replicas sharing etcd): the agent dials first the one at
  ``first_controller(node_name, count)`` (a hash of the node name, so a fleet spreads over the
  replicas and a restarted agent returns to the same one); when its stream fails, or the
  controller does not answer the registration within ``answer_timeout``, it moves to the
  next address in the list's order (round robin, same backoff) and registers there, and
  resends what was not acknowledged (replicas share the ledger in etcd: exactly once);
* every ResultBatch is numbered (``instance_id`` chosen at start, ``seq``) and kept in the
  outbox (``tracefleet.agent.control.outbox``) until the controller acknowledges it with a
  BatchAck, which it sends once the batch is durably applied; after a reconnect the batches
  not acknowledged are sent again and the controller ignores those it had already applied,
  so every batch is counted exactly once;
* the outbox is bounded (``buffer_budget`` batches, ``buffer_bytes`` serialized bytes); past
  that the oldest batches never sent are discarded, and their events are reported as
  ``discarded`` in the next batch kept, so counts stay conserved.

The engine is driven only through ``tracefleet.agent.capture.engine.CaptureEngine``.
``engine.capabilities()`` is read as a mapping with, optionally, ``kernel_version`` (or
``kernel``) and ``event_sets`` (or ``strategies``): ``{set: {"strategy", "reason",
"available"}}``; the whole mapping is also forwarded as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import grpc

from tracefleet.agent.capture.engine import (
    Aggregates,
    CaptureEngine,
    EventSetConfig,
    Filters,
    SetStatus,
)
from tracefleet.agent.control.outbox import Outbox
from tracefleet.agent.control.redact import Redactor
from tracefleet.agent.control.satoken import AgentTokenError, token_metadata
from tracefleet.model import Event, wire
from tracefleet.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("tracefleet.agent.controlclient")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # one connection per agent, even when many simulated agents share a process
    ("grpc.use_local_subchannel_pool", 1),
    # no bandwidth-delay probing (a PING each way per small message; see the controller's
    # SERVER_OPTIONS)
    ("grpc.http2.bdp_probe", 0),
]


@dataclass
class ClientOptions:
    interval: float = 1.0  # seconds between ResultBatches
    backoff_initial: float = 0.5  # seconds before the first reconnect attempt
    backoff_max: float = 30.0
    buffer_budget: int = 600  # batches kept unacknowledged (10 min of outage at 1 s)
    buffer_bytes: int = 32 << 20  # serialized bytes of those batches
    send_window: int = 32  # batches written and not acknowledged yet, at most
    # Run engine calls in a worker thread (a real engine may block in the kernel);
    # the load generator turns this off for its cheap synthetic engines.
    offload_engine_calls: bool = True
    agent_version: str = ""
    default_sample_limit: int = 100
    # TLS/mTLS to the controller (grpc.ssl_channel_credentials(...)); None = insecure.
    credentials: grpc.ChannelCredentials | None = None
    # mTLS from files (tracefleet.agent.control.tls.AgentTLS): read afresh for every new
    # channel, and the stream is re-established when the files change. Wins over credentials.
    tls: Any = None
    tls_check_interval: float = 10.0  # seconds between checks of the TLS files
    # Kubernetes ServiceAccount token file (tracefleet.agent.control.satoken): read for
    # every new connection and sent as 'authorization: Bearer' metadata of Connect, which a
    # controller in k8s-token mode checks for this node. "" = send none.
    token_file: str = ""
    # Fail-static: the last desired state applied (with TTL deadlines) is saved here and
    # re-applied at start while the controller is away. "" = none.
    state_file: str = ""
    # per-rule export: the agent's exporters (export.ExportHub), routed by each set's rule
    export_hub: Any = None
    # with several controller addresses: seconds a dialed controller has to answer the
    # Register before the agent moves on (a blackholed address never refuses the connection)
    answer_timeout: float = 20.0


@dataclass
class _Lease:
    event_sets: frozenset[str]
    pids: frozenset[int]
    rate: float
    limit: int
    until: float  # monotonic


@dataclass
class ClientStats:
    connects: int = 0  # streams that registered
    failovers: int = 0  # moves to the next controller address (several replicas given)
    applies: int = 0  # engine.apply() calls
    acks: int = 0
    batches_sent: int = 0  # writes, resends included
    batches_resent: int = 0  # written again after a reconnect (not acknowledged before)
    batches_acked: int = 0  # acknowledged by the controller (applied durably)
    batches_discarded: int = 0  # outbox over its budget: never sent
    events_discarded: int = 0  # delivered + dropped events of those batches
    events_sent: int = 0  # sampled events written
    ticks: int = 0  # collection intervals passed
    idle_ticks: int = 0  # of those, skipped while idle (DesiredState.idle_batch_interval)
    paced_ticks: int = 0  # of those, skipped at the controller's pace (BatchAck.pace)


def first_controller(node_name: str, count: int) -> int:
    """Index of the controller address a node dials first. A hash of the name, not the
    first address: every agent given the same list would load one replica with the whole
    fleet. sha256, not hash(): the same node picks the same replica in every process."""
    digest = hashlib.sha256(node_name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _agent_version() -> str:
    try:
        return metadata.version("tracefleet-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ControlClient:
    def __init__(
        self,
        engine: CaptureEngine,
        controller: str | Sequence[str],
        node_name: str,
        labels: Mapping[str, str] | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        if not node_name:
            raise ValueError("node_name must not be empty")
        self.engine = engine
        # every replica's address; self.controller is the one dialed now
        self.controllers = (controller,) if isinstance(controller, str) else tuple(controller)
        if not self.controllers:
            raise ValueError("no controller address")
        self.controller = self.controllers[first_controller(node_name, len(self.controllers))]
        self.node_name = node_name
        self.labels = dict(labels or {})
        self.options = options or ClientOptions()
        self.stats = ClientStats()
        self.desired: dict[str, EventSetConfig] | None = None  # last desired state received
        self.applied_generation = 0
        self.statuses: list[SetStatus] = []
        self.connected = False
        self._applied: dict[str, EventSetConfig] | None = None  # what engine.apply() got
        self._lease: _Lease | None = None
        # one incarnation of this agent: names the sequence numbers of its batches
        self.instance_id = secrets.token_hex(8)
        self._outbox = Outbox(
            self.instance_id,
            self.options.buffer_budget,
            self.options.buffer_bytes,
            self.options.send_window,
        )
        self._wake = asyncio.Event()
        self._engine_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._synced = False
        self._answered = False  # per stream: the controller sent something
        # per stream: the controller acknowledges batches (it sent a BatchAck before its
        # first DesiredState); a controller that never does gets at-most-once delivery
        self._acks_seen = False
        self._legacy_controller = False
        self._redactor = Redactor()
        # unix seconds at which an enabled set's rule expires (from the controller): enforced
        # here too, so a state re-applied while the controller is away ends on time
        self._deadlines: dict[str, float] = {}
        self._deadlines_set = asyncio.Event()  # _deadlines replaced: the loop looks again
        self._hub_attached = False
        # DesiredState.idle_batch_interval: batches this far apart while nothing is enabled
        # (0: every interval); a fleet of idle agents then costs the controller less
        self._idle_interval = 0.0
        # BatchAck.pace: batches this far apart while no sampling lease is out (0: every
        # interval); a large fleet then costs its controller a bounded rate of batches
        self._pace = 0.0
        # resolved when the gap between batches may have shortened (a set enabled, a lease,
        # a faster pace): the collection loop, asleep through ticks with nothing to do,
        # looks again
        self._regap: asyncio.Future[bool] | None = None
        # NodeReport: the user_events the engine found (None: it does not look), and what
        # was last written on this stream (a report goes out only when it differs)
        self._user_events: Mapping[str, Any] | None = None
        self._report_sent: bytes | None = None
        self._reporting = False  # the engine has something to report (else: no NodeReport)
        self._export_missing: dict[str, list[str]] = {}
        self._export_have = "none"

    # public ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: collect every interval, keep a stream to the
        controller."""
        await self._restore_state()
        collector = asyncio.create_task(self._collect_loop(stop))
        deadlines = asyncio.create_task(self._deadline_loop(stop))
        try:
            await self._connect_loop(stop)
        finally:
            for t in (collector, deadlines):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    # fail-static ------------------------------------------------------------------------

    def _save_state(self, generation: int) -> None:
        path = self.options.state_file
        if not path or self.desired is None:
            return
        state = {
            "version": 1,
            "node": self.node_name,
            "controller": ",".join(self.controllers),
            "generation": generation,
            "saved_at": time.time(),
            "redact_patterns": list(self._redactor.patterns),
            "event_sets": [
                _set_state(c, self._deadlines.get(name, 0.0))
                for name, c in sorted(self.desired.items())
            ],
        }
        tmp = f"{path}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("%s: cannot save the applied state to %s: %s (fail-static off until "
                        "it can)", self.node_name, path, e)  # fmt: skip

    async def _restore_state(self) -> None:
        """Re-apply the state saved by the previous run (same node and controller), minus
        what expired, while the controller is away; the controller's state replaces it."""
        path = self.options.state_file
        if not path:
            return
        try:
            with open(path) as f:
                state = json.load(f)
            if state.get("node") != self.node_name or state.get("controller") != ",".join(
                self.controllers
            ):
                return
            now = time.time()
            desired, deadlines = {}, {}
            for s in state["event_sets"]:
                cfg = EventSetConfig(
                    name=str(s["name"]),
                    enabled=bool(s["enabled"]),
                    filters=Filters.from_json(s["filters"]),
                    sample_rate=float(s["sample_rate"]),
                    export=tuple(str(n) for n in s.get("export", ())),
                )
                expires = float(s.get("expires_at") or 0.0)
                if cfg.enabled and expires:
                    if expires <= now:
                        cfg = dataclasses.replace(cfg, enabled=False)
                    else:
                        deadlines[cfg.name] = expires
                desired[cfg.name] = cfg
            redactor = Redactor(state.get("redact_patterns") or ())
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: ignoring the saved state %s: %s", self.node_name, path, e)
            return
        if self.desired is not None:
            return  # the controller answered first
        self.desired, self._deadlines, self._redactor = desired, deadlines, redactor
        self._deadlines_set.set()
        await self._reconcile()
        on = [f"{n}" + (f" until {time.strftime('%H:%M:%S', time.localtime(deadlines[n]))}"
                        if n in deadlines else "")
              for n, c in sorted(desired.items()) if c.enabled]  # fmt: skip
        log.info(
            "%s: controller away: re-applied the saved state of generation %s from %s "
            "(enabled: %s)", self.node_name, state.get("generation"), path,
            ", ".join(on) or "none",
        )  # fmt: skip

    async def _deadline_loop(self, stop: asyncio.Event) -> None:
        """Checks the TTL deadlines every second while there are any; sleeps until a desired
        state brings some otherwise (run() cancels this task when it stops): an agent
        without a TTL rule does not wake every second for nothing."""
        while not stop.is_set():
            if not self._deadlines:
                self._deadlines_set.clear()
                await self._deadlines_set.wait()
                continue
            await asyncio.sleep(1.0)
            now = time.time()
            due = [n for n, t in self._deadlines.items() if t <= now]
            if not due or self.desired is None:
                continue
            for name in due:
                del self._deadlines[name]
                cfg = self.desired.get(name)
                if cfg is not None and cfg.enabled:
                    self.desired[name] = dataclasses.replace(cfg, enabled=False)
            log.info("%s: TTL of %s ran out: switched off here", self.node_name,
                        ", ".join(due))  # fmt: skip
            await self._reconcile()
            self._save_state(self.applied_generation)

    # engine -----------------------------------------------------------------------------

    async def _engine(self, fn: Callable[..., T], *args: Any, exclusive: bool = True) -> T:
        """Run an engine call. Reads (collect, samples) are not ``exclusive``: they must not
        wait behind an apply() that loads an event set (the verifier: seconds), or the
        controller would hear nothing and call this agent stale meanwhile."""
        if not exclusive and self.options.offload_engine_calls:
            return await asyncio.to_thread(fn, *args)
        async with self._engine_lock:
            if self.options.offload_engine_calls:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)

    def _effective(self) -> dict[str, EventSetConfig]:
        """The desired state plus the sampling lease (which raises sample_rate only)."""
        desired = dict(self.desired or {})
        lease = self._lease
        if lease is None:
            return desired
        for name, cfg in desired.items():
            if cfg.enabled and (not lease.event_sets or name in lease.event_sets):
                desired[name] = dataclasses.replace(
                    cfg, sample_rate=max(cfg.sample_rate, lease.rate)
                )
        return desired

    async def _reconcile(self) -> None:
        if self.desired is None:
            return  # nothing from a controller yet: leave the engine as it is
        effective = self._effective()
        if effective == self._applied:
            return
        try:
            statuses = await self._engine(self.engine.apply, effective)
        except Exception as e:  # the protocol says apply() never raises; report it if it does
            log.exception("%s: engine.apply() raised", self.node_name)
            self._applied = None  # retry on the next desired state or lease change
            self.statuses = [
                SetStatus(name, cfg.enabled, False, "", f"apply failed: {e}")
                for name, cfg in sorted(effective.items())
            ]
            return
        self.stats.applies += 1
        self._applied = effective
        self.statuses = self._route_exports(effective, list(statuses))

    def _route_exports(
        self, effective: Mapping[str, EventSetConfig], statuses: list[SetStatus]
    ) -> list[SetStatus]:
        """Send each enabled set's events to the exporters its rule names; a name this agent
        lacks is reported in the set's status (error), never ignored in silence."""
        hub = self.options.export_hub
        routes = {n: c.export for n, c in effective.items() if c.enabled}
        if hub is not None:
            missing = hub.set_routes(routes)
            have = ", ".join(sorted(hub.exporters)) or "none"
            # a sink makes the engine decode every record: attached only while exporting
            if hub.active != self._hub_attached:
                if hub.active:
                    self.engine.add_sink(hub)
                else:
                    self.engine.remove_sink(hub)
                self._hub_attached = hub.active
        else:
            missing = {n: list(e) for n, e in routes.items() if e}
            have = "none"
        self._export_missing, self._export_have = dict(missing), have
        return [self._export_error(st) for st in statuses]

    def _export_error(self, st: SetStatus) -> SetStatus:
        names = self._export_missing.get(st.name)
        if not names:
            return st
        why = (f"export: no exporter named {', '.join(names)} on this agent "
               f"(it has: {self._export_have}; configure one with tracefleet-agent run "
               "--exporter NAME=file:/PATH)")  # fmt: skip
        return dataclasses.replace(st, error=f"{st.error}; {why}" if st.error else why)

    # node report ------------------------------------------------------------------------

    async def _refresh_report(self) -> None:
        """Take the statuses that changed in the engine since apply() (a user_event that
        registered after its rule, now attached) and the user_events registered here; the
        send loop writes a NodeReport when they differ from the last one."""
        # an engine without user_events (None) has no node report: nothing more to take
        report = await self._engine(self.engine.user_events_report, exclusive=False)
        self._reporting = report is not None
        if not self._reporting:
            return
        if not self._engine_lock.locked():
            # under the engine lock: never older than what a concurrent apply() returns
            updates = await self._engine(self.engine.status_updates)
            if updates:
                by_name = {u.name: self._export_error(u) for u in updates}
                self.statuses = [by_name.pop(st.name, st) for st in self.statuses]
                self.statuses += by_name.values()
        self._user_events = report
        self._wake.set()

    def _node_report(self) -> agent_pb2.NodeReport:
        msg = agent_pb2.NodeReport(statuses=[_status_pb(s) for s in self.statuses])
        ue = self._user_events
        if ue is not None:
            rep = msg.user_events
            rep.available = bool(ue.get("available"))
            rep.reason = str(ue.get("reason") or "")
            rep.total = int(ue.get("total") or 0)
            for e in ue.get("events") or ():
                rep.events.add(name=str(e["name"]), used_by=[str(u) for u in e["used_by"]],
                               attached=bool(e["attached"]))  # fmt: skip
        return msg

    async def _send_report(self, call: Any) -> None:
        if not self._synced or not self._reporting:
            return  # the first Ack carries the statuses; the report follows it
        msg = self._node_report()
        data = msg.SerializeToString(deterministic=True)
        if data != self._report_sent:
            await self._write(call, agent_pb2.AgentMessage(node_report=msg))
            self._report_sent = data

    # connection -------------------------------------------------------------------------

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            self._synced = False
            tls = self.options.tls
            try:
                creds = tls.credentials() if tls is not None else self.options.credentials
            except Exception as e:  # files missing mid-rotation: retry with backoff
                log.warning("%s: TLS credentials: %s", self.node_name, e)
                creds, attempt = None, attempt + 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.options.backoff_initial)
                continue
            metadata: tuple[tuple[str, str], ...] = ()
            if self.options.token_file:
                try:
                    metadata = token_metadata(self.options.token_file)
                except AgentTokenError as e:  # mid-rotation or not mounted: retry
                    log.warning("%s: %s", self.node_name, e)
                    attempt += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.options.backoff_initial)
                    continue
            extra = tls.channel_options() if tls is not None else []
            channel = (
                grpc.aio.secure_channel(self.controller, creds, options=CHANNEL_OPTIONS + extra)
                if creds is not None
                else grpc.aio.insecure_channel(self.controller, options=CHANNEL_OPTIONS)
            )
            try:
                await self._session(channel, stop, metadata)
            except grpc.aio.AioRpcError as e:
                log.log(
                    logging.INFO if attempt else logging.WARNING,
                    "%s: controller %s: %s %s",
                    self.node_name,
                    self.controller,
                    e.code().name,
                    e.details(),
                )
            except TimeoutError as e:  # _answer_watch
                log.warning("%s: %s", self.node_name, e)
            except Exception:
                log.exception("%s: controller stream failed", self.node_name)
            finally:
                self.connected = False
                await channel.close(grace=None)
            if stop.is_set():
                break
            attempt = 0 if self._synced else attempt + 1
            if len(self.controllers) > 1:  # the next replica; backoff as below
                i = (self.controllers.index(self.controller) + 1) % len(self.controllers)
                self.stats.failovers += 1
                log.warning("%s: moving to the next controller %s", self.node_name,
                            self.controllers[i])  # fmt: skip
                self.controller = self.controllers[i]
            ceiling = min(self.options.backoff_max, self.options.backoff_initial * 2**attempt)
            delay = ceiling * random.uniform(0.5, 1.0)  # jitter spreads a fleet's reconnects
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _session(
        self,
        channel: grpc.aio.Channel,
        stop: asyncio.Event,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(metadata=metadata or None)
        self._acks_seen = self._legacy_controller = self._answered = False
        self._report_sent = None  # a new stream (maybe a new controller): report again
        await call.write(agent_pb2.AgentMessage(register=self._register_message()))
        self.connected = True
        self.stats.connects += 1
        tasks = {
            asyncio.create_task(self._read_loop(call)),
            asyncio.create_task(self._send_loop(call)),
            asyncio.create_task(stop.wait()),
        }
        if self.options.tls is not None:
            tasks.add(asyncio.create_task(self._tls_watch()))
        if len(self.controllers) > 1:
            tasks.add(asyncio.create_task(self._answer_watch()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await t
            call.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _answer_watch(self) -> None:
        """Fail the session if the controller did not answer the Register in time, so that
        an agent given several replicas moves on from one that accepts and never answers."""
        await asyncio.sleep(self.options.answer_timeout)
        if not self._answered:
            raise TimeoutError(f"controller {self.controller} did not answer the registration "
                               f"within {self.options.answer_timeout:g}s")  # fmt: skip
        # answered: wait until the session ends (it cancels this task); returning would
        # complete the session's first task and end a healthy stream
        await asyncio.Event().wait()

    async def _tls_watch(self) -> None:
        """Return (ending the session, so the client reconnects with the new files) once the
        TLS files changed on disk."""
        while True:
            await asyncio.sleep(self.options.tls_check_interval)
            if self.options.tls.changed():
                log.info("%s: TLS files changed; reconnecting with them", self.node_name)
                return

    async def _write(self, call: Any, msg: agent_pb2.AgentMessage) -> None:
        async with self._write_lock:
            await call.write(msg)

    async def _read_loop(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                log.info("%s: controller closed the stream", self.node_name)
                return
            self._answered = True
            kind = msg.WhichOneof("kind")
            if kind == "desired_state":
                if not self._acks_seen and not self._legacy_controller:
                    log.warning(
                        "%s: controller %s does not acknowledge result batches (an older "
                        "version): a batch written when the stream breaks may be lost",
                        self.node_name,
                        self.controller,
                    )
                    self._legacy_controller = True
                    self._outbox.ack(self.instance_id, self._outbox.written)
                    self._wake.set()
                await self._on_desired(call, msg.desired_state)
            elif kind == "sample_request":
                await self._on_sample(msg.sample_request)
            elif kind == "batch_ack":
                self._on_batch_ack(msg.batch_ack)

    def _on_batch_ack(self, ack: agent_pb2.BatchAck) -> None:
        self._acks_seen = True
        pace = ack.pace.ToNanoseconds() / 1e9 if ack.HasField("pace") else 0.0
        if pace < self._pace:
            self._gap_may_shorten()
        self._pace = pace
        n = self._outbox.ack(ack.instance_id, ack.seq)
        if n:
            self.stats.batches_acked += n
            self._wake.set()  # the window has room again

    async def _on_desired(self, call: Any, ds: agent_pb2.DesiredState) -> None:
        if ds.generation < self.applied_generation:
            log.warning(
                "%s: controller sent generation %d < applied %d; applying it anyway",
                self.node_name,
                ds.generation,
                self.applied_generation,
            )
        d = _desired_of(ds)
        self.desired = dict(d.sets)  # this agent's own: a TTL switches a set off in it
        self._deadlines = dict(d.deadlines)
        if self._deadlines:  # none: the deadline loop has nothing to look at again
            self._deadlines_set.set()
        self._idle_interval = d.idle_interval
        if d.redact_patterns != self._redactor.patterns:
            self._redactor = Redactor(d.redact_patterns)
            for err in self._redactor.errors:
                log.error("%s: bad redaction pattern %s: redacting every string argument",
                          self.node_name, err)  # fmt: skip
        await self._reconcile()
        if not self._synced:
            log.info("%s: registered with the controller %s: applied generation %d",
                        self.node_name, self.controller, ds.generation)  # fmt: skip
        self.applied_generation = ds.generation
        self._save_state(ds.generation)
        await self._write(call, _ack_message(ds.generation, self.statuses))
        self.stats.acks += 1
        self._synced = True
        self._gap_may_shorten()

    async def _on_sample(self, req: agent_pb2.SampleRequest) -> None:
        seconds = req.lease.ToTimedelta().total_seconds()
        if seconds <= 0:
            self._lease = None
        else:
            self._lease = _Lease(
                frozenset(req.event_sets),
                frozenset(req.pids),
                req.sample_rate if req.sample_rate > 0 else 1.0,
                req.max_events_per_interval or self.options.default_sample_limit,
                time.monotonic() + seconds,
            )
        await self._reconcile()
        self._gap_may_shorten()

    async def _send_loop(self, call: Any) -> None:
        """Write the outbox's batches in seq order, at most send_window ahead of the
        acknowledgements; from the oldest one not acknowledged on every new stream."""
        cursor = 0  # last seq written on this stream
        while True:
            self._wake.clear()
            await self._send_report(call)
            while (batch := self._outbox.next_to_send(cursor)) is not None:
                cursor = batch.seq
                msg = agent_pb2.AgentMessage(result_batch=batch)
                if self._outbox.mark_written(batch.seq):
                    msg.result_batch.replayed = True  # a copy: the kept batch is unchanged
                    self.stats.batches_resent += 1
                await self._write(call, msg)
                self.stats.batches_sent += 1
                self.stats.events_sent += len(batch.events)
                if self._legacy_controller:  # nothing will acknowledge it: written is done
                    self.stats.batches_acked += self._outbox.ack(self.instance_id, batch.seq)
            await self._wake.wait()

    def _register_message(self) -> agent_pb2.Register:
        caps: Mapping[str, Any] = {}
        try:
            caps = self.engine.capabilities()
        except Exception:
            log.exception("%s: engine.capabilities() failed", self.node_name)
        return agent_pb2.Register(
            node_name=self.node_name,
            labels=self.labels,
            kernel_version=str(
                caps.get("kernel_version") or caps.get("kernel") or platform.release()
            ),
            agent_version=self.options.agent_version or _agent_version(),
            capabilities=_strategies(caps),
            capabilities_json=json.dumps(caps, sort_keys=True, default=str),
            event_sets=list(self.engine.event_sets()),
            applied_generation=self.applied_generation,
            statuses=[_status_pb(s) for s in self.statuses],
            instance_id=self.instance_id,
            ack_window=self._outbox.window,
        )

    # collection -------------------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing to report but liveness: no set enabled, no sampling lease."""
        return self._lease is None and not any(c.enabled for c in (self.desired or {}).values())

    def _gap(self) -> float:
        """Seconds between batches: the controller's idle gap, or its pace while sets are
        on; every interval (0) under a sampling lease (someone follows)."""
        if self._idle():
            return self._idle_interval
        return 0.0 if self._lease else self._pace

    def _count_skipped(self, n: int, idle: bool) -> None:
        if idle:
            self.stats.idle_ticks += n
        else:
            self.stats.paced_ticks += n

    def _gap_may_shorten(self) -> None:
        if self._regap is not None and not self._regap.done():
            self._regap.set_result(True)

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if woken early by _gap_may_shorten()."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._regap = fut
        timer = loop.call_later(delay, _resolve, fut, False)
        try:
            await fut
        finally:
            self._regap = None
        timer.cancel()
        return fut.result()

    async def _collect_loop(self, stop: asyncio.Event) -> None:
        interval = self.options.interval
        next_t = last = time.monotonic()
        while not stop.is_set():
            next_t += interval
            # Ticks before the next batch is due do nothing but wake up when there is no
            # node report to refresh (this engine has none): sleep through them, one wakeup
            # instead of one per interval (10,000 simulated agents on one CPU spent most
            # of an idle fleet's CPU waking up), unless the gap shortens meanwhile.
            skip, idle = 0, self._idle()  # what the ticks slept through are counted as
            if self.stats.ticks and not self._reporting:
                skip = max(0, math.ceil((last + self._gap() - interval / 2 - next_t) / interval))
            delay = next_t + skip * interval - time.monotonic()
            if delay < 0:  # fell behind (suspended?): skip ahead rather than burst
                next_t = time.monotonic()
                delay, skip = 0, 0
            # not a wait on ``stop`` (a task and a cancellation every tick, per agent):
            # run() cancels this task when it stops
            early = await self._sleep(delay)
            if stop.is_set():
                return
            if early:
                # the gap changed: count the ticks slept through so far, then sleep on to the
                # next tick of this agent's grid with the new gap (never a tick now: a change
                # reaches every agent at once, and their batches would follow it together)
                passed = min(skip, max(0, math.floor((time.monotonic() - next_t) / interval) + 1))
                self.stats.ticks += passed
                self._count_skipped(passed, idle)
                next_t += (passed - 1) * interval
                continue
            if skip:  # the ticks slept through
                self.stats.ticks += skip
                self._count_skipped(skip, idle)
                next_t += skip * interval
            self.stats.ticks += 1
            try:  # also while idle: a registration is news even with nothing enabled
                await self._refresh_report()
            except Exception:
                log.exception("%s: refreshing the node report failed", self.node_name)
            # skip ticks (the next batch covers them) up to the gap
            if time.monotonic() - last < self._gap() - interval / 2:
                self._count_skipped(1, self._idle())
                continue
            last = time.monotonic()
            try:
                await self._collect_once()
            except Exception:
                log.exception("%s: collecting aggregates failed", self.node_name)

    async def _collect_once(self) -> None:
        if self._lease is not None and self._lease.until <= time.monotonic():
            self._lease = None
            await self._reconcile()
        agg = await self._engine(self.engine.collect, exclusive=False)
        events: list[dict[str, Any]] = []
        lease = self._lease
        configured = any(c.enabled and c.sample_rate > 0 for c in (self.desired or {}).values())
        if lease is not None or configured:
            limit = lease.limit if lease is not None else self.options.default_sample_limit
            events = await self._engine(self.engine.sample_events, limit, exclusive=False)
            if lease is not None and not configured:
                events = [
                    e
                    for e in events
                    if (not lease.pids or e.get("pid") in lease.pids)
                    and (not lease.event_sets or e.get("event_set") in lease.event_sets)
                ]
        if self._redactor and events:  # before anything leaves the node
            events = [dict(self._redactor.event(e)) for e in events]
        self._enqueue(_batch_pb(agg, events, replayed=not self.connected))

    def _enqueue(self, batch: agent_pb2.ResultBatch) -> None:
        before = self._outbox.discarded_batches
        self._outbox.add(batch)
        if self._outbox.discarded_batches != before:
            if not before:
                log.warning(
                    "%s: outbox over its budget (%d batches, %d bytes): discarding the oldest "
                    "batches not sent yet; their events are reported as discarded",
                    self.node_name,
                    self._outbox.max_batches,
                    self._outbox.max_bytes,
                )
            self.stats.batches_discarded = self._outbox.discarded_batches
            self.stats.events_discarded = self._outbox.discarded_events
        self._wake.set()

    def outbox_state(self) -> tuple[int, int]:
        """(batches, serialized bytes) kept and not acknowledged yet."""
        return len(self._outbox), self._outbox.bytes


# conversions -----------------------------------------------------------------------------


def _strategies(caps: Mapping[str, Any]) -> list[types_pb2.StrategyChoice]:
    per_set = caps.get("event_sets", caps.get("strategies", {}))
    items: list[tuple[str, Any]] = []
    if isinstance(per_set, Mapping):
        items = list(per_set.items())
    elif isinstance(per_set, Sequence) and not isinstance(per_set, str):
        items = [
            (str(x.get("event_set", x.get("name", ""))), x)
            for x in per_set
            if isinstance(x, Mapping)
        ]
    out = []
    for name, info in items:
        if isinstance(info, Mapping):
            available = info.get("available")
            if available is None:  # BpfEngine reports its ladder: [{strategy, ok, ...}]
                available = [
                    a.get("strategy")
                    for a in info.get("attempts") or ()
                    if isinstance(a, Mapping) and a.get("ok")
                ]
            out.append(
                types_pb2.StrategyChoice(
                    event_set=str(name),
                    strategy=str(info.get("strategy") or ""),
                    reason=str(info.get("reason") or info.get("error") or ""),
                    available=[str(a) for a in available or () if a],
                )
            )
        elif isinstance(info, str):
            out.append(types_pb2.StrategyChoice(event_set=str(name), strategy=info))
    return out


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _status_pb(s: SetStatus) -> types_pb2.SetStatus:
    return types_pb2.SetStatus(
        name=s.name, enabled=s.enabled, attached=s.attached, strategy=s.strategy, error=s.error
    )


def _event_pb(e: Mapping[str, Any]) -> types_pb2.Event:
    # the agent's event dict is tracefleet.model's JSON shape: one conversion to the wire
    return wire.event_to_pb(Event.from_json(e))


def _batch_pb(
    agg: Aggregates, events: Sequence[Mapping[str, Any]], replayed: bool
) -> agent_pb2.ResultBatch:
    batch = agent_pb2.ResultBatch(
        interval_start_ns=agg.interval_start_ns,
        interval_end_ns=agg.interval_end_ns,
        replayed=replayed,
    )
    for name, s in sorted(agg.sets.items()):
        out = batch.sets.add(
            event_set=name,
            delivered=s.delivered,
            dropped=s.dropped,
            passed=s.passed,
            lost=s.lost,
            lost_inflight_full=s.lost_inflight_full,
            lost_inflight_stale=s.lost_inflight_stale,
            lost_deleted=s.lost_deleted,
            prefix_filtered=s.prefix_filtered,
            decode_errors=s.decode_errors,
            kernel_missed_entry=s.kernel_missed_entry,
            kernel_missed_exit=s.kernel_missed_exit,
            latency=types_pb2.Histogram(
                bounds=s.latency.bounds, counts=s.latency.counts, sum=s.latency.sum
            ),
        )
        out.events_by_syscall.update(s.events_by_syscall)
        for (strategy, outcome), count in sorted(s.outcomes.items()):
            out.outcomes.add(strategy=strategy, outcome=outcome, count=count)
    batch.events.extend(_event_pb(e) for e in events)
    return batch


# What a DesiredState says, and the Ack of a generation with given statuses, made once per
# process for every client that gets the same message: the load generator's simulated agents
# (1,000 in one process) receive a change's message byte for byte alike, and decoding it into
# configs and building the Ack per agent was a fifth of a change's CPU there. A real agent (one
# client) keeps one entry of each. The entries are read only: a client copies what it changes.
_MEMO_MAX = 16


@dataclass(frozen=True)
class _Desired:
    sets: Mapping[str, EventSetConfig]
    deadlines: Mapping[str, float]  # unix seconds at which an enabled set's rule expires
    idle_interval: float
    redact_patterns: tuple[str, ...]


_DESIRED: dict[bytes, _Desired] = {}
_ACKS: dict[tuple[int, tuple[SetStatus, ...]], agent_pb2.AgentMessage] = {}


def _memo(table: dict[K, V], key: K, make: Callable[[], V]) -> V:
    """``table[key]``, made on first use; a full table starts over (a few changes live)."""
    hit = table.get(key)
    if hit is None:
        if len(table) >= _MEMO_MAX:
            table.clear()
        hit = table[key] = make()
    return hit


def _desired_of(ds: agent_pb2.DesiredState) -> _Desired:
    return _memo(_DESIRED, ds.SerializeToString(), lambda: _decode_desired(ds))


def _decode_desired(ds: agent_pb2.DesiredState) -> _Desired:
    return _Desired(
        sets={
            s.name: EventSetConfig(
                name=s.name,
                enabled=s.enabled,
                filters=wire.filters_from_pb(s.filters),
                sample_rate=s.sample_rate,
                export=tuple(s.export),
            )
            for s in ds.event_sets
        },
        deadlines={
            s.name: s.expires_at_unix_ns / 1e9
            for s in ds.event_sets
            if s.enabled and s.expires_at_unix_ns > 0
        },
        idle_interval=(
            ds.idle_batch_interval.ToTimedelta().total_seconds()
            if ds.HasField("idle_batch_interval")
            else 0.0
        ),
        redact_patterns=tuple(ds.redact_patterns),
    )


def _ack_message(generation: int, statuses: Sequence[SetStatus]) -> agent_pb2.AgentMessage:
    """The Ack of ``generation`` with ``statuses`` (shared: not to be changed)."""
    return _memo(
        _ACKS,
        (generation, tuple(statuses)),
        lambda: agent_pb2.AgentMessage(
            ack=agent_pb2.Ack(generation=generation, statuses=[_status_pb(s) for s in statuses])
        ),
    )


# entry point -------------------------------------------------------------------------------


def run_agent(
    engine: CaptureEngine,
    controller_addr: str,
    node_name: str,
    labels: Mapping[str, str] | None = None,
    stop_event: threading.Event | None = None,
    options: ClientOptions | None = None,
) -> ClientStats:
    """Run the controller client until ``stop_event`` is set (blocking; call it from the
    agent's main thread, set the event from a signal handler or another thread). The engine
    is not closed here: its owner closes it. Returns the client's counters."""
    client = ControlClient(engine, controller_addr, node_name, labels, options)

    async def main() -> None:
        stop = asyncio.Event()

        async def watch() -> None:
            while stop_event is not None and not stop_event.is_set():
                await asyncio.sleep(0.2)
            if stop_event is not None:
                stop.set()

        watcher = asyncio.create_task(watch())
        try:
            await client.run(stop)
        finally:
            watcher.cancel()

    asyncio.run(main())
    return client.stats


def _set_state(c: EventSetConfig, expires_at: float) -> dict[str, Any]:
    """One event set in the fail-static state file (read back by _restore_state)."""
    filters = c.filters.to_json()
    # the previous agent reads the selector only nested (its dataclasses.asdict): an agent
    # downgraded after this one saved must not restore a wider, selector-less filter
    filters["workload"] = dataclasses.asdict(c.filters.workload)
    return {
        "name": c.name,
        "enabled": c.enabled,
        "filters": filters,
        "sample_rate": c.sample_rate,
        "export": list(c.export),
        "expires_at": expires_at,
    }
