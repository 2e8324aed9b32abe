"""The controller's state machine: rules -> generation -> desired state per node, and what
agents report back. Runs on one asyncio loop; the gRPC services are thin adapters over it.

Result batches go through the ledger (``ledger.Ledger``): applied at most once per (node,
agent instance, seq), and group-committed to SQLite every ``Timings.commit`` seconds with the
seqs they include; the BatchAcks are sent after the commit returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from tracefleet.controller.common import selector as sel
from tracefleet.controller.domain.ackwatch import AckWatches
from tracefleet.controller.domain.aggregate import (
    FAULT_OUTCOMES,
    Histogram,
    HistogramMismatch,
    SetSample,
)
from tracefleet.controller.domain.batchacks import BatchAcks
from tracefleet.controller.domain.events import EventHub
from tracefleet.controller.domain.fleet import Connection, Fleet, Node, Statuses, StatusTable
from tracefleet.controller.domain.ledger import Ledger, Outcome
from tracefleet.controller.domain.limits import REFUSALS, Limits
from tracefleet.controller.domain.redaction import TextRedactor, default_patterns
from tracefleet.controller.domain.rules import (
    KNOWN_EVENT_SETS,
    MAX_USER_SETS,
    USER_PREFIX,
    Rule,
    desired_for_node,
    is_user_set,
)
from tracefleet.controller.domain.wire import WIRE
from tracefleet.controller.storage.store import Store
from tracefleet.model.filters import FilterError, Filters
from tracefleet.model.wire import filters_to_pb
from tracefleet.v1 import agent_pb2, types_pb2

log = logging.getLogger("tracefleet.controller")


# Longest TTL a rule may have: far enough for any real use, near enough that the expiry
# time stays representable everywhere (datetime, protobuf Timestamp).
MAX_TTL_SECONDS = 366 * 86400
MAX_EVENT_SET_NAME = 64
# Longest gap between the result batches of an idle agent (DesiredState.idle_batch_interval)
MAX_IDLE_BATCH_INTERVAL = 30.0
# ... and at most this share of --stale-after: a live idle agent misses two batches before it
# is taken for stale
IDLE_BATCHES_PER_STALE = 3
# Result batches a second the fleet may send this controller in total (BatchAck.pace): at
# 10,000 agents, a batch a second each kept the controller and the agents' hosts busy merging
# and building them, and acknowledgements of a change waited behind them (no convergence
# in 60 s in the control benchmark; all acked in 2.5 s with the batches 10 s apart)
DEFAULT_MAX_BATCH_RATE = 1000.0
# How often the pace follows the number of connected agents
PACE_REFRESH = 1.0
# per-rule export: names of exporters configured on the agents (agent export.EXPORTER_NAME)
MAX_EXPORTERS = 8
EXPORTER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class StoreUnavailable(RuntimeError):
    """The database cannot be written and the change must be durable (-> FAILED_PRECONDITION)."""


class RemoveError(ValueError):
    """A node cannot be removed (unknown, connected, or the store failed)."""


class ConfigError(ValueError):
    """The request is malformed or names something unknown (-> INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ConfigureResult:
    generation: int
    changed: bool
    rule: Rule
    matched_nodes: list[str]
    selected_count: int


@dataclass
class Timings:
    expiry_check: float = 0.2  # seconds between TTL checks
    flush: float = 1.0  # seconds between writes of node records
    sample_renew: float = 2.0  # seconds between SampleRequest renewals
    sample_lease: float = 6.0  # lease of one SampleRequest
    max_sampled_events_per_interval: int = 200
    # seconds a result batch may wait for the group commit of the ledger (and so for its
    # acknowledgement): one fsync per commit, not per batch
    commit: float = 0.05
    # BatchAcks are merged (batchacks.py): a node gets at most one per ack_every seconds,
    # or per ack_gaps of its own gaps between batches when it batches less often, covering
    # the highest seq committed (cumulative), unless ack_burst of its batches wait for one
    # (an agent replaying its outbox must not stall on its send window)
    ack_every: float = 2.0
    ack_burst: int = 8
    ack_gaps: float = 3.0


class Controller:
    def __init__(
        self,
        store: Store,
        *,
        stale_after: float = 10.0,
        window: float = 10.0,
        timings: Timings | None = None,
        max_nodes: int = 10_000,
        forget_after: float = 0.0,
        max_batch_rate: float = DEFAULT_MAX_BATCH_RATE,
    ) -> None:
        self.store = store
        self.max_batch_rate = max_batch_rate  # 0: no pace (every agent at its interval)
        self._pace = (-math.inf, 0.0)  # (monotonic time computed, seconds)
        self._over_rate = False  # the fleet needs more batches a second than max_batch_rate
        # user sets an agent may report: those with a rule here (the operator named them)
        self.limits = Limits(REFUSALS, user_sets=lambda: self.rules)
        self.max_nodes = max_nodes
        # nodes not heard from for this long are forgotten (0: never)
        self.forget_after = forget_after
        self.timings = timings or Timings()
        self.fleet = Fleet(stale_after=stale_after, window=window)
        # idle agents report this far apart: three chances before the node counts as stale
        self.idle_batch_interval = min(
            MAX_IDLE_BATCH_INTERVAL, stale_after / IDLE_BATCHES_PER_STALE
        )
        self.fleet.load(store.nodes())
        self.hub = EventHub()
        self.acks = AckWatches()
        self.statuses = StatusTable()  # one shared Statuses per distinct list reported
        # DesiredState messages of the current generation, one per distinct outcome of the
        # rules (which sets a node gets): built and serialized once, not once per agent.
        # Keyed by the rules, then by the outcome: a push hashes the rules once, not per node
        self._desired_cache: dict[
            tuple[Any, ...], dict[tuple[bool, ...], agent_pb2.ControllerMessage]
        ] = {}
        self.redact_patterns: tuple[str, ...] = ()  # sent in every DesiredState
        self.rules: dict[str, Rule] = {r.event_set: r for r in store.rules()}
        self.generation = store.generation()
        self.ledger = Ledger(store.ledger())
        self._commit_wanted = asyncio.Event()
        self.commit_seconds = 0.0  # time spent in ledger commits (all of them)
        self.commits = 0
        t = self.timings
        self.batch_acks = BatchAcks(t.ack_every, t.ack_burst, t.ack_gaps, MAX_IDLE_BATCH_INTERVAL)
        self.batch_acks_sent = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_hist: set[str] = set()
        # Fail safe: what switches tracing off (disable, TTL expiry) is applied in memory and
        # pushed even when the database cannot be written; saved when it can again.
        self._unsaved: dict[str, Rule] = {}
        self._generation_unsaved = False
        self.store_errors = 0  # failed writes, all kinds
        self._leases_out = False  # a SampleRequest lease may be held by an agent
        self._ledgers_wanted: dict[str, list[asyncio.Future[None]]] = {}  # see register
        # sampled events are redacted again here: no operator sees what an agent left in
        self.redactor = TextRedactor(default_patterns())
        self.redacted_here = 0  # argument values this controller had to mask itself
        # Observers (the metrics endpoint): on_generation(gen), on_ack(node, ack, previous
        # applied generation), on_batch(node, batch) for every batch applied, and
        # on_duplicate(node, batch) for a resent batch ignored. Called on this loop; must not
        # block; an observer may leave any of them out.
        self.observers: list[Any] = []

    def _notify(self, event: str, *args: Any) -> None:
        for o in self.observers:
            fn = getattr(o, event, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:
                log.exception("observer %s.%s failed", type(o).__name__, event)

    # lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.expire(time.time())
        self._tasks = [
            asyncio.create_task(self._every(self.timings.expiry_check, self._expiry_tick)),
            asyncio.create_task(self._every(self.timings.flush, self.flush)),
            asyncio.create_task(self._sampling_loop()),
            asyncio.create_task(self._commit_loop()),
            asyncio.create_task(self._every(self.timings.ack_every / 4, self.send_due_acks)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.commit()
        self.send_due_acks(force=True)
        for node in self.fleet.connected():
            if node.conn is not None:
                node.conn.close()
        self.flush()

    async def _every(self, period: float, fn: object) -> None:
        assert callable(fn)
        while True:
            await asyncio.sleep(period)
            try:
                fn()
            except sqlite3.Error as e:
                self._store_failed(getattr(fn, "__name__", "periodic task"), e)
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    def _store_failed(self, what: str, e: Exception) -> None:
        """One line per failure (1st, 2nd, 4th, 8th, ...), with the count: never a flood."""
        self.store_errors += 1
        n = self.store_errors
        if n & (n - 1) == 0:
            log.error(
                "database %s: %s failed: %s [%d write failure(s) so far; retried]",
                self.store.path, what, e, n,
            )  # fmt: skip

    def _save_unsaved(self) -> None:
        if not self._unsaved and not self._generation_unsaved:
            return
        self.store.save_rules(self._unsaved.values(), self.generation)
        log.info("database %s writable again: saved generation %d (%d rule(s))",
                 self.store.path, self.generation, len(self._unsaved))  # fmt: skip
        self._unsaved.clear()
        self._generation_unsaved = False

    def _expiry_tick(self) -> None:
        now = time.time()
        self.expire(now)
        self._save_unsaved()
        if self.forget_after > 0:
            for node in self.fleet.disconnected():
                if now - node.last_seen > self.forget_after:
                    try:
                        self.remove_node(node.name)
                    except RemoveError as e:
                        log.warning("cannot forget node %s: %s", node.name, e)
                        break  # the store fails: retried next tick
                    log.info("forgot node %s: not heard from for %.0fs (--forget-after)",
                             node.name, now - node.last_seen)  # fmt: skip

    def remove_node(self, name: str) -> None:
        """Forget a node that is not connected; RemoveError naming why not."""
        node = self.fleet.nodes.get(name)
        if node is None:
            raise RemoveError(f"no node {name!r}")
        if node.conn is not None:
            raise RemoveError(f"node {name!r} is connected: stop its agent first")
        try:
            self.store.delete_nodes([name])
        except sqlite3.Error as e:
            raise RemoveError(f"the database cannot be written ({e}); try again") from None
        self.fleet.forget(name)
        self.ledger.forget(name)
        self.batch_acks.forget(name)
        self.acks.changed(node, forgotten=True)
        self._notify("on_forget", name)

    def flush(self) -> None:
        records = self.fleet.take_dirty()
        if records:
            try:
                self.store.put_nodes(records)
            except sqlite3.Error:
                for r in records:  # kept dirty: written by the next flush
                    if r.name in self.fleet.nodes:
                        self.fleet.mark_dirty(self.fleet.nodes[r.name])
                raise

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            await asyncio.sleep(self.timings.commit)  # gather the batches of many agents
            self._commit_wanted.clear()
            try:
                self.commit()
            except sqlite3.Error as e:  # e.g. disk full: nothing acknowledged, retried
                self._store_failed("committing result batches", e)
                self._commit_wanted.set()
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("committing result batches failed")
                self._commit_wanted.set()
                await asyncio.sleep(1.0)

    def commit(self) -> int:
        """Write the batches applied since the last commit (one transaction), then
        acknowledge them; returns the number of acknowledgements sent."""
        if not self.ledger.dirty:
            return 0
        t0 = time.monotonic()
        rows = self.ledger.changes()
        conflicts = self.store.put_ledger(rows)
        acks = self.ledger.committed(rows)
        if conflicts:  # another replica changed these nodes' rows: nothing of theirs is acked
            acks = [a for a in acks if a[0] not in conflicts]
            for name in sorted(conflicts):
                log.warning("node %s: its ledger was changed by another replica; read again, "
                            "the agent resends what was not acknowledged", name)  # fmt: skip
                self._reload_ledgers([name])
                node = self.fleet.nodes.get(name)
                if node is not None and node.conn is not None:
                    node.conn.close()  # the agent reconnects and resends its outbox
        self.commit_seconds += time.monotonic() - t0
        self.commits += 1
        now = time.monotonic()
        sent = 0
        for name, instance, seq in acks:
            if self.batch_acks.committed(name, (instance, seq), now):
                sent += self._send_ack(name, now)
        return sent

    def _reload_ledgers(self, names: list[str]) -> None:
        """Take nodes' ledger rows from the store when another writer may have changed
        them (replicas sharing etcd; a no-op for a controller's own database)."""
        for name, rows in self.store.node_ledgers(names).items():
            self.ledger.replace_node(name, rows)
            self.batch_acks.drop_due(name)

    async def register(self, reg: agent_pb2.Register, conn: Connection) -> Node:
        """on_register, once a shared store's copy of the node's ledger is read again
        (another replica may have counted its batches since) with those of the nodes
        registering within Timings.commit of it, in one request: a failover moves
        hundreds within a second or two, one a loop turn, and read one by one 1,000 took
        2.9 s of the event loop."""
        read = self._ledger_read(reg.node_name)
        if read is not None:
            await read
        return self.on_register(reg, conn, ledger_read=read is not None)

    def _ledger_read(self, name: str) -> asyncio.Future[None] | None:
        """A future done once the node's ledger is read again; None: nothing to read (this
        controller's own database)."""
        if not self.store.shared:
            return None
        loop = asyncio.get_running_loop()
        if not self._ledgers_wanted:
            loop.call_later(self.timings.commit, self._read_wanted_ledgers)
        fut = loop.create_future()
        self._ledgers_wanted.setdefault(name, []).append(fut)
        return fut

    def _read_wanted_ledgers(self) -> None:
        wanted, self._ledgers_wanted = self._ledgers_wanted, {}
        try:
            self._reload_ledgers(list(wanted))
        except sqlite3.Error as e:  # the next commit's compare-and-swap still guards
            self._store_failed("reading the ledgers of registering nodes", e)
        for futs in wanted.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    def send_due_acks(self, force: bool = False) -> int:
        """Send the BatchAcks held back whose time has come (all: force)."""
        now = time.monotonic()
        return sum(self._send_ack(n, now) for n in self.batch_acks.due(now, force))

    def batch_pace(self) -> float:
        """Seconds between one agent's result batches that keep the fleet's total at
        max_batch_rate, at most the idle gap (the liveness signal stays well inside
        stale_after); 0 while the fleet is small enough for every interval."""
        now = time.monotonic()
        at, pace = self._pace
        if now - at >= PACE_REFRESH:
            n = self.fleet.connected_count()
            pace = min(self.idle_batch_interval, n / self.max_batch_rate) if (
                self.max_batch_rate > 0) else 0.0  # fmt: skip
            self._pace = (now, pace)
            self._warn_over_rate(n)
        return pace

    def _warn_over_rate(self, n: int) -> None:
        """Once per crossing: the fleet is too large for --max-batch-rate at the idle gap
        (the pace stops at it so that a live agent is never taken for stale)."""
        gap, rate = self.idle_batch_interval, self.max_batch_rate
        over = rate > 0 and gap > 0 and n / gap > rate * 1.01
        if over and not self._over_rate:
            needed = n / rate  # the idle gap that keeps this fleet within the rate
            fix = f"raise --max-batch-rate to {math.ceil(n / gap)}"
            if needed <= MAX_IDLE_BATCH_INTERVAL:  # past that, a longer --stale-after won't
                stale = math.ceil(IDLE_BATCHES_PER_STALE * needed)
                fix = f"raise --stale-after to at least {stale} s, or " + fix[6:]
            log.warning(
                "%d connected agents send %.1f result batches a second at the idle gap of "
                "%.1f s (--stale-after / %d, at most %.0f s), more than --max-batch-rate %g: "
                "%s", n, n / gap, gap, IDLE_BATCHES_PER_STALE, MAX_IDLE_BATCH_INTERVAL,
                rate, fix,
            )  # fmt: skip
        self._over_rate = over

    def _batch_ack(self, instance: str, seq: int) -> agent_pb2.ControllerMessage:
        ack = agent_pb2.BatchAck(instance_id=instance, seq=seq)
        pace = self.batch_pace()
        if pace > 0:
            ack.pace.FromNanoseconds(int(pace * 1e9))
        return agent_pb2.ControllerMessage(batch_ack=ack)

    def _send_ack(self, name: str, now: float) -> int:
        node = self.fleet.nodes.get(name)
        if node is None or node.conn is None:
            self.batch_acks.drop_due(name)  # resent batches are acked after the reconnect
            return 0
        due = self.batch_acks.take(name, now)
        if due is None:
            return 0
        node.conn.send(self._batch_ack(*due))
        self.batch_acks_sent += 1
        return 1

    # rules ------------------------------------------------------------------------------

    def known_event_sets(self) -> list[str]:
        # the controller's own registry: agents cannot add names (issue 15)
        return sorted(KNOWN_EVENT_SETS)

    def _check_user_set(self, event_set: str) -> None:
        if not is_user_set(event_set):
            raise ConfigError(
                f"bad user event set {event_set!r}: user:NAME, NAME 1..59 of [A-Za-z0-9_] "
                "not starting with a digit, as the application registered it"
            )
        users = [n for n in self.rules if n.startswith(USER_PREFIX)]
        if event_set not in self.rules and len(users) >= MAX_USER_SETS:
            raise ConfigError(
                f"{event_set}: this controller already has rules for {len(users)} user event "
                f"sets (the limit is {MAX_USER_SETS}); reuse one of them (a disabled rule "
                "keeps its slot)"
            )

    def configure(
        self,
        event_set: str,
        enabled: bool,
        selector: str = "",
        ttl: float = 0.0,
        filters: Filters | None = None,
        canary_percent: int = 0,
        sample_rate: float = 0.0,
        now: float | None = None,
        export: tuple[str, ...] = (),
    ) -> ConfigureResult:
        now = time.time() if now is None else now
        known = self.known_event_sets()
        if len(event_set) > MAX_EVENT_SET_NAME:
            raise ConfigError(
                f"unknown event set {event_set[:40]!r}... ({len(event_set)} characters); "
                f"known event sets: {', '.join(known)}"
            )
        if event_set.startswith(USER_PREFIX):
            self._check_user_set(event_set)
        elif event_set not in known:
            raise ConfigError(
                f"unknown event set {event_set!r}; known event sets: {', '.join(known)}, "
                "or user:NAME for an application's user_event"
            )
        try:
            parsed = sel.parse(selector)
        except sel.SelectorError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= canary_percent <= 100:
            raise ConfigError(f"canary percent must be 0..100, got {canary_percent}")
        if not (0.0 <= sample_rate <= 1.0) or math.isnan(sample_rate):
            raise ConfigError(f"sample rate must be 0..1, got {sample_rate}")
        if ttl < 0 or math.isnan(ttl):
            raise ConfigError(f"ttl must not be negative, got {ttl}")
        if ttl > MAX_TTL_SECONDS:
            raise ConfigError(
                f"ttl {ttl:.0f}s is beyond the limit of {MAX_TTL_SECONDS // 86400} days; "
                "omit the ttl for a rule that never expires"
            )
        export = tuple(dict.fromkeys(export))
        if len(export) > MAX_EXPORTERS or any(not EXPORTER_NAME.fullmatch(n) for n in export):
            bad = [n[:40] for n in export if not EXPORTER_NAME.fullmatch(n)]
            raise ConfigError(
                f"bad export {bad or list(export)}: at most {MAX_EXPORTERS} exporter names, each "
                "1..63 of [a-z0-9_.-] starting with a letter or digit, as configured on the "
                "agents (tracefleet-agent run --exporter NAME=...)"
            )
        filters = filters or Filters()
        try:
            filters.check()
        except FilterError as e:
            raise ConfigError(str(e)) from None
        expires_at = now + ttl if ttl > 0 and enabled else None
        new = Rule(
            event_set,
            enabled,
            str(parsed),
            filters,
            canary_percent,
            sample_rate,
            expires_at,
            export=export if enabled else (),
        )
        old = self.rules.get(event_set)
        if old is not None and old.same_intent(new):
            rule = old
            if old.active and old.expires_at != expires_at:
                try:
                    self.store.update_expiry(event_set, expires_at)
                except sqlite3.Error as e:
                    self._store_failed("restarting a TTL", e)
                    raise self._unavailable("restarting the TTL of", event_set, e) from None
                rule = self.rules[event_set] = old.with_changes(expires_at=expires_at)
                self.push_all()  # agents enforce the deadline too (fail-static)
            changed = False
        else:
            try:
                self._save_unsaved()
                gen, (rule,) = self.store.put_rules([new], after=self.generation)
            except sqlite3.Error as e:
                self._store_failed("storing a rule", e)
                # more tracing must be durable; and replicas share every change or none
                if new.active or self.store.shared:
                    raise self._unavailable(
                        "enabling" if enabled else "disabling", event_set, e
                    ) from None
                gen = self.generation + 1  # less tracing: applied now, saved later
                rule = self._unsaved[event_set] = new.with_changes(generation=gen)
            self.rules[event_set] = rule
            self.generation = gen
            changed = True
            log.info(
                "generation %d: %s %s on %s%s",
                gen,
                "enable" if enabled else "disable",
                event_set,
                rule.selector,
                f" (canary {canary_percent}%)" if canary_percent not in (0, 100) else "",
            )
            self.push_all()
        matched, selected = self.matched_nodes(rule)
        return ConfigureResult(rule.generation, changed, rule, matched, selected)

    def take_shared(self, generation: int, rules: list[Rule]) -> None:
        """The shared store's desired state changed (another replica, or this one): take it
        and push it to this replica's agents, unless it is what this replica has."""
        new = {r.event_set: r for r in rules}
        if generation < self.generation or (generation == self.generation and new == self.rules):
            return
        log.info("generation %d: desired state changed by another replica", generation)
        self.rules = new
        self.generation = generation
        self.push_all()

    def _unavailable(self, doing: str, event_set: str, e: Exception) -> StoreUnavailable:
        store = self.store
        if store.shared:  # EtcdError names what to check
            return StoreUnavailable(
                f"the shared store ({store.path}) cannot be written ({e}): {doing} "
                f"{event_set} is refused, through every replica, until it can (TTL expiry "
                "still applies); retry then"
            )
        return StoreUnavailable(
            f"the controller's database {store.path} cannot be written ({e}): "
            f"{doing} {event_set} is refused until it can (disable and TTL expiry still "
            "apply); free space or fix the file system, then retry"
        )

    def matched_nodes(self, rule: Rule) -> tuple[list[str], int]:
        """Known nodes the rule enables the set on (all nodes for a disabled rule), and how
        many its selector selects."""
        names = sorted(self.fleet.nodes)
        if not rule.active:
            return names, len(names)
        selected = [n for n in names if rule.selects(n, self.fleet.nodes[n].labels)]
        matched = [n for n in selected if rule.applies_to(n, self.fleet.nodes[n].labels)]
        return matched, len(selected)

    def expire(self, now: float) -> list[str]:
        """Switch off rules whose TTL ran out, under one new generation."""
        due = [
            r
            for r in self.rules.values()
            if r.active and r.expires_at is not None and r.expires_at <= now
        ]
        if not due:
            return []
        try:
            self._save_unsaved()
            gen, stored = self.store.put_rules(
                (r.with_changes(expired=True) for r in due), after=self.generation
            )
        except sqlite3.Error as e:  # switched off anyway; saved when the store can
            self._store_failed("storing expired rules", e)
            gen = self.generation + 1
            stored = [r.with_changes(expired=True, generation=gen) for r in due]
            self._unsaved.update((r.event_set, r) for r in stored)
        for r in stored:
            self.rules[r.event_set] = r
        self.generation = gen
        log.info("generation %d: TTL expired for %s", gen, ", ".join(r.event_set for r in due))
        self.push_all()
        return [r.event_set for r in due]

    # downstream -------------------------------------------------------------------------

    def desired_message(self, node: Node) -> agent_pb2.ControllerMessage:
        rules, states = self._desired_states()
        return self._desired_for(rules, states, node)

    def _desired_states(
        self,
    ) -> tuple[list[Rule], dict[tuple[bool, ...], agent_pb2.ControllerMessage]]:
        """The rules in order, and the messages of their outcomes built so far."""
        rules = sorted(self.rules.values(), key=lambda r: r.event_set)
        # the rules and generation identify the state; which rules apply is per node
        key = (self.generation, self.redact_patterns, tuple(rules))
        states = self._desired_cache.get(key)
        if states is None:
            if len(self._desired_cache) >= 8:  # older generations and rule sets
                for old in self._desired_cache.values():
                    for msg in old.values():
                        WIRE.discard(msg)
                self._desired_cache.clear()
            states = self._desired_cache[key] = {}
        return rules, states

    def _desired_for(
        self,
        rules: list[Rule],
        states: dict[tuple[bool, ...], agent_pb2.ControllerMessage],
        node: Node,
    ) -> agent_pb2.ControllerMessage:
        outcome = tuple(r.applies_to(node.name, node.labels) for r in rules)
        msg = states.get(outcome)
        if msg is None:  # at most one per subset of the event sets
            msg = states[outcome] = WIRE.add(self._build_desired(node))
        return msg

    def _build_desired(self, node: Node) -> agent_pb2.ControllerMessage:
        specs = [
            types_pb2.EventSetSpec(
                name=s.name,
                enabled=s.enabled,
                filters=filters_to_pb(s.filters),
                sample_rate=s.sample_rate,
                expires_at_unix_ns=self._expires_ns(s.name) if s.enabled else 0,
                export=s.export,
            )
            for s in desired_for_node(self.rules.values(), node.name, node.labels)
        ]
        return agent_pb2.ControllerMessage(
            desired_state=agent_pb2.DesiredState(
                generation=self.generation,
                event_sets=specs,
                redact_patterns=self.redact_patterns,
                idle_batch_interval=duration_pb2.Duration(
                    nanos=int(self.idle_batch_interval % 1 * 1e9),
                    seconds=int(self.idle_batch_interval),
                ),
            )
        )

    def _expires_ns(self, event_set: str) -> int:
        rule = self.rules.get(event_set)
        return int(rule.expires_at * 1e9) if rule is not None and rule.expires_at else 0

    def push_all(self) -> None:
        """One write per connected agent: the message of its outcome, built and serialized
        once per outcome."""
        self._notify("on_generation", self.generation)
        rules, states = self._desired_states()
        for node in self.fleet.connected():
            assert node.conn is not None
            node.conn.send(self._desired_for(rules, states, node))

    def sample_message(self, node: Node) -> agent_pb2.ControllerMessage | None:
        spec = self.hub.sample_spec(node.name)
        if spec is None:
            return None
        return agent_pb2.ControllerMessage(
            sample_request=agent_pb2.SampleRequest(
                event_sets=spec.event_sets,
                pids=spec.pids,
                sample_rate=spec.sample_rate,
                max_events_per_interval=self.timings.max_sampled_events_per_interval,
                lease=duration_pb2.Duration(seconds=math.ceil(self.timings.sample_lease)),
            )
        )

    def refresh_sampling(self) -> None:
        if not self.hub.followers and not self._leases_out:
            return  # nobody follows and no agent holds a lease: a pass would find nothing
        self._leases_out = bool(self.hub.followers)
        for node in self.fleet.connected():
            conn = node.conn
            assert conn is not None
            msg = self.sample_message(node)
            if msg is not None:
                conn.send(msg)
                conn.sampling = True
            elif conn.sampling:
                conn.send(
                    agent_pb2.ControllerMessage(
                        sample_request=agent_pb2.SampleRequest(lease=duration_pb2.Duration())
                    )
                )
                conn.sampling = False

    async def _sampling_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hub.changed.wait(), self.timings.sample_renew)
            self.hub.changed.clear()
            try:
                self.refresh_sampling()
            except Exception:
                log.exception("sampling refresh failed")

    # upstream ---------------------------------------------------------------------------

    def on_register(
        self, reg: agent_pb2.Register, conn: Connection, ledger_read: bool = False
    ) -> Node:
        if not ledger_read:  # another replica may have counted its batches since we read
            try:
                self._reload_ledgers([reg.node_name])
            except sqlite3.Error as e:  # the next commit's compare-and-swap still guards
                self._store_failed("reading a node's ledger", e)
        # an agent whose window is small must not stall (or discard) waiting for an ack
        self.batch_acks.register(reg.node_name, reg.ack_window)
        if reg.instance_id:
            # first message of the stream: tells the agent this controller acknowledges
            # batches (seq 0: none of this instance applied yet)
            seq = self.ledger.committed_seq(reg.node_name, reg.instance_id)
            conn.send(self._batch_ack(reg.instance_id, seq))
            self.batch_acks.announced(reg.node_name, (reg.instance_id, seq))
        node = self.fleet.attach(reg.node_name, conn)
        node.labels = dict(reg.labels)
        node.kernel_version = reg.kernel_version
        node.agent_version = reg.agent_version
        node.applied_generation = reg.applied_generation
        node.info = {
            "strategies": [
                {
                    "event_set": c.event_set,
                    "strategy": c.strategy,
                    "reason": c.reason,
                    "available": list(c.available),
                }
                for c in reg.capabilities
            ],
            "event_sets": sorted(reg.event_sets),
            "statuses": self.statuses.get(list(reg.statuses)),
            "capabilities_json": reg.capabilities_json,
        }
        self.fleet.mark_dirty(node)
        self.acks.changed(node)
        if reg.applied_generation > self.generation:
            # The agent applied a generation this controller never issued (its database was
            # replaced): move past it so every agent converges on this controller's state.
            try:
                self.generation = self.store.ensure_generation_above(reg.applied_generation)
            except sqlite3.Error as e:
                self._store_failed("raising the generation", e)
                self.generation = reg.applied_generation + 1
                self._generation_unsaved = True
            log.warning(
                "node %s applied generation %d > ours; generation is now %d",
                node.name,
                reg.applied_generation,
                self.generation,
            )
            self.push_all()
        else:
            conn.send(self.desired_message(node))
        sample = self.sample_message(node)
        if sample is not None:
            conn.send(sample)
            conn.sampling = True
            self._leases_out = True
        return node

    def on_ack(self, node: Node, ack: agent_pb2.Ack) -> None:
        self.fleet.seen(node)
        self._notify("on_ack", node, ack, node.applied_generation)
        node.applied_generation = ack.generation
        node.info["statuses"] = self._acked_statuses(ack, node.name)
        self.fleet.mark_dirty(node)
        self.acks.changed(node)

    def _acked_statuses(self, ack: agent_pb2.Ack, node: str) -> Statuses:
        """The shared, checked statuses of an Ack. An Ack seen before byte for byte whose
        statuses all name fixed event sets (nothing dropped, nothing that a rule change
        could make unknown) is not checked again: a change acked by the whole fleet is
        checked once per distinct status list."""
        data = ack.SerializeToString()
        hit = self.statuses.by_wire(data)
        if hit is not None:
            return hit
        statuses = self.limits.statuses(list(ack.statuses), node)
        shared = self.statuses.get(statuses)
        if len(statuses) == len(ack.statuses) and all(
            s.name in self.limits.fixed for s in statuses
        ):
            self.statuses.add_wire(data, shared)
        return shared

    def on_report(self, node: Node, report: agent_pb2.NodeReport) -> None:
        """The agent's statuses and user_events changed outside an Ack (e.g. a user_event
        registered after its rule, now attached): replace what the node showed."""
        self.fleet.seen(node)
        statuses = self.limits.statuses(list(report.statuses), node.name)
        node.info["statuses"] = self.statuses.get(statuses)
        if report.HasField("user_events"):
            node.info["user_events"] = self.limits.user_events(report.user_events, node.name)
        self.fleet.mark_dirty(node)
        self.acks.changed(node)  # a waiting `enable --wait` sees the new status

    def on_batch(self, node: Node, batch: agent_pb2.ResultBatch) -> Outcome:
        """Apply a batch (check ledger.batch_problem() first)."""
        self.fleet.seen(node)
        outcome = self.ledger.apply(node.name, batch)
        if outcome is Outcome.DUPLICATE:
            seq = self.ledger.committed_seq(node.name, batch.instance_id)
            if seq >= batch.seq and node.conn is not None:
                node.conn.send(self._batch_ack(batch.instance_id, seq))  # its ack was lost
            self._notify("on_duplicate", node, batch)
            return outcome
        self._commit_wanted.set()
        self.batch_acks.batch(node.name, time.monotonic())
        self._notify("on_batch", node, batch)
        if not batch.replayed:
            samples = []
            for s in batch.sets:
                latency = None
                if s.HasField("latency") and s.latency.counts:
                    try:
                        h = s.latency
                        latency = Histogram(tuple(h.bounds), list(h.counts), h.sum)
                    except HistogramMismatch as e:
                        self._warn_hist(node.name, str(e))
                samples.append(
                    SetSample(
                        s.event_set,
                        dict(s.events_by_syscall),
                        s.delivered,
                        s.dropped,
                        sum(o.count for o in s.outcomes if o.outcome in FAULT_OUTCOMES),
                        latency,
                    )
                )
            duration = (batch.interval_end_ns - batch.interval_start_ns) / 1e9
            node.window.add(duration, samples)
        if batch.events:
            masked = 0
            for ev in batch.events:
                ev.node = node.name
                for arg in ev.args.values():
                    if _redact_arg(self.redactor, arg):
                        masked += 1
            if masked:
                self.redacted_here += masked
                log.warning(
                    "node %s sent %d unredacted secret value(s): masked by the controller "
                    "[%d so far]", node.name, masked, self.redacted_here,
                )  # fmt: skip
            self.hub.dispatch(node.name, batch.events)
        return outcome

    def _warn_hist(self, node: str, why: str) -> None:
        if node not in self._warned_hist:
            self._warned_hist.add(node)
            log.warning("node %s sent a histogram that cannot be merged: %s", node, why)

    def on_disconnect(self, node: Node, conn: Connection) -> None:
        if self.fleet.detach(node, conn):
            log.info("node %s disconnected", node.name)
            self.acks.changed(node)


def _redact_arg(redactor: TextRedactor, arg: types_pb2.EventArg) -> bool:
    """Mask secrets in every form an argument travels in (the text ``value`` and the typed
    string or argv list); True if anything changed."""
    changed = False
    value = redactor.text(arg.value)
    if value != arg.value:
        arg.value, changed = value, True
    kind = arg.WhichOneof("typed")
    if kind == "string_value":
        text = redactor.text(arg.string_value)
        if text != arg.string_value:
            arg.string_value, changed = text, True
    elif kind == "string_list":
        strings, hit = redactor.strings(list(arg.string_list.values))
        if hit:
            arg.string_list.values[:] = [str(v) for v in strings]
            changed = True
    if changed:
        arg.redacted = True
    return changed
