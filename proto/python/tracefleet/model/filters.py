"""The filters of one event set: the one type the controller's rules and the agent's engine
both hold, and the one place they are checked.

Edges (each defined once): ``tracefleet.model.wire`` (``filters_to_pb``/``filters_from_pb``,
the API's ``tracefleet.v1.Filters``), the agent's ``kernel/kfilter.py`` (the kernel's
``struct tf_filter``), and ``to_json``/``from_json`` here (the controller's stored rules and
the agent's fail-static state file).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# The capacity of the kernel filter of an event set (bpf/include/tracefleet/events.h:
# TF_FILTER_PIDS, TF_FILTER_COMMS, TF_COMM_LEN - 1, TF_PREFIX_MAX): a value past a limit is
# refused, never truncated into a filter on the wrong process or path. Cgroup ids go to a
# BPF hash map (no slot count): bounded for the size of a rule.
MAX_PIDS, MAX_COMMS, MAX_CGROUP_IDS, MAX_PATH_PREFIXES = 8, 4, 1024, 1
MAX_COMM_BYTES, MAX_PREFIX_BYTES = 15, 64
PID_MAX_LIMIT = 4_194_304  # the kernel's highest pid
MAX_SELECTOR_TEXT = 253

_LABEL_KEY = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_./]*")
_LABEL_VALUE = re.compile(r"[-A-Za-z0-9_.]*")
LABEL_SELECTOR_SYNTAX = "use key=value, key!=value, key or !key, comma-separated"


class FilterError(ValueError):
    """A filter that cannot be applied; the message names the field and the fix."""


def parse_label_selector(
    text: str, what: str = "bad label selector"
) -> tuple[tuple[str, str, str], ...]:
    """``k=v``, ``k==v``, ``k!=v``, ``k`` (exists), ``!k`` (absent), comma-separated:
    (op, key, value) terms; FilterError naming the bad term (``what`` names the field)."""
    terms = []
    for raw in text.split(","):
        t = raw.strip()
        if not t:
            continue
        if "!=" in t:
            k, v = t.split("!=", 1)
            op = "!="
        elif "=" in t:
            k, v = t.replace("==", "=", 1).split("=", 1)
            op = "="
        elif t.startswith("!"):
            k, v, op = t[1:], "", "!"
        else:
            k, v, op = t, "", "exists"
        k, v = k.strip(), v.strip()
        if not _LABEL_KEY.fullmatch(k) or not _LABEL_VALUE.fullmatch(v):
            raise FilterError(f"{what} term {t[:40]!r}: {LABEL_SELECTOR_SYNTAX}")
        terms.append((op, k, v))
    return tuple(terms)


class PodLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class WorkloadSelector:
    """Pods a rule applies to; empty fields match anything, an empty selector is off. Each
    agent resolves it to the cgroups of its own node (rules keep the selector, not ids)."""

    namespace: str = ""
    pod: str = ""  # glob: db-*
    container: str = ""
    labels: str = ""  # label selector

    def __bool__(self) -> bool:
        return bool(self.namespace or self.pod or self.container or self.labels)

    def check(self) -> None:
        for what, v in (("namespace", self.namespace), ("pod", self.pod),
                        ("container", self.container), ("pod selector", self.labels)):  # fmt: skip
            if len(v) > MAX_SELECTOR_TEXT or not v.isprintable():
                raise FilterError(
                    f"{what} {v[:40]!r}: up to {MAX_SELECTOR_TEXT} printable characters"
                )
        parse_label_selector(self.labels, "pod selector")

    def matches(self, pod: PodLike, container: str) -> bool:
        if self.namespace and pod.namespace != self.namespace:
            return False
        if self.pod and not fnmatch.fnmatchcase(pod.name, self.pod):
            return False
        if self.container and container != self.container:
            return False
        for op, k, v in parse_label_selector(self.labels):
            have = pod.labels.get(k)
            ok = {"=": have == v, "!=": have != v, "exists": have is not None, "!": have is None}
            if not ok[op]:
                return False
        return True


_ANY_WORKLOAD = WorkloadSelector()


@dataclass(frozen=True)
class Filters:
    """In-kernel filters of one event set. An empty field does not filter; the items of a
    field are ORed, the fields ANDed."""

    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()
    cgroup_ids: tuple[int, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    workload: WorkloadSelector = field(default=_ANY_WORKLOAD)  # resolved by each agent
    follow: bool = False  # pids include their descendants, followed in the kernel

    def problem(self) -> str:
        """Why these filters cannot be applied (naming the field and the fix), or ""."""
        try:
            self.check()
        except FilterError as e:
            return str(e)
        return ""

    def check(self) -> None:
        """FilterError unless every value fits the kernel filter as it is (never truncated)."""
        for what, items, limit in (
            ("pids", self.pids, MAX_PIDS),
            ("comms", self.comms, MAX_COMMS),
            ("cgroup ids", self.cgroup_ids, MAX_CGROUP_IDS),
            ("path prefixes", self.path_prefixes, MAX_PATH_PREFIXES),
        ):
            if len(items) > limit:
                raise FilterError(f"at most {limit} {what} per rule (got {len(items)})")
        for p in self.pids:
            if isinstance(p, bool) or not 1 <= p <= PID_MAX_LIMIT:
                raise FilterError(f"pids must be 1..{PID_MAX_LIMIT}, got {p}")
        for c in self.cgroup_ids:
            if isinstance(c, bool) or not 1 <= c < 2**64:
                raise FilterError(f"cgroup ids must be 1..2^64-1, got {c}")
        for m in self.comms:
            if not 1 <= len(m.encode()) <= MAX_COMM_BYTES or not m.isprintable():
                raise FilterError(
                    f"comm {m[:40]!r}: 1..{MAX_COMM_BYTES} printable bytes (the kernel's comm)"
                )
        for pfx in self.path_prefixes:
            if not pfx.startswith("/") or len(pfx.encode()) > MAX_PREFIX_BYTES or "\0" in pfx:
                raise FilterError(
                    f"path prefix {pfx[:40]!r}: an absolute path of up to {MAX_PREFIX_BYTES} bytes"
                )
        if self.follow and not self.pids:
            raise FilterError("--follow follows the processes of --pid: add --pid P")
        self.workload.check()

    def to_json(self) -> dict[str, Any]:
        """The stored form (controller rules, agent state file). The selector's keys only when
        set, so a rule without one reads back unchanged in a controller older than them."""
        out: dict[str, Any] = {
            "pids": list(self.pids),
            "comms": list(self.comms),
            "cgroup_ids": list(self.cgroup_ids),
            "path_prefixes": list(self.path_prefixes),
        }
        w = self.workload
        for k, v in (("namespace", w.namespace), ("pod", w.pod), ("container", w.container),
                     ("pod_labels", w.labels), ("follow", self.follow)):  # fmt: skip
            if v:
                out[k] = v
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Filters:
        """Reads ``to_json``'s form, and the agent state file of the previous version (the
        dataclass as a dict: the selector nested under "workload"). Unknown keys (a newer
        writer's) are ignored."""
        nested = d.get("workload") or {}
        if not isinstance(nested, Mapping):
            raise FilterError(f"workload {str(nested)[:40]!r}: an object of selector fields")

        def text(flat: str, old: str) -> str:
            return str(d.get(flat, "") or nested.get(old, ""))

        return cls(
            pids=tuple(int(p) for p in d.get("pids", ())),
            comms=tuple(str(c) for c in d.get("comms", ())),
            cgroup_ids=tuple(int(c) for c in d.get("cgroup_ids", ())),
            path_prefixes=tuple(str(p) for p in d.get("path_prefixes", ())),
            workload=WorkloadSelector(
                namespace=text("namespace", "namespace"),
                pod=text("pod", "pod"),
                container=text("container", "container"),
                labels=text("pod_labels", "labels"),
            ),
            follow=bool(d.get("follow", False)),
        )


NO_FILTERS = Filters()  # the default of a set's filters (a frozen value, shared)
