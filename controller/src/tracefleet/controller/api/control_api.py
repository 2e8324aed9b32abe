"""ControlService: the operator API behind the tracefleet CLI."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from tracefleet.controller.api.auth import Authorizer, require_operator
from tracefleet.controller.common import selector as sel
from tracefleet.controller.common.requestlimits import MAX_PID, MAX_STREAM_FILTER, MAX_TOP_ROWS
from tracefleet.controller.domain.ackwatch import AckState, AckWatch
from tracefleet.controller.domain.controller import (
    MAX_TTL_SECONDS,
    ConfigError,
    Controller,
    RemoveError,
    StoreUnavailable,
)
from tracefleet.controller.domain.events import Follower
from tracefleet.controller.domain.fleet import State, Statuses, status_pbs
from tracefleet.controller.domain.ledger import ACCOUNTING
from tracefleet.controller.domain.policy import Policy
from tracefleet.controller.domain.rules import Rule
from tracefleet.model.histogram import Histogram, HistogramMismatch
from tracefleet.model.wire import filters_from_pb, filters_to_pb
from tracefleet.v1 import control_pb2, control_pb2_grpc, types_pb2

log = logging.getLogger("tracefleet.controller.control")

_STATES = {
    State.CONNECTED: control_pb2.NODE_STATE_CONNECTED,
    State.DISCONNECTED: control_pb2.NODE_STATE_DISCONNECTED,
    State.STALE: control_pb2.NODE_STATE_STALE,
}


def _ts(unix: float | None) -> timestamp_pb2.Timestamp | None:
    if unix is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def _hist_pb(h: Histogram) -> types_pb2.Histogram:
    return types_pb2.Histogram(bounds=h.bounds, counts=h.counts, sum=h.sum)


def _user_events_pb(d: Any) -> types_pb2.UserEventsReport | None:
    """The node's stored NodeReport user_events (limits.user_events' shape); None if its
    agent never reported them."""
    if not isinstance(d, dict):
        return None
    return types_pb2.UserEventsReport(
        available=bool(d.get("available")),
        reason=str(d.get("reason", "")),
        events=[types_pb2.UserEventInfo(**e) for e in d.get("events", [])],
        total=int(d.get("total", 0)),
    )


class ControlService(control_pb2_grpc.ControlServiceServicer):
    def __init__(
        self,
        controller: Controller,
        auth: Authorizer | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.ctl = controller
        self.auth = auth  # None: everyone may do everything (in-process tests)
        self.policy = policy

    async def ConfigureEventSet(
        self,
        request: control_pb2.ConfigureEventSetRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.ConfigureEventSetResponse:
        who = await require_operator(self.auth, context, "ConfigureEventSet")
        if self.policy is not None:
            reason = self.policy.check(request.event_set, request.enabled, request.selector)
            if reason is not None:
                log.warning(
                    "refused ConfigureEventSet %s by %s: %s",
                    request.event_set, who.name if who else context.peer(), reason,
                )  # fmt: skip
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
                raise AssertionError("unreachable")
        d = request.ttl
        if not 0 <= d.seconds <= MAX_TTL_SECONDS or not 0 <= d.nanos < 10**9:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ttl of {d.seconds}s {d.nanos}ns is out of range: 0 to {MAX_TTL_SECONDS}s "
                f"({MAX_TTL_SECONDS // 86400} days); omit it for a rule that never expires",
            )
        ttl = d.seconds + d.nanos / 1e9
        try:
            res = self.ctl.configure(
                request.event_set,
                request.enabled,
                request.selector,
                ttl,
                filters_from_pb(request.filters),
                request.canary_percent,
                request.sample_rate,
                export=tuple(request.export),
            )
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise AssertionError("unreachable") from None
        except StoreUnavailable as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            raise AssertionError("unreachable") from None
        return control_pb2.ConfigureEventSetResponse(
            generation=res.generation,
            changed=res.changed,
            matched_nodes=res.matched_nodes,
            selected_count=res.selected_count,
            expires_at=_ts(res.rule.expires_at),
        )

    async def GetStatus(
        self, request: control_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.GetStatusResponse:
        await require_operator(self.auth, context, "GetStatus")
        try:
            selector = sel.parse(request.selector)
        except sel.SelectorError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise AssertionError("unreachable") from None
        ctl = self.ctl
        now = time.time()
        selected = [
            n for _, n in sorted(ctl.fleet.nodes.items()) if selector.matches(n.name, n.labels)
        ]
        ledger = ctl.ledger.snapshot(n.name for n in selected)  # not the whole fleet's
        nodes = []
        for n in selected:
            rates = n.window.rates()
            counts = ledger.get(n.name)
            nodes.append(
                control_pb2.NodeStatus(
                    name=n.name,
                    labels=n.labels,
                    kernel_version=n.kernel_version,
                    agent_version=n.agent_version,
                    strategies=[
                        types_pb2.StrategyChoice(**s) for s in n.info.get("strategies", [])
                    ],
                    state=_STATES[ctl.fleet.state(n, now)],
                    applied_generation=n.applied_generation,
                    desired_generation=ctl.generation,
                    pending=n.applied_generation < ctl.generation,
                    last_seen=_ts(n.last_seen) if n.last_seen else None,
                    statuses=status_pbs(n.info),
                    events_per_second=sum(r.events_per_second for r in rates.values()),
                    faults_per_second=sum(r.faults_per_second for r in rates.values()),
                    drops_per_second=sum(r.drops_per_second for r in rates.values()),
                    totals=[
                        control_pb2.SetTotals(
                            event_set=k,
                            delivered=c.delivered,
                            dropped=c.dropped,
                            discarded=c.discarded,
                            **{f: getattr(c, f) for f in ACCOUNTING},
                        )
                        for k, c in sorted(counts.sets.items())
                    ]
                    if counts
                    else [],
                    batches_applied=counts.applied if counts else 0,
                    batches_duplicate=counts.duplicate if counts else 0,
                    batches_discarded=counts.discarded if counts else 0,
                    user_events=_user_events_pb(n.info.get("user_events")),
                )
            )
        return control_pb2.GetStatusResponse(
            generation=ctl.generation,
            nodes=nodes,
            rules=[self._rule_pb(r) for r in sorted(ctl.rules.values(), key=lambda r: r.event_set)],
            known_event_sets=ctl.known_event_sets(),
            changes_refused=ctl.store.problem,
        )

    def _rule_pb(self, r: Rule) -> control_pb2.Rule:
        matched, _ = self.ctl.matched_nodes(r)
        return control_pb2.Rule(
            event_set=r.event_set,
            enabled=r.enabled,
            selector=r.selector,
            filters=filters_to_pb(r.filters),
            canary_percent=r.canary_percent,
            sample_rate=r.sample_rate,
            expires_at=_ts(r.expires_at),
            expired=r.expired,
            generation=r.generation,
            matched_nodes=matched if r.active else [],
            export=r.export,
        )

    async def StreamEvents(
        self,
        request: control_pb2.StreamEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[control_pb2.StreamEventsResponse]:
        await require_operator(self.auth, context, "StreamEvents")
        rate = request.sample_rate or 1.0
        if not 0.0 < rate <= 1.0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"sample rate must be in (0, 1], got {rate}"
            )
        bad_pids = [p for p in request.pids if not 1 <= p <= MAX_PID]
        if len(request.pids) > MAX_STREAM_FILTER or bad_pids:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"pids: at most {MAX_STREAM_FILTER}, each 1..{MAX_PID} "
                f"(got {len(request.pids)}{f', {bad_pids[0]}' if bad_pids else ''})",
            )
        if len(request.nodes) > MAX_STREAM_FILTER or any(len(n) > 253 for n in request.nodes):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"nodes: at most {MAX_STREAM_FILTER} names of up to 253 characters",
            )
        known = self.ctl.known_event_sets()
        unknown = sorted(set(request.event_sets) - set(known))
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown event set {', '.join(repr(u[:40]) for u in unknown[:5])}; known event "
                f"sets: {', '.join(known)}",
            )
        follower = Follower(
            nodes=frozenset(request.nodes),
            event_sets=frozenset(request.event_sets),
            pids=frozenset(request.pids),
            sample_rate=rate,
        )
        self.ctl.hub.add(follower)
        try:
            while True:
                ev = await follower.queue.get()
                missed, follower.missed = follower.missed, 0
                yield control_pb2.StreamEventsResponse(event=ev, missed=missed)
        except asyncio.CancelledError:
            raise
        finally:
            self.ctl.hub.remove(follower)

    async def WatchAcks(
        self,
        request: control_pb2.WatchAcksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[control_pb2.WatchAcksResponse]:
        await require_operator(self.auth, context, "WatchAcks")
        ctl = self.ctl
        limit = max(ctl.max_nodes, len(ctl.fleet.nodes))
        if len(request.nodes) > limit or any(len(n) > 253 for n in request.nodes):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"nodes: at most {limit} names (--max-nodes) of up to 253 characters "
                f"(got {len(request.nodes)}); or none, to watch every known node",
            )
        if request.generation > ctl.generation:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"generation {request.generation} was not issued yet (current: "
                f"{ctl.generation}); use 0 for the current one",
            )
        gen = request.generation or ctl.generation
        watch = ctl.acks.add(gen, request.nodes or None, ctl.fleet.nodes)
        try:
            while True:
                await watch.wakeup.wait()
                # let the acks that arrive together (one push reaches every agent at once)
                # go out in one message
                await asyncio.sleep(0)
                yield self._acks_pb(watch, watch.take())
        finally:
            ctl.acks.remove(watch)

    def _acks_pb(self, watch: AckWatch, names: list[str]) -> control_pb2.WatchAcksResponse:
        nodes = self.ctl.fleet.nodes
        c = watch.counts
        resp = control_pb2.WatchAcksResponse(
            generation=watch.generation,
            applied_count=c[AckState.APPLIED],
            pending_count=c[AckState.PENDING],
            not_connected_count=c[AckState.NOT_CONNECTED],
            unknown_count=c[AckState.UNKNOWN],
        )
        for name in names:
            n = nodes.get(name)
            ack = resp.nodes.add(
                name=name,
                state=int(watch.states[name]),
                applied_generation=n.applied_generation if n else 0,
            )
            if n is None:
                continue
            shared = n.info.get("statuses")
            if isinstance(shared, Statuses):  # serialized once per distinct list
                ack.MergeFromString(shared.wire(control_pb2.NodeAck))
            else:
                ack.statuses.extend(status_pbs(n.info))
        return resp

    async def RemoveNode(
        self, request: control_pb2.RemoveNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.RemoveNodeResponse:
        who = await require_operator(self.auth, context, "RemoveNode")
        try:
            self.ctl.remove_node(request.name)
        except RemoveError as e:
            code = (
                grpc.StatusCode.NOT_FOUND
                if request.name not in self.ctl.fleet.nodes
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            await context.abort(code, str(e))
        log.info("node %s removed by %s", request.name, who.name if who else "?")
        return control_pb2.RemoveNodeResponse(name=request.name)

    async def GetTop(
        self, request: control_pb2.GetTopRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.GetTopResponse:
        await require_operator(self.auth, context, "GetTop")
        ctl = self.ctl
        if request.limit > MAX_TOP_ROWS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 1..{MAX_TOP_ROWS} rows"
            )
        limit = request.limit or 20
        rows: list[control_pb2.TopRow] = []
        summaries: dict[str, control_pb2.SetSummary] = {}
        hists: dict[str, Histogram] = {}
        for name in sorted(ctl.fleet.nodes):
            if request.node and name != request.node:
                continue
            for set_name, r in sorted(ctl.fleet.nodes[name].window.rates().items()):
                if request.event_set and set_name != request.event_set:
                    continue
                s = summaries.setdefault(set_name, control_pb2.SetSummary(event_set=set_name))
                s.nodes += 1
                s.events_per_second += r.events_per_second
                s.drops_per_second += r.drops_per_second
                s.faults_per_second += r.faults_per_second
                if r.latency is not None:
                    if set_name not in hists:
                        hists[set_name] = r.latency.copy()
                    else:
                        try:
                            hists[set_name].add(r.latency)
                        except HistogramMismatch as e:
                            log.warning("top: %s left out of %s latency: %s", name, set_name, e)
                for syscall, eps in r.syscalls_per_second.items():
                    rows.append(
                        control_pb2.TopRow(
                            node=name, event_set=set_name, syscall=syscall, events_per_second=eps
                        )
                    )
        rows.sort(key=lambda row: (-row.events_per_second, row.node, row.event_set, row.syscall))
        for set_name, h in hists.items():
            s = summaries[set_name]
            s.latency.CopyFrom(_hist_pb(h))
            s.latency_p50_seconds = h.quantile(0.5)
            s.latency_p99_seconds = h.quantile(0.99)
        return control_pb2.GetTopResponse(
            window=duration_pb2.Duration(seconds=int(ctl.fleet.window)),
            rows=rows[:limit],
            sets=[summaries[k] for k in sorted(summaries)],
        )
