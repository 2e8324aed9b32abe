"""The capture ladder: load an event set with the best strategy this kernel accepts.

Rungs, best first: ``sleepable`` (sleepable program on the faultable syscall tracepoint),
``fentry-sleepable`` (fentry.s on the syscall function), ``exit-retry`` (nofault read at
entry, retried at exit), ``nofault`` (nofault read only). The user-space fallback is added by
the engine on top of the non-sleepable rungs. A rung is taken only if its programs both load
(verifier) and attach; otherwise the reason is recorded and the next rung is tried, so one
refused program never takes the agent, or the other event sets, down.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracefleet.agent._internal import libbpf
from tracefleet.agent._internal.abi import Strategy, TfConfig
from tracefleet.agent.eventsets import EventSetSpec, KernelHook

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


def explain(err: libbpf.LibbpfError) -> str:
    """One line: why a rung failed (errno, and the telling verifier or libbpf line)."""
    lines: list[str] = []
    for log in err.verifier_logs.values():
        lines += [ln.strip() for ln in log.splitlines() if ln.strip()]
    lines += libbpf.recent_messages()[-8:]
    telling = [ln for ln in lines if _INTERESTING.search(ln)]
    pick = telling[-1] if telling else (lines[-1] if lines else "")
    pick = re.sub(r"^libbpf: ", "", pick)
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
) -> LoadedSet:
    """Walk ``strategies`` in order; return the first that loads and attaches (then detached,
    so the caller decides when it runs). Raises LadderExhausted with every reason."""
    attempts: list[Attempt] = []
    for strategy in strategies:
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
            loaded.attach()  # proves the kernel lets these programs run here
            loaded.detach()
            note = "".join(f"; {op} not hooked: {why}" for op, why in sorted(by_op.items()))
            attempts.append(Attempt(strategy.label, True, "loaded and attached" + note))
            return loaded
        except libbpf.LibbpfError as e:
            attempts.append(Attempt(strategy.label, False, explain(e)))
            if obj is not None:
                obj.close()
    raise LadderExhausted(spec.name, attempts)
