"""The agent's and the controller's /metrics: names, labels, exact counts, promtool lint.

No root, no BPF: the agent side runs on the load generator's SyntheticEngine, the controller
side on a Controller fed with the batches the real controller client would send.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.loadgen import SyntheticEngine
from tracefleet.agent import metrics as am
from tracefleet.agent.capture.contain import ErrorCounter
from tracefleet.agent.capture.engine import LATENCY_BUCKETS_SECONDS, OUTCOMES, EventSetConfig
from tracefleet.agent.cli import build_parser
from tracefleet.agent.control.client import _batch_pb
from tracefleet.controller.api import metrics as cm
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.domain.fleet import Connection
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import agent_pb2, types_pb2

NAME = re.compile(r"^tracefleet_(agent|controller)_[a-z0-9_]+$")
UNITS = (
    "_seconds",
    "_bytes",
    "_total",
    "_info",
    "_generation",
    "_acks",
    "_connected",
    "_disconnected",
    "_stale",
    "_enabled",
    "_batches",
    "_healthy",
)


class FakeProgramsEngine(SyntheticEngine):
    """SyntheticEngine plus the BpfEngine-only accessors, so every agent metric is present."""

    bpf_stats_enabled = True
    errors = ErrorCounter()
    fallback_rejected = {("file", "pid-reused"): 2}
    namespace_events = {("file", "prod"): 3}  # --metrics-namespaces

    def attribution_unknown(self) -> dict[str, int]:  # workload.py's Attributor.unknown
        return {"cgroup": 1}

    def exe_unknown(self) -> dict[str, int]:  # exe.py's ExeResolver.counts
        return {"no-mm": 4}

    def kernel_missed(self, name: str) -> tuple[int, int]:
        return {"file": (121, 404)}.get(name, (0, 0))

    def program_stats(self) -> list[tuple[str, str, int, int]]:
        return [("file", "tps_enter_openat", 2_500_000_000, 10), ("file", "tp_exit_openat", 0, 0)]

    def statuses(self) -> list[Any]:
        return [
            SimpleNamespace(name="file", enabled=True, attached=True, strategy="sleepable"),
            SimpleNamespace(name="net", enabled=False, attached=False, strategy="none"),
        ]


def _client() -> Any:
    return SimpleNamespace(
        applied_generation=7,
        connected=True,
        stats=SimpleNamespace(connects=2, failovers=1, batches_discarded=3, events_discarded=1200),
        statuses=[],
        outbox_state=lambda: (5, 4096),
    )


def _engine(rate: float = 20000.0, cls: type = SyntheticEngine) -> Any:
    eng = cls(rate, seed=3)
    eng.apply({n: EventSetConfig(n, True) for n in ("file", "net")})
    return eng


def _collect_deltas(eng: Any, n: int = 3) -> list[Any]:
    out = []
    for _ in range(n):
        time.sleep(0.01)
        out.append(eng.collect())
    return out


def _scrape(collector: Any) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return generate_latest(reg).decode()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fam: Any, suffix: str = "", **labels: str) -> list[Any]:
    return [
        s
        for s in fam.samples
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _check_conventions(text: str, component: str, allowed: frozenset[str]) -> set[str]:
    seen = set()
    for fam in text_string_to_metric_families(text):
        assert NAME.match(fam.name), fam.name
        assert fam.name.startswith(f"tracefleet_{component}_"), fam.name
        assert fam.documentation, f"{fam.name} has no HELP"
        full = fam.name + ("_total" if fam.type == "counter" else "")
        seen.add(full)
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), f"{fam.name}: histograms are in seconds"
        if fam.type == "gauge":
            assert not fam.name.endswith("_total"), fam.name
        assert full.endswith(UNITS), f"{full}: name must end with a unit or _total/_info"
        for s in fam.samples:
            extra = set(s.labels) - allowed - {"le"}
            assert not extra, f"{s.name} has labels outside the allowed set: {extra}"
    return seen


def test_agent_metric_names_and_labels():
    eng = _engine(cls=FakeProgramsEngine)
    _collect_deltas(eng, 1)
    from tracefleet.agent import export

    hub = export.ExportHub([export.Exporter("siem", queue_size=1)])
    text = _scrape(am.AgentCollector(eng, "node-a", _client(), hub))
    seen = _check_conventions(text, "agent", am.ALLOWED_LABELS)
    assert seen == set(am.METRICS), f"missing: {set(am.METRICS) - seen}"
    for name, (_, labels, _) in am.METRICS.items():
        assert set(labels) <= am.ALLOWED_LABELS, name
    fams = _families(text)
    (info,) = _samples(fams["tracefleet_agent_strategy_info"])
    assert info.labels == {"node": "node-a", "event_set": "file", "strategy": "sleepable"}
    assert info.value == 1
    run = fams["tracefleet_agent_bpf_program_run_time_seconds"]
    assert _samples(run, "_total", program="tps_enter_openat")[0].value == 2.5
    assert _samples(fams["tracefleet_agent_applied_generation"])[0].value == 7
    assert _samples(fams["tracefleet_agent_controller_connected"])[0].value == 1
    missed = fams["tracefleet_agent_bpf_runs_missed"]
    got = [(s.labels["event_set"], s.labels["stage"], s.value) for s in _samples(missed, "_total")]
    assert got == [("file", "entry", 121), ("file", "exit", 404), ("net", "entry", 0),
                   ("net", "exit", 0)]  # fmt: skip


def test_agent_collector_sees_every_count_collect_handed_out():
    """collect() deltas go to the controller client; the endpoint shows their exact sum."""
    eng = _engine()
    deltas = _collect_deltas(eng)
    fams = _families(_scrape(am.AgentCollector(eng, "node-a")))
    for name in ("file", "net"):
        sets = [d.sets[name] for d in deltas if name in d.sets]
        delivered = sum(s.delivered for s in sets)
        assert delivered > 0
        fam = fams["tracefleet_agent_events_delivered"]
        assert _samples(fam, "_total", event_set=name)[0].value == delivered
        fam = fams["tracefleet_agent_events_dropped"]
        assert _samples(fam, "_total", event_set=name)[0].value == sum(s.dropped for s in sets)
        for outcome in OUTCOMES:
            want = sum(s.outcomes.get(("synthetic", outcome), 0) for s in sets)
            got = _samples(
                fams["tracefleet_agent_arguments"],
                "_total",
                event_set=name,
                strategy="synthetic",
                outcome=outcome,
            )
            assert got[0].value == want, (name, outcome)
        # histogram: summed bucket by bucket, exposed cumulative
        lat = fams["tracefleet_agent_capture_latency_seconds"]
        summed = [
            sum(s.latency.counts[i] for s in sets) for i in range(len(sets[0].latency.counts))
        ]
        cumulative = [sum(summed[: i + 1]) for i in range(len(summed))]
        buckets = _samples(lat, "_bucket", event_set=name)
        assert [float(b.labels["le"]) for b in buckets] == [*LATENCY_BUCKETS_SECONDS, float("inf")]
        assert [b.value for b in buckets] == cumulative
        assert _samples(lat, "_count", event_set=name)[0].value == delivered
        assert _samples(lat, "_sum", event_set=name)[0].value == pytest.approx(
            sum(s.latency.sum for s in sets)
        )


def test_histogram_buckets_are_cumulative():
    from tracefleet.agent.capture.engine import Histogram

    h = Histogram()
    for v in (0.5e-6, 3e-6, 3e-6, 20.0):
        h.observe(v)
    b = h.cumulative_buckets()
    assert b[0] == ("1e-06", 1.0) and b[1] == ("2.5e-06", 1.0) and b[2] == ("5e-06", 3.0)
    assert b[-2][1] == 3.0 and b[-1] == ("+Inf", 4.0)


def test_agent_cli_metrics_flag_defaults(monkeypatch):
    monkeypatch.delenv("TRACEFLEET_AGENT_METRICS_LISTEN", raising=False)
    assert build_parser().parse_args(["run"]).metrics_listen == "0.0.0.0:9091"
    assert build_parser().parse_args(["capture", "-e", "file"]).metrics_listen == ""
    args = build_parser().parse_args(["run", "--metrics-listen", "127.0.0.1:0"])
    assert args.metrics_listen == "127.0.0.1:0"


def test_agent_metrics_server_serves_and_reports_bind_errors():
    import urllib.request

    eng = _engine()
    _collect_deltas(eng, 1)
    srv = am.serve(eng, "node-a", "127.0.0.1:0")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5).read()
        assert b"tracefleet_agent_events_delivered_total" in body
        with pytest.raises(am.MetricsError, match="cannot serve metrics"):
            am.serve(eng, "node-a", f"127.0.0.1:{srv.port}")
    finally:
        srv.close()
    with pytest.raises(am.MetricsError, match="bad metrics address"):
        am.split_listen("nonsense")
    assert am.split_listen(":9091") == ("0.0.0.0", 9091)
    assert am.split_listen("[::1]:9091") == ("::1", 9091)


# ---- controller ----------------------------------------------------------------------------


def _controller_fed() -> tuple[Controller, cm.FleetTotals, list[Any]]:
    ctl = Controller(Store(":memory:"))
    totals = cm.FleetTotals()
    ctl.observers.append(totals)
    conns = {}
    for node in ("n1", "n2"):
        conns[node] = Connection()
        ctl.on_register(
            agent_pb2.Register(node_name=node, labels={"role": "db"}, event_sets=["file", "net"]),
            conns[node],
        )
    ctl.configure("file", True)  # generation 1, pushed to both
    n1 = ctl.fleet.nodes["n1"]
    ctl.on_ack(
        n1,
        agent_pb2.Ack(
            generation=ctl.generation,
            statuses=[
                types_pb2.SetStatus(name="file", enabled=True, attached=True, strategy="sleepable")
            ],
        ),
    )
    batches = []
    for node in ("n1", "n2"):
        eng = _engine()
        for i, agg in enumerate(_collect_deltas(eng)):
            for j, sa in enumerate(agg.sets.values()):  # call accounting, distinct per batch
                sa.lost_inflight_full, sa.lost_inflight_stale, sa.lost_deleted = i + 1, j, 2
                sa.lost = sa.lost_inflight_full + sa.lost_inflight_stale + sa.lost_deleted
                sa.prefix_filtered, sa.decode_errors = 3 * i + j, j
                sa.kernel_missed_entry, sa.kernel_missed_exit = i + j, 2 * i + 1
                sa.passed = (sa.delivered + sa.dropped + sa.lost + sa.prefix_filtered
                             + sa.decode_errors)  # fmt: skip
            b = _batch_pb(agg, [], replayed=False)
            ctl.on_batch(ctl.fleet.nodes[node], b)
            batches.append((node, agg))
    return ctl, totals, batches


def test_controller_metric_names_and_labels():
    ctl, totals, _ = _controller_fed()
    text = _scrape(cm.ControllerCollector(ctl, totals))
    seen = _check_conventions(text, "controller", cm.ALLOWED_LABELS)
    replicated_only = {"tracefleet_controller_etcd_available"}  # not with its own database
    assert seen == set(cm.METRICS) - replicated_only, f"missing: {set(cm.METRICS) - seen}"
    fams = _families(text)
    assert _samples(fams["tracefleet_controller_desired_generation"])[0].value == 1
    writes = fams["tracefleet_controller_store_write_failures"]
    assert _samples(writes, "_total")[0].value == 0
    # n2 never acked generation 1
    assert _samples(fams["tracefleet_controller_pending_acks"])[0].value == 1
    assert _samples(fams["tracefleet_controller_agents_connected"])[0].value == 2
    # 2 agents, 1,000 batches a second for the fleet: 2 ms apart (below any interval)
    assert _samples(fams["tracefleet_controller_batch_pace_seconds"])[0].value == 0.002
    assert _samples(fams["tracefleet_controller_agent_applied_generation"], node="n1")[0].value == 1
    apply = fams["tracefleet_controller_enable_to_applied_seconds"]
    assert _samples(apply, "_count")[0].value == 1
    (info,) = _samples(fams["tracefleet_controller_strategy_info"])
    assert info.labels == {"node": "n1", "event_set": "file", "strategy": "sleepable"}


def test_controller_says_whether_etcd_serves_it(monkeypatch):
    ctl, totals, _ = _controller_fed()
    for available in (True, False):
        monkeypatch.setattr(type(ctl.store), "shared", True)
        monkeypatch.setattr(type(ctl.store), "problem", "" if available else "etcd unavailable")
        fams = _families(_scrape(cm.ControllerCollector(ctl, totals)))
        (sample,) = _samples(fams["tracefleet_controller_etcd_available"])
        assert sample.value == int(available)


def test_controller_merges_batches_exactly():
    ctl, totals, batches = _controller_fed()
    fams = _families(_scrape(cm.ControllerCollector(ctl, totals)))
    for node in ("n1", "n2"):
        aggs = [a for n, a in batches if n == node]
        assert _samples(fams["tracefleet_controller_batches"], "_total", node=node)[0].value == 3
        arrival = fams["tracefleet_controller_arrival_latency_seconds"]
        assert _samples(arrival, "_count", node=node)[0].value == 3
        for name in ("file", "net"):
            sets = [a.sets[name] for a in aggs if name in a.sets]
            lbl = {"node": node, "event_set": name}
            fam = fams["tracefleet_controller_events_delivered"]
            assert _samples(fam, "_total", **lbl)[0].value == sum(s.delivered for s in sets)
            fam = fams["tracefleet_controller_events_dropped"]
            assert _samples(fam, "_total", **lbl)[0].value == sum(s.dropped for s in sets)
            fam = fams["tracefleet_controller_calls_passed"]
            assert _samples(fam, "_total", **lbl)[0].value == sum(s.passed for s in sets) > 0
            for reason, part in (("inflight_full", "lost_inflight_full"),
                                 ("inflight_stale", "lost_inflight_stale"),
                                 ("deleted", "lost_deleted")):  # fmt: skip
                fam = fams["tracefleet_controller_calls_lost"]
                got = _samples(fam, "_total", **lbl, reason=reason)[0].value
                assert got == sum(getattr(s, part) for s in sets)
            fam = fams["tracefleet_controller_calls_prefix_filtered"]
            want = sum(s.prefix_filtered for s in sets)
            assert _samples(fam, "_total", **lbl)[0].value == want
            fam = fams["tracefleet_controller_records_undecodable"]
            assert _samples(fam, "_total", **lbl)[0].value == sum(s.decode_errors for s in sets)
            fam = fams["tracefleet_controller_bpf_runs_missed"]
            for stage in ("entry", "exit"):
                want = sum(getattr(s, f"kernel_missed_{stage}") for s in sets)
                assert _samples(fam, "_total", **lbl, stage=stage)[0].value == want > 0
            for outcome in OUTCOMES:
                want = sum(s.outcomes.get(("synthetic", outcome), 0) for s in sets)
                got = _samples(
                    fams["tracefleet_controller_arguments"],
                    "_total",
                    **lbl,
                    strategy="synthetic",
                    outcome=outcome,
                )
                assert got[0].value == want
            width = len(LATENCY_BUCKETS_SECONDS) + 1
            summed = [sum(s.latency.counts[i] for s in sets) for i in range(width)]
            buckets = _samples(
                fams["tracefleet_controller_capture_latency_seconds"], "_bucket", **lbl
            )
            assert [b.value for b in buckets] == [sum(summed[: i + 1]) for i in range(width)]


def test_controller_apply_latency_counts_first_ack_only():
    t = cm.FleetTotals(clock=iter([100.0, 102.5, 200.0]).__next__)
    node = SimpleNamespace(name="n1")
    t.on_generation(5)  # issued at 100
    t.on_ack(node, SimpleNamespace(generation=5), 4)  # applied at 102.5
    t.on_ack(node, SimpleNamespace(generation=5), 5)  # re-ack after a reconnect: ignored
    t.on_ack(node, SimpleNamespace(generation=3), 2)  # not issued by this process: ignored
    _, _, apply = t.snapshot()
    assert apply.count == 1 and apply.sum == 2.5
    assert apply.counts[cm.APPLY_BUCKETS_SECONDS.index(2.5)] == 1  # 1 < 2.5 <= 2.5


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package prometheus; "
    "deploy/host/install-deps.sh installs it)",
)
@pytest.mark.parametrize("component", ["agent", "controller"])
def test_promtool_check_metrics(component):
    if component == "agent":
        eng = _engine(cls=FakeProgramsEngine)
        _collect_deltas(eng, 1)
        text = _scrape(am.AgentCollector(eng, "node-a", _client()))
    else:
        ctl, totals, _ = _controller_fed()
        text = _scrape(cm.ControllerCollector(ctl, totals))
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_agent_and_controller_expose_the_same_outcomes():
    """Both zero-fill every outcome of tracefleet.model.names (the agent once lacked torn,
    both mismatch and reread), so a ratio over outcomes means the same on either side."""
    from tracefleet.model.names import OUTCOMES as ALL_OUTCOMES

    eng = _engine()
    _collect_deltas(eng, 1)
    agent = _families(_scrape(am.AgentCollector(eng, "node-a", _client(), None)))
    ctl, totals, _ = _controller_fed()
    controller = _families(_scrape(cm.ControllerCollector(ctl, totals)))
    for fams, name in (
        (agent, "tracefleet_agent_arguments"),
        (controller, "tracefleet_controller_arguments"),
    ):
        seen = {s.labels["outcome"] for s in _samples(fams[name], "_total", event_set="file")}
        assert seen == set(ALL_OUTCOMES), name


def test_unhealthy_consumer_and_exporter_show_as_zero():
    """The gauges the unhealthy-consumer/exporter alerts read (deploy/prometheus)."""
    from tracefleet.agent import export

    class Dying(export.Exporter):
        def _run(self) -> None:  # the writer thread ends at once, as if it had crashed
            return

    class Sink(export.Exporter):
        def _write(self, data: bytes, *, event: bool) -> None:
            pass

    class Eng(SyntheticEngine):
        ok = True

        def health(self) -> tuple[bool, str]:
            return self.ok, "test"

    good, bad = Sink("good", queue_size=10), Dying("bad", queue_size=10)
    hub = export.ExportHub([good, bad])
    hub.start()
    try:
        wait_until(lambda: not bad.healthy(), 30, "the dying exporter's thread to end")
        eng = Eng(0)
        for ok in (True, False):
            eng.ok = ok
            fams = _families(_scrape(am.AgentCollector(eng, "node-a", None, hub)))
            (c,) = _samples(fams["tracefleet_agent_consumer_healthy"])
            assert c.value == (1 if ok else 0)
            ex = {s.labels["exporter"]: s.value
                  for s in _samples(fams["tracefleet_agent_export_healthy"])}  # fmt: skip
            assert ex == {"good": 1, "bad": 0}
    finally:
        hub.close()
