"""Node selectors: ``all``, ``role=db,zone=a``, ``node=web-1|web-2``, ``zone!=b``.

A selector is a comma-separated list of requirements that must all hold. A requirement is
``key=value`` (the label equals one of the ``|``-separated values) or ``key!=value`` (it
equals none of them; a missing label counts as not equal). The key ``node`` matches the node
name. ``all``, ``*`` and the empty string select every node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

NODE_KEY = "node"
_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")
_EXAMPLES = "e.g. role=db, role=db,zone=a, node=web-1|web-2, zone!=b or all"


class SelectorError(ValueError):
    """A malformed selector; the message says what is wrong and how to write it."""


@dataclass(frozen=True)
class Requirement:
    key: str
    values: frozenset[str]
    negated: bool = False

    def matches(self, node_name: str, labels: Mapping[str, str]) -> bool:
        actual = node_name if self.key == NODE_KEY else labels.get(self.key)
        hit = actual is not None and actual in self.values
        return not hit if self.negated else hit

    def __str__(self) -> str:
        op = "!=" if self.negated else "="
        return f"{self.key}{op}{'|'.join(sorted(self.values))}"


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    @property
    def selects_all(self) -> bool:
        return not self.requirements

    def matches(self, node_name: str, labels: Mapping[str, str]) -> bool:
        return all(r.matches(node_name, labels) for r in self.requirements)

    def __str__(self) -> str:
        """Canonical text: requirements sorted, so equal selectors compare equal as text."""
        if not self.requirements:
            return "all"
        return ",".join(sorted(str(r) for r in self.requirements))


ALL = Selector()


MAX_SELECTOR = 4096  # characters


def parse(text: str) -> Selector:
    """Parse a selector; raise SelectorError with a one-line cause and fix."""
    if len(text) > MAX_SELECTOR:
        raise SelectorError(
            f"selector of {len(text)} characters: at most {MAX_SELECTOR}; select by a label "
            "(role=db) rather than by listing nodes"
        )
    stripped = text.strip()
    if stripped in ("", "all", "*"):
        return ALL
    requirements: list[Requirement] = []
    for raw in stripped.split(","):
        term = raw.strip()
        if not term:
            raise SelectorError(
                f"empty requirement in selector {text!r}: remove the extra comma ({_EXAMPLES})"
            )
        if term in ("all", "*"):
            raise SelectorError(f"'all' cannot be combined with other requirements in {text!r}")
        if "!=" in term:
            key, _, value = term.partition("!=")
            negated = True
        elif "=" in term:
            key, _, value = term.partition("=")
            if value.startswith("="):
                value = value[1:]  # accept key==value
            negated = False
        else:
            raise SelectorError(
                f"selector requirement {term!r} has no '=': write key=value, "
                f"node=NAME for a node name, or all ({_EXAMPLES})"
            )
        key, value = key.strip(), value.strip()
        if not _KEY.match(key):
            raise SelectorError(
                f"bad label key {key!r} in selector {text!r}: keys are letters, digits and "
                f"_ . / - ({_EXAMPLES})"
            )
        values = [v.strip() for v in value.split("|")]
        for v in values:
            if not v or not _VALUE.match(v):
                raise SelectorError(
                    f"bad value {v!r} for {key!r} in selector {text!r}: values are letters, "
                    f"digits and _ . : / @ + -, alternatives separated by | ({_EXAMPLES})"
                )
        requirements.append(Requirement(key, frozenset(values), negated))
    return Selector(tuple(requirements))
