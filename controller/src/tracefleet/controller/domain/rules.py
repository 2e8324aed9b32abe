"""Rules (one per event set) and the desired state they imply for one node.

``tracefleet enable file --selector role=db`` stores the rule of the event set ``file``; a later
call for ``file`` replaces it. A node's desired state lists every event set that has a rule:
enabled where the rule is enabled, not expired, its selector matches the node and the node is
in the rule's canary share; disabled otherwise.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tracefleet.controller.common import selector as sel
from tracefleet.model.filters import NO_FILTERS, Filters

# Event sets the controller accepts even before an agent registered them.
KNOWN_EVENT_SETS: tuple[str, ...] = ("exec", "file", "net", "vfs")

# Application events (user_events): one set per event, "user:NAME". The name is the kernel's
# (letters, digits, '_'), bounded so the set name fits MAX_EVENT_SET_NAME; the controller
# keeps at most MAX_USER_SETS of them (each is a rule, a status row and a metric label).
USER_PREFIX = "user:"
USER_SET = re.compile(r"user:[A-Za-z_][A-Za-z0-9_]{0,58}")
MAX_USER_SETS = 64


def is_user_set(name: str) -> bool:
    return USER_SET.fullmatch(name) is not None


@dataclass(frozen=True)
class Rule:
    event_set: str
    enabled: bool
    selector: str = "all"  # canonical text (selector.parse(...).__str__())
    filters: Filters = NO_FILTERS
    canary_percent: int = 0  # 0 or 100 = every selected node
    sample_rate: float = 0.0
    expires_at: float | None = None  # unix seconds
    expired: bool = False  # the TTL switched the rule off
    generation: int = 0  # fleet generation at which the rule last changed
    export: tuple[str, ...] = ()  # agents' exporters that get every event of the set
    _parsed: sel.Selector = field(default=sel.ALL, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parsed", sel.parse(self.selector))

    @property
    def active(self) -> bool:
        return self.enabled and not self.expired

    def same_intent(self, other: Rule) -> bool:
        """True if applying ``other`` would not change any node's desired state."""
        return (
            self.active == other.active
            and (not self.active or self.selector == other.selector)
            and (not self.active or self.filters == other.filters)
            and (not self.active or _share(self.canary_percent) == _share(other.canary_percent))
            and (not self.active or self.sample_rate == other.sample_rate)
            and (not self.active or self.export == other.export)
        )

    def selects(self, node_name: str, labels: Mapping[str, str]) -> bool:
        return self._parsed.matches(node_name, labels)

    def applies_to(self, node_name: str, labels: Mapping[str, str]) -> bool:
        return (
            self.active
            and self.selects(node_name, labels)
            and in_canary(node_name, self.canary_percent)
        )

    def with_changes(self, **changes: Any) -> Rule:
        return replace(self, **changes)


def _share(percent: int) -> int:
    return 100 if percent in (0, 100) else percent


def canary_bucket(node_name: str) -> int:
    """A stable bucket 0..99 of a node: the same node is always in the same canary share,
    whatever other nodes exist."""
    digest = hashlib.sha256(node_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def in_canary(node_name: str, percent: int) -> bool:
    share = _share(percent)
    return share >= 100 or canary_bucket(node_name) < share  # no hash for a whole fleet


@dataclass(frozen=True)
class SetState:
    """Desired state of one event set on one node."""

    name: str
    enabled: bool
    filters: Filters = NO_FILTERS
    sample_rate: float = 0.0
    export: tuple[str, ...] = ()


def desired_for_node(
    rules: Iterable[Rule], node_name: str, labels: Mapping[str, str]
) -> list[SetState]:
    out = []
    for rule in sorted(rules, key=lambda r: r.event_set):
        if rule.applies_to(node_name, labels):
            out.append(SetState(rule.event_set, True, rule.filters, rule.sample_rate, rule.export))
        else:
            out.append(SetState(rule.event_set, False))
    return out
