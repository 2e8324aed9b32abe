"""The capture ladder: load an event set with the best strategy this kernel accepts.

Rungs, best first: ``sleepable`` (sleepable program on the faultable syscall tracepoint),
``fentry-sleepable`` (fentry.s on the syscall function), ``exit-retry`` (nofault read at
entry, retried at exit), ``nofault`` (nofault read only). The user-space fallback is added by
the engine on top of the non-sleepable rungs. A rung is taken only if its programs both load
(verifier) and attach; otherwise the reason is recorded and the next rung is tried, so one
refused program never takes the agent, or the other event sets, down.

What the kernel allows is learnt once from tiny purpose-built programs (``bpf/probe.bpf.c``,
one per feature a rung needs, each loaded alone and attached to one hook: milliseconds),
so a set is loaded only at the best rung the probes allow, and only when first used.
Verifying a whole set costs up to seconds, and detaching its ~40 syscall tracepoints as
many RCU grace periods; the real load still falls down the ladder if the probes were wrong.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracefleet.agent.capture.eventsets import EventSetSpec, KernelHook
from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import Strategy, TfConfig

LADDER: tuple[Strategy, ...] = (
    Strategy.SLEEPABLE,
    Strategy.FENTRY_SLEEPABLE,
    Strategy.EXIT_RETRY,
    Strategy.NOFAULT,
)
KERNEL_STRATEGIES = {*LADDER, Strategy.USER_FALLBACK}


@dataclass(frozen=True)
class SharedMaps:
    """fds of the maps every object shares: enable bits and filters, ring buffer, counters."""

    control: int
    events: int
    stats: int
    cgroups: int = -1  # workload filter: cgroup id -> sets (created by the engine)
    follow: int = -1  # followed tgids -> sets
    exes: int = -1  # executable identity -> path (tf_exes; created by the engine)


@dataclass(frozen=True)
class Attempt:
    strategy: str
    ok: bool
    reason: str


class LadderExhausted(RuntimeError):
    def __init__(self, set_name: str, attempts: list[Attempt]):
        self.attempts = attempts
        detail = "; ".join(f"{a.strategy}: {a.reason}" for a in attempts)
        super().__init__(f"event set {set_name!r}: no capture strategy loads here ({detail})")


@dataclass
class LoadedSet:
    spec: EventSetSpec
    obj: libbpf.BpfObject
    strategy: Strategy
    attempts: list[Attempt]
    links: list[libbpf.Link] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)  # loaded (default: the strategy's)
    skipped: dict[str, str] = field(default_factory=dict)  # operation -> why not hooked

    def __post_init__(self) -> None:
        if not self.programs:
            self.programs = self.spec.programs(self.strategy)

    @property
    def attached(self) -> bool:
        return bool(self.links)

    def attach(self) -> None:
        if self.links:
            return
        links: list[libbpf.Link] = []
        try:
            for name in self.programs:
                links.append(self.obj.programs[name].attach())
        except BaseException:
            for link in links:
                link.destroy()
            raise
        self.links = links

    def detach(self) -> None:
        for link in self.links:
            link.destroy()
        self.links = []

    def map_fd(self, name: str) -> int:
        return self.obj.maps[name].fd

    def program_fds(self) -> dict[str, int]:
        return {n: self.obj.programs[n].fd for n in self.programs}

    def close(self) -> None:
        self.detach()
        self.obj.close()


_INTERESTING = re.compile(
    r"can be sleepable|not allowed|unknown func|invalid|denied|R\d+ |"
    r"program of this type cannot use helper|Unsupported|failed to find"
)
# libbpf lines that only repeat the errno, or guess wrong (memlock is not charged to
# RLIMIT_MEMLOCK since Linux 5.11: the "ulimit -l" hint misleads on every kernel we run on)
_NOISE = re.compile(
    r"failed to load object|failed to load: -\d+|BPF program load failed|"
    r"permission error while running as root|-- (BEGIN|END) PROG LOAD LOG --|"
    r"^processed \d+ insns|^verification time|^stack depth|^mark_precise|"
    r"found \d+ CO-RE relocations|relo #\d+|skipped loading|found (map|data map|extern)"
)


def _verifier_words(log: str) -> str:
    """The verifier's reason: its last line before the statistics it prints at the end."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not _NOISE.search(ln)]
    telling = [ln for ln in lines if _INTERESTING.search(ln)]
    return (telling or lines or [""])[-1]


