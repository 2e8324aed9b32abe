"""What an agent may tell the controller: names from the controller's own registry, counts
and sizes within stated limits, and label values within a cardinality budget.

Agents are not trusted with strings: every name an agent sends can become a status row, a
stored record or a metric label. Event-set names must be in ``rules.KNOWN_EVENT_SETS``, or
be a user set (``user:NAME``) the controller has a rule for;
syscall, strategy and outcome names must be short identifiers, and the controller keeps at
most ``BUDGET`` distinct values of each for the whole fleet (a value past the budget is
dropped, not added). Whatever is dropped is counted and logged with its reason
(``REFUSALS`` below, reasons in ``REASONS``, so no metric series is created by an agent)."""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Container

from tracefleet.controller.domain.rules import KNOWN_EVENT_SETS, USER_PREFIX, is_user_set
from tracefleet.model.labels import label_ok
from tracefleet.v1 import agent_pb2, types_pb2

# Stated limits of one ResultBatch (a real agent sends one per interval, ~1 s):
MAX_COUNT = 2**32  # delivered, dropped, discarded, call accounting or one syscall's events, per set
MAX_SYSCALLS_PER_SET = 512  # Linux has ~460 syscalls
MAX_OUTCOMES_PER_SET = 64
MAX_EVENTS = 10_000  # sampled events per batch
MAX_ARGS = 32  # arguments per event
MAX_ARG_VALUE = 64 << 10  # bytes of one argument's value
MAX_USER_EVENTS = 256  # registered user_events kept per node (NodeReport); more: capped
MAX_REASON = 512  # characters of a NodeReport's user_events.reason
TRACERS = ("ftrace", "perf", "other")  # what user_events_status says uses an event
# Distinct values of each agent-supplied label, fleet-wide
BUDGET = {"syscall": 1024, "strategy": 64, "outcome": 32}
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")

REASONS = (
    "agent_unknown_event_set",
    "agent_bad_name",
    "agent_over_budget",
    "agent_count_out_of_range",
    "agent_too_many_entries",
    "agent_bad_label",
    "agent_too_many_nodes",
)

# Refusals log under the auth logger, as they did when the class lived in auth (auth imports
# this module for its REASONS: the class lives here so imports run one way).
_refusal_log = logging.getLogger("tracefleet.controller.auth")


