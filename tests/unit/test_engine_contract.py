"""CaptureEngine is the whole contract between an engine and its callers (controller client,
metrics collector): every engine implements it, the user_events wrapper hands every member to
its inner engine, and what an engine without user_events answers keeps the client's node
report off. mypy --strict (``make lint``) checks each call against the contract; these check
the engines at run time, BpfEngine included (no root needed: nothing is instantiated)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.loadgen import SyntheticEngine
from tests.unit.controller_helpers import InProcessController
from tests.unit.controller_helpers import wait_until as _wait_until
from tests.unit.test_metrics_exposition import FakeProgramsEngine
from tracefleet.agent import metrics as am
from tracefleet.agent.capture.bpfengine import BpfEngine
from tracefleet.agent.capture.engine import CaptureEngine, EventSetConfig
from tracefleet.agent.capture.userevents import UserEventsEngine
from tracefleet.agent.control.client import ClientOptions, run_agent

ENGINES = (BpfEngine, UserEventsEngine, SyntheticEngine)
FAST = ClientOptions(interval=0.1, backoff_initial=0.05, backoff_max=0.3, agent_version="test")


def _members() -> set[str]:
    return {n for n in vars(CaptureEngine) if not n.startswith("_")}


@pytest.mark.parametrize("cls", ENGINES, ids=lambda c: c.__name__)
def test_every_engine_implements_the_contract(cls: type) -> None:
    assert issubclass(cls, CaptureEngine)
    assert not cls.__abstractmethods__, f"{cls.__name__} does not implement them"


def test_the_user_events_wrapper_delegates_every_member() -> None:
    """A member the wrapper does not define would answer the contract's default (no errors,
    no kernel counters, healthy) instead of the inner engine's, silently."""
    missing = sorted(_members() - set(vars(UserEventsEngine)))
    assert not missing, f"UserEventsEngine must hand these to its inner engine: {missing}"


def _scrape(engine: CaptureEngine) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(am.AgentCollector(engine, "node-a"))
    return generate_latest(reg).decode()


def test_metrics_through_the_user_events_wrapper_are_the_inner_engines(tmp_path: Path) -> None:
    """No user set enabled: /metrics of the wrapper is exactly its inner engine's (kernel
    skips, record errors, fallback refusals, attribution, BPF programs, statuses)."""
    inner = FakeProgramsEngine(20000.0, seed=3)
    inner.apply({n: EventSetConfig(n, True) for n in ("file", "net")})
    inner.collect()
    wrapped = UserEventsEngine(inner, tracefs=tmp_path)
    text = _scrape(inner)
    assert "tracefleet_agent_bpf_runs_missed_total" in text
    assert "tracefleet_agent_attribution_unknown_total" in text
    assert 'tracefleet_agent_exe_unknown_total{cause="no-mm",node="node-a"} 4.0' in text
    assert _scrape(wrapped) == text


class CountingEngine(SyntheticEngine):
    def __init__(self) -> None:
        super().__init__(rate=0, seed=1)
        self.collects = 0

    def collect(self) -> Any:
        self.collects += 1
        return super().collect()


@pytest.mark.parametrize("user_events", [False, True], ids=["plain", "user_events"])
def test_node_report_only_from_an_engine_with_user_events(
    user_events: bool, tmp_path: Path
) -> None:
    """An engine whose user_events_report() is None sends no NodeReport (the Ack carries its
    statuses); the user_events wrapper sends one."""
    inner = CountingEngine()
    engine: CaptureEngine = UserEventsEngine(inner, tracefs=tmp_path) if user_events else inner
    (tmp_path / "user_events_status").write_text("\nActive: 0\nBusy: 0\n")
    ctl = InProcessController()
    reports: list[Any] = []
    on_report = ctl.controller.on_report

    def counted(node: Any, report: Any) -> None:
        reports.append(report)
        on_report(node, report)

    ctl.controller.on_report = counted  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(
        target=run_agent, args=(engine, ctl.address, "n-1", {"role": "web"}, stop, FAST)
    )
    t.start()
    try:
        _wait_until(lambda: ctl.controller.fleet.nodes.get("n-1"), what="register")
        ctl.call(ctl.controller.configure, "file", True, "role=web")
        # each tick refreshes the report before it collects: 5 collections, 5 refreshes
        _wait_until(lambda: inner.collects >= 5, what="five collection ticks")
        if user_events:
            _wait_until(lambda: reports, what="a node report")
        assert bool(reports) == user_events
    finally:
        stop.set()
        t.join(timeout=10)
        ctl.stop()