def explain(err: libbpf.LibbpfError, since: int | None = None) -> str:
    """One line: why a load or attach failed, in the kernel's words: the errno and the
    verifier's reason, else libbpf's own telling line; an empty verifier log on EPERM means
    the kernel refused the program before verifying it (a host policy)."""
    pick = ""
    for log in err.verifier_logs.values():
        pick = _verifier_words(log) or pick
    if not pick:
        msgs = [re.sub(r"^libbpf: ", "", m) for m in libbpf.recent_messages(since)[-12:]]
        msgs = [m for m in msgs if not _NOISE.search(m)]
        telling = [m for m in msgs if _INTERESTING.search(m)]
        pick = telling[-1] if telling else ""
    if not pick and err.errno == errno.EPERM and "load" in err.what:
        pick = (
            "refused before verification, empty verifier log: a host policy forbids "
            "this program type"
        )
    return f"{err.strerror}" + (f" ({pick[:200]})" if pick else "")


def unhookable(spec: EventSetSpec, strategy: Strategy) -> dict[KernelHook, str]:
    """Kernel hooks of ``strategy`` this kernel cannot take, with why: the function is
    missing, or its parameters are not where the programs read them (a changed signature).
    Only rungs that attach to kernel functions (fentry) have any."""
    if strategy != Strategy.FENTRY or not spec.kernel_hooks:
        return {}
    out: dict[KernelHook, str] = {}
    try:
        btf = libbpf.KernelBtf()
    except libbpf.LibbpfError as e:
        return {h: f"kernel BTF unreadable: {e}" for h in spec.kernel_hooks}
    with btf:
        for hook in spec.kernel_hooks:
            params = btf.func_params(hook.function)
            if params is None:
                why = f"{hook.function}() is not in this kernel"
            else:
                wrong = [
                    f"parameter {i} is {params[i] if i < len(params) else 'absent'!r}, "
                    f"expected {name!r}"
                    for i, name in hook.params
                    if i >= len(params) or params[i] != name
                ]
                if not wrong:
                    continue
                why = f"{hook.function}() has another signature ({'; '.join(wrong)})"
            out[hook] = why
    return out


# ---- feature probes -------------------------------------------------------------------

PROBE_OBJECT = "probe.bpf.o"


@dataclass(frozen=True)
class FeatureProbe:
    """One program of bpf/probe.bpf.c: what it proves, and the hook it attaches to."""

    feature: str
    program: str
    hook: str
    sleepable: bool = False


FEATURE_PROBES: tuple[FeatureProbe, ...] = (
    FeatureProbe("tracepoint", "probe_tracepoint", "tracepoint syscalls/sys_enter_acct"),
    FeatureProbe("sleepable-tracepoint", "probe_sleepable", "tracepoint syscalls/sys_enter_acct",
                 sleepable=True),
    FeatureProbe("fentry-sleepable", "probe_fentry_sleepable", "fentry.s on the acct syscall"),
    FeatureProbe("fentry", "probe_fentry", "fexit/vfs_truncate"),
    FeatureProbe("d_path", "probe_d_path", "fentry/security_file_open with bpf_d_path"),
)  # fmt: skip

# the features each rung needs (vfs's `fentry` hook resolves open's path with bpf_d_path)
RUNG_NEEDS: dict[Strategy, tuple[str, ...]] = {
    Strategy.SLEEPABLE: ("sleepable-tracepoint",),
    Strategy.FENTRY_SLEEPABLE: ("fentry-sleepable",),
    Strategy.EXIT_RETRY: ("tracepoint",),
    Strategy.USER_FALLBACK: ("tracepoint",),
    Strategy.NOFAULT: ("tracepoint",),
    Strategy.FENTRY: ("fentry", "d_path"),
    Strategy.TRACEPOINT: ("tracepoint",),
}