class Refusals:
    """Counter of refused clients by reason; thread-safe (grpc threads count TLS rejects)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def refuse(self, reason: str, peer: str, detail: str, *, log_it: bool = True) -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
        if log_it:
            _refusal_log.warning(
                "refused %s (%s): %s [%d so far]", peer or "client", reason, detail, n
            )

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


REFUSALS = Refusals()  # the process's one count of refused clients (agents, operators, TLS)


class _Known:
    """The fixed event sets, and the user sets the controller has a rule for (read live)."""

    def __init__(self, fixed: frozenset[str], user_sets: Callable[[], Container[str]]) -> None:
        self.fixed = fixed
        self.user_sets = user_sets

    def __contains__(self, name: object) -> bool:
        if name in self.fixed:
            return True
        return isinstance(name, str) and is_user_set(name) and name in self.user_sets()


class Limits:
    """Validates agent messages in place; what it drops is counted in ``refusals`` and
    logged (the 1st, 2nd, 4th, 8th, ... time per reason: one line each, never a flood)."""

    def __init__(
        self,
        refusals: Refusals,
        known: tuple[str, ...] = KNOWN_EVENT_SETS,
        user_sets: Callable[[], Container[str]] = lambda: (),
    ) -> None:
        self.refusals = refusals
        self._fixed = frozenset(known)
        self.fixed = self._fixed  # names that are always known (no rule needed)
        self._user_sets = user_sets
        self.known = _Known(self._fixed, user_sets)
        self._lock = threading.Lock()
        self.seen: dict[str, set[str]] = {kind: set() for kind in BUDGET}

    def refuse(self, reason: str, detail: str) -> None:
        n = self.refusals.snapshot().get(reason, 0) + 1
        self.refusals.refuse(reason, "agent", detail, log_it=n & (n - 1) == 0)

    def _name(self, kind: str, value: str, node: str) -> bool:
        """True if ``value`` may be a ``kind`` label value (within the fleet's budget)."""
        if value in self.seen[kind]:  # accepted before (a set is only ever added to)
            return True
        if not NAME.fullmatch(value):
            self.refuse("agent_bad_name", f"node {node}: {kind} name {value[:40]!r} is not a "
                        "short lower-case identifier: dropped")  # fmt: skip
            return False
        with self._lock:
            seen = self.seen[kind]
            if value in seen:
                return True
            if len(seen) >= BUDGET[kind]:
                self.refuse(
                    "agent_over_budget",
                    f"node {node}: {kind} {value!r} would exceed the budget of "
                    f"{BUDGET[kind]} distinct {kind} names: dropped",
                )
                return False
            seen.add(value)
            return True

    def event_sets(self, names: list[str], node: str) -> list[str]:
        """The known ones of ``names``; the others counted."""
        unknown = [n for n in names if n not in self.known]
        if unknown:
            shown = ", ".join(repr(n[:40]) for n in unknown[:5])
            self.refuse(
                "agent_unknown_event_set",
                f"node {node}: {len(unknown)} event set name(s) not in this controller's "
                f"registry ({shown}): ignored",
            )
        return [n for n in names if n in self.known]

    def labels(self, labels: dict[str, str], node: str) -> str:
        """Why the labels are refused, or ""."""
        for k, v in labels.items():
            if not label_ok(k, v):  # Kubernetes syntax, so that selectors can name them
                why = (f"node {node}: label {k[:40]!r}={v[:40]!r} is not a valid label (keys "
                       "and values as in Kubernetes: [A-Za-z0-9._-], values up to 63)")  # fmt: skip
                self.refuse("agent_bad_label", why)
                return why
        return ""

    def register(self, reg: agent_pb2.Register) -> str:
        """Cleans ``reg`` in place; returns why it is refused, or ""."""
        node = reg.node_name
        problem = self.labels(dict(reg.labels), node)
        if problem:
            return problem
        keep = self.event_sets(list(reg.event_sets), node)
        del reg.event_sets[:]
        reg.event_sets.extend(dict.fromkeys(keep))
        caps = [c for c in reg.capabilities if c.event_set in self.known]
        del reg.capabilities[:]
        reg.capabilities.extend(caps)
        statuses = [s for s in reg.statuses if s.name in self.known]
        del reg.statuses[:]
        reg.statuses.extend(statuses)
        if len(reg.capabilities_json) > 256 << 10:
            reg.capabilities_json = ""
            self.refuse("agent_too_many_entries", f"node {node}: capabilities_json over 256 KiB: "
                        "dropped")  # fmt: skip
        return ""

    def statuses(self, statuses: list[types_pb2.SetStatus], node: str) -> list[types_pb2.SetStatus]:
        """The statuses of known event sets."""
        self.event_sets([s.name for s in statuses], node)
        return [s for s in statuses if s.name in self.known]

    def user_events(self, rep: types_pb2.UserEventsReport, node: str) -> dict[str, object]:
        """A NodeReport's user_events as the controller keeps and shows them: names a
        user:NAME rule could take, at most MAX_USER_EVENTS, tracers from the kernel's list;
        ``total`` is never below what is kept, so a capped list stays marked capped."""
        events: list[dict[str, object]] = []
        bad = 0
        for e in rep.events:
            if not is_user_set(USER_PREFIX + e.name):
                bad += 1
            elif len(events) < MAX_USER_EVENTS:
                used = [t for t in TRACERS if t in e.used_by]
                events.append({"name": e.name, "used_by": used, "attached": e.attached})
        if bad:
            self.refuse("agent_bad_name", f"node {node}: {bad} user_event name(s) that no "
                        "user:NAME set can take: dropped")  # fmt: skip
        if len(rep.events) - bad > MAX_USER_EVENTS:
            self.refuse("agent_too_many_entries", f"node {node}: {len(rep.events) - bad} "
                        f"user_events in one report: {MAX_USER_EVENTS} kept")  # fmt: skip
        return {
            "available": rep.available,
            "reason": rep.reason[:MAX_REASON],
            "events": events,
            "total": max(rep.total, len(events)),
        }

    def batch(self, batch: agent_pb2.ResultBatch, node: str) -> str:
        """Cleans ``batch`` in place (unknown sets, bad or over-budget names, oversized
        events dropped, each counted); returns why the whole batch is refused, or ""."""
        seen_sets: set[str] = set()
        keep = []
        for s in batch.sets:
            if s.event_set not in self.known:
                self.event_sets([s.event_set], node)
                continue
            if s.event_set in seen_sets:
                self.refuse("agent_too_many_entries", f"node {node}: event set {s.event_set} "
                            "twice in one batch: the second dropped")  # fmt: skip
                continue
            seen_sets.add(s.event_set)
            counts = [s.delivered, s.dropped, s.discarded, *s.events_by_syscall.values(),
                      *(o.count for o in s.outcomes), s.passed, s.lost, s.lost_inflight_full,
                      s.lost_inflight_stale, s.lost_deleted, s.prefix_filtered,
                      s.decode_errors, s.kernel_missed_entry, s.kernel_missed_exit]  # fmt: skip
            if max(counts) > MAX_COUNT:
                why = (f"event set {s.event_set}: a count of {max(counts)} is beyond the limit "
                       f"of {MAX_COUNT} per batch")  # fmt: skip
                self.refuse("agent_count_out_of_range", f"node {node}: {why}: batch refused")
                return why
            if (
                len(s.events_by_syscall) > MAX_SYSCALLS_PER_SET
                or len(s.outcomes) > MAX_OUTCOMES_PER_SET
            ):
                why = (
                    f"event set {s.event_set}: more than {MAX_SYSCALLS_PER_SET} syscalls or "
                    f"{MAX_OUTCOMES_PER_SET} outcomes"
                )
                self.refuse("agent_too_many_entries", f"node {node}: {why}: batch refused")
                return why
            for sc in list(s.events_by_syscall):
                if not self._name("syscall", sc, node):
                    del s.events_by_syscall[sc]
            outcomes = [o for o in s.outcomes
                        if self._name("strategy", o.strategy, node)
                        and self._name("outcome", o.outcome, node)]  # fmt: skip
            if len(outcomes) != len(s.outcomes):
                del s.outcomes[:]
                s.outcomes.extend(outcomes)
            keep.append(s)
        if len(keep) != len(batch.sets):
            copies = [type(s)() for s in keep]
            for c, s in zip(copies, keep, strict=True):
                c.CopyFrom(s)
            del batch.sets[:]
            batch.sets.extend(copies)
        if len(batch.events) > MAX_EVENTS:
            self.refuse("agent_too_many_entries", f"node {node}: {len(batch.events)} sampled "
                        f"events in one batch (limit {MAX_EVENTS}): the rest dropped")  # fmt: skip
            del batch.events[MAX_EVENTS:]
        events = []
        for ev in batch.events:
            big = len(ev.args) > MAX_ARGS or any(
                len(a.value) > MAX_ARG_VALUE for a in ev.args.values()
            )
            known = ev.event_set in self.known or (
                ev.event_set == "user" and f"{USER_PREFIX}{ev.syscall}" in self.known
            )
            # a user event's name is its "syscall": checked against the rules, not NAME
            name_ok = ev.event_set == "user" or NAME.fullmatch(ev.syscall)
            if not known or big or not name_ok:
                self.refuse("agent_too_many_entries" if big else "agent_bad_name",
                            f"node {node}: sampled event of {ev.event_set[:40]!r}/"
                            f"{ev.syscall[:40]!r} not valid: dropped")  # fmt: skip
                continue
            events.append(ev)
        if len(events) != len(batch.events):
            copies_e = [type(e)() for e in events]
            for copy, e in zip(copies_e, events, strict=True):
                copy.CopyFrom(e)
            del batch.events[:]
            batch.events.extend(copies_e)
        return ""
