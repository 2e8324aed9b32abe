"""The controller's policy file (``--policy FILE``, YAML or JSON)::

    allow:                      # when present, enabling anything not allowed here is refused
      - event_set: exec
        selector: "role=db"     # enable exec only on nodes with role=db
      - event_set: file         # no selector: any node
    redact:                     # regexes added to the default rules (agent and controller)
      - '--pin=(\\S+)'          # groups: only the groups become ***
      - pattern: '(?i)otp \\S+'   # no group: the whole match becomes ***
    redact_relax: [url]         # default rules to drop (redaction.DEFAULT_RULES: flag, env,
                                # header, bearer, url)

A ConfigureEventSet that enables a set is allowed when its selector is provably within an
allow entry of that set, for every node present or future: each requirement of the entry's
selector is implied by a requirement of the request (``role=db,zone=a`` is within ``role=db``;
``node=db-1`` is not, since node db-1 may lose the label). Disabling is always allowed.
Without an ``allow`` key every enable is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tracefleet.controller.common import env
from tracefleet.controller.common import selector as sel
from tracefleet.controller.common.configfile import load_yaml_or_json
from tracefleet.controller.domain.redaction import DEFAULT_RULES, default_patterns

POLICY_FILE_ENV = env.POLICY_FILE


class PolicyError(Exception):
    pass


@dataclass(frozen=True)
class AllowEntry:
    event_set: str  # "*" = any
    selector: sel.Selector


@dataclass(frozen=True)
class Policy:
    allow: tuple[AllowEntry, ...] | None = None  # None = no allow-list
    redact: tuple[str, ...] = default_patterns()  # effective: defaults - relaxed + added
    source: str = ""

    def check(self, event_set: str, enabled: bool, selector_text: str) -> str | None:
        """None if allowed, else a one-line reason."""
        if not enabled or self.allow is None:
            return None
        try:
            wanted = sel.parse(selector_text)
        except sel.SelectorError:
            return None  # the controller rejects it as INVALID_ARGUMENT
        entries = [e for e in self.allow if e.event_set in (event_set, "*")]
        for e in entries:
            if within(wanted, e.selector):
                return None
        if not entries:
            return f"policy does not allow enabling {event_set!r} on any node"
        allowed = " or ".join(repr(str(e.selector)) for e in entries)
        return (
            f"policy allows {event_set!r} only on nodes matching {allowed}; selector "
            f"{str(wanted)!r} may select others (add those requirements to --selector)"
        )


def _implies(have: sel.Requirement, need: sel.Requirement) -> bool:
    if have.key != need.key:
        return False
    if not have.negated and not need.negated:
        return have.values <= need.values
    if have.negated and need.negated:
        return need.values <= have.values
    if not have.negated and need.negated:
        return not (have.values & need.values)
    return False


def within(wanted: sel.Selector, allowed: sel.Selector) -> bool:
    """True if every node ``wanted`` selects is selected by ``allowed``."""
    return all(any(_implies(h, n) for h in wanted.requirements) for n in allowed.requirements)


def parse_policy(data: object, source: str = "") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PolicyError(
            f"policy {source}: expected a mapping with 'allow', 'redact', 'redact_relax'"
        )
    unknown = set(data) - {"allow", "redact", "redact_relax"}
    if unknown:
        keys = ", ".join(sorted(map(str, unknown)))
        raise PolicyError(
            f"policy {source}: unknown key(s) {keys}; use allow, redact and redact_relax"
        )
    relax = data.get("redact_relax") or []
    if not isinstance(relax, list) or not set(map(str, relax)) <= set(DEFAULT_RULES):
        raise PolicyError(
            f"policy {source}: redact_relax must be a list of default rule names "
            f"({', '.join(DEFAULT_RULES)}), got {relax!r}"
        )
    allow: tuple[AllowEntry, ...] | None = None
    if "allow" in data:
        entries = []
        for i, item in enumerate(data["allow"] or []):
            if not isinstance(item, Mapping) or not item.get("event_set"):
                raise PolicyError(
                    f"policy {source}: allow[{i}] needs event_set (and optionally selector)"
                )
            try:
                s = sel.parse(str(item.get("selector") or ""))
            except sel.SelectorError as e:
                raise PolicyError(f"policy {source}: allow[{i}]: {e}") from None
            entries.append(AllowEntry(str(item["event_set"]), s))
        allow = tuple(entries)
    patterns: list[str] = list(default_patterns(map(str, relax)))
    for i, item in enumerate(data.get("redact") or []):
        pattern = item.get("pattern") if isinstance(item, Mapping) else item
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(
                f"policy {source}: redact[{i}] must be a regex string or {{pattern: ...}}"
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise PolicyError(f"policy {source}: redact[{i}] {pattern!r}: {e}") from None
        patterns.append(pattern)
    return Policy(allow, tuple(patterns), source)


def load_policy(path: str | Path) -> Policy:
    return parse_policy(load_yaml_or_json(path, "policy file", PolicyError), str(path))