@dataclass(frozen=True)
class ProbeResult:
    feature: str
    ok: bool
    reason: str  # "loaded and attached to <hook>", or the kernel's or verifier's words
    ms: float


def features_for(strategies: Sequence[Strategy]) -> list[str]:
    """The features ``strategies`` need, in ladder order: what to probe before loading a set
    (the vfs hooks' fentry and d_path probes are of no use to `capture -e file`)."""
    out: list[str] = []
    for strategy in strategies:
        out += [f for f in RUNG_NEEDS.get(strategy, ()) if f not in out]
    return out


def probe_features(bpf_dir: Path, features: Sequence[str] | None = None) -> dict[str, ProbeResult]:
    """Load each feature probe (of ``features``; default all) alone and attach it to its one
    hook (then detach). A missing probe object (built before it existed) returns {}: every
    rung is then tried for real."""
    path = bpf_dir / PROBE_OBJECT
    if not path.exists():
        return {}
    out: dict[str, ProbeResult] = {}
    # refusals are expected answers here, not warnings: keep libbpf's lines for explain()
    # but do not print them
    quiet = logging.getLogger("tracefleet.agent.libbpf")
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        for fp in FEATURE_PROBES:
            if features is None or fp.feature in features:
                out[fp.feature] = _probe(path, fp)
    finally:
        quiet.setLevel(level)
    return out


def _probe(path: Path, fp: FeatureProbe) -> ProbeResult:
    """Load one probe program alone, attach it to its hook, detach: ok, or why not."""
    t0 = time.monotonic()
    since = libbpf.message_count()
    obj = None
    try:
        obj = libbpf.BpfObject(str(path))
        for name, prog in obj.programs.items():
            prog.autoload = name == fp.program
        if fp.sleepable:
            obj.programs[fp.program].set_flags(libbpf.BPF_F_SLEEPABLE)
        obj.load()
        link = obj.programs[fp.program].attach()
        # detaching from a syscall tracepoint waits out an RCU grace period (70-90 ms here,
        # a third of capture's probing) and nothing waits for it: done beside the start-up
        threading.Thread(target=link.destroy, name="tf-probe-detach", daemon=True).start()
        ok, reason = True, f"loaded and attached to {fp.hook}"
    except libbpf.LibbpfError as e:  # the probe object's name says nothing: drop it
        ok, reason = False, explain(e, since).removeprefix(f"{e.what}: ")
    finally:
        if obj is not None:
            obj.close()
    return ProbeResult(fp.feature, ok, reason, (time.monotonic() - t0) * 1e3)


def refused_by_probes(strategy: Strategy, probes: Mapping[str, ProbeResult]) -> str:
    """Why the probes say ``strategy`` cannot load here ("" if they allow it, or if there
    were no probes)."""
    for f in RUNG_NEEDS.get(strategy, ()):
        if f in probes and not probes[f].ok:  # the first refusal says why
            return f"{f} probe: {probes[f].reason}"
    return ""


def plan(
    strategies: Sequence[Strategy], probes: Mapping[str, ProbeResult]
) -> tuple[Strategy | None, list[Attempt]]:
    """The best rung the probes allow, and the better rungs they refused (with why)."""
    refused: list[Attempt] = []
    for strategy in strategies:
        why = refused_by_probes(strategy, probes)
        if not why:
            return strategy, refused
        refused.append(Attempt(strategy.label, False, why))
    return None, refused


def open_configured(
    spec: EventSetSpec,
    bpf_dir: Path,
    strategy: Strategy,
    shared: SharedMaps,
    *,
    agent_tgid: int,
    wakeup_bytes: int,
    inflight_entries: int,
    skip: Sequence[str] = (),
) -> libbpf.BpfObject:
    """Open the set's object with only ``strategy``'s programs enabled and settings in place."""
    obj = libbpf.BpfObject(str(bpf_dir / spec.object_file))
    try:
        wanted = set(spec.programs(strategy)) - set(skip)
        missing = wanted - set(obj.programs)
        if missing:
            raise libbpf.LibbpfError(2, f"{spec.object_file} lacks programs {sorted(missing)}")
        for name, prog in obj.programs.items():
            prog.autoload = name in wanted
            if name in wanted and strategy == Strategy.SLEEPABLE and name.startswith("tps_"):
                prog.set_flags(libbpf.BPF_F_SLEEPABLE)
        cfg = TfConfig(agent_tgid=agent_tgid, strategy=int(strategy), wakeup_bytes=wakeup_bytes)
        rodata = obj.rodata_map().initial_value()
        rodata[: ctypes.sizeof(cfg)] = bytes(cfg)
        obj.maps["tf_control"].reuse_fd(shared.control)
        obj.maps["tf_events"].reuse_fd(shared.events)
        obj.maps["tf_stats"].reuse_fd(shared.stats)
        for mname, mfd in (("tf_cgroups", shared.cgroups), ("tf_follow", shared.follow),
                           ("tf_exes", shared.exes)):  # fmt: skip
            if mfd >= 0 and mname in obj.maps:
                obj.maps[mname].reuse_fd(mfd)
        if spec.inflight_map:
            obj.maps[spec.inflight_map].set_max_entries(inflight_entries)
    except BaseException:
        obj.close()
        raise
    return obj


def load_set(
    spec: EventSetSpec,
    bpf_dir: Path,
    shared: SharedMaps,
    *,
    strategies: Sequence[Strategy] = LADDER,
    agent_tgid: int,
    wakeup_bytes: int,
    inflight_entries: int = 4096,
    probes: Mapping[str, ProbeResult] | None = None,
    keep_attached: bool = False,
) -> LoadedSet:
    """Walk ``strategies`` in order, skipping the rungs ``probes`` refused; return the first
    that loads and attaches. With ``keep_attached`` every program is attached and stays so
    (the set is being enabled); otherwise one program is attached and detached again, as
    proof. Raises LadderExhausted with every reason."""
    attempts: list[Attempt] = []
    for strategy in strategies:
        if probes and (why := refused_by_probes(strategy, probes)):
            attempts.append(Attempt(strategy.label, False, why))
            continue
        # the user-fallback rung runs nofault programs under it
        kernel = Strategy.NOFAULT if strategy == Strategy.USER_FALLBACK else strategy
        obj = None
        hooks = unhookable(spec, kernel)
        by_op = {h.op: why for h, why in hooks.items()}
        skip = {p for h in hooks for p in h.programs}
        programs = [p for p in spec.programs(kernel) if p not in skip]
        if not programs:
            reasons = sorted(f"{op}: {why}" for op, why in by_op.items())
            attempts.append(Attempt(strategy.label, False, "; ".join(reasons) or "no programs"))
            continue
        since = libbpf.message_count()
        try:
            obj = open_configured(
                spec,
                bpf_dir,
                kernel,
                shared,
                agent_tgid=agent_tgid,
                wakeup_bytes=wakeup_bytes,
                inflight_entries=inflight_entries,
                skip=sorted(skip),
            )
            obj.load()
            loaded = LoadedSet(spec, obj, kernel, attempts, programs=programs, skipped=by_op)
            if keep_attached:
                loaded.attach()
            else:  # one program proves the kernel lets this rung run here
                obj.programs[programs[0]].attach().destroy()
            note = "".join(f"; {op} not hooked: {why}" for op, why in sorted(by_op.items()))
            attempts.append(Attempt(strategy.label, True, "loaded and attached" + note))
            return loaded
        except libbpf.LibbpfError as e:
            attempts.append(Attempt(strategy.label, False, explain(e, since)))
            if obj is not None:
                obj.close()
    raise LadderExhausted(spec.name, attempts)
