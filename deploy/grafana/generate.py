#!/usr/bin/env python3
"""Generate tracefleet's Grafana dashboards (deploy/grafana/*.json) from this file.

    python3 deploy/grafana/generate.py           # rewrite the JSON files
    python3 deploy/grafana/generate.py --check   # exit 1 if a committed file differs

The committed JSON must equal this generator's output (tests/unit/test_metrics_dashboards.py).
Only the standard library: the dashboards are plain data. Every query reads the metrics of
agent/src/tracefleet/agent/metrics.py and
controller/src/tracefleet/controller/api/metrics.py; tests/e2e/test_metrics_prometheus.py
evaluates every query against a real Prometheus scraping a real fleet.

Template variables: ``${datasource}`` (every dashboard), ``$node`` (node drill-down), and
Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def rate(metric: str, by: str, sel: str = "") -> str:
    sel = f"{{{sel}}}" if sel else ""
    return f"sum by ({by}) (rate({metric}{sel}[{RI}]))"


def quantile(q: float, metric: str, by: str, sel: str = "") -> str:
    return f"histogram_quantile({q}, {rate(metric + '_bucket', f'{by}, le' if by else 'le', sel)})"


def _and(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def ratios(prefix: str, by: str, sel: str = "") -> dict[str, str]:
    """Fault, recovery and loss rates of captured arguments, and the event drop rate.

    fault    = arguments whose page was not resident at syscall entry (recovered + lost)
               / all arguments
    recovery = recovered / (recovered + lost)
    loss     = lost / all arguments
    drop     = dropped events / (delivered + dropped)
    """
    args = f"{prefix}_arguments_total"

    def r(extra: str) -> str:
        return rate(args, by, _and(sel, extra))

    delivered = rate(f"{prefix}_events_delivered_total", by, sel)
    dropped = rate(f"{prefix}_events_dropped_total", by, sel)
    faulted, recovered, lost, every = (
        r('outcome=~"recovered|lost"'),
        r('outcome="recovered"'),
        r('outcome="lost"'),
        r(""),
    )
    return {
        "fault": f"{faulted} / {every}",
        "recovery": f"{recovered} / {faulted}",
        "loss": f"{lost} / {every}",
        "drop": f"{dropped} / ({delivered} + {dropped})",
    }


class Dashboard:
    def __init__(self, uid: str, title: str, description: str, variables: list[dict]) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels: list[dict] = []
        self._x = self._y = 0
        self._row_h = 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        unit: str = "short",
        width: int = 12,
        height: int = 8,
        description: str = "",
        instant: bool = False,
    ) -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        p: dict = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [
                {
                    "datasource": DS,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    **({"instant": True, "range": False, "format": "table"} if instant else {}),
                }
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom"}}
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
        self.panels.append(p)
        self._x += width
        self._row_h = max(self._row_h, height)

    def json(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["tracefleet"],
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "annotations": {"list": []},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["tracefleet"],
                    "asDropdown": True,
                    "title": "tracefleet",
                    "includeVars": False,
                    "keepTime": True,
                }
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


DATASOURCE_VAR = {
    "name": "datasource",
    "label": "Prometheus",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "hide": 0,
    "refresh": 1,
    "regex": "",
}
NODE_VAR = {
    "name": "node",
    "label": "Node",
    "type": "query",
    "datasource": DS,
    "query": {
        "query": "label_values(tracefleet_controller_agent_connected, node)",
        "refId": "node",
    },
    "definition": "label_values(tracefleet_controller_agent_connected, node)",
    "current": {},
    "hide": 0,
    "refresh": 2,
    "sort": 1,
    "multi": False,
    "includeAll": False,
    "regex": "",
}

C = "tracefleet_controller"
A = "tracefleet_agent"


def fleet_overview() -> Dashboard:
    d = Dashboard(
        "tracefleet-fleet",
        "tracefleet / Fleet overview",
        "Event, fault, recovery, drop and loss rates and capture latency across the fleet, "
        "as the agents report them to the controller.",
        [DATASOURCE_VAR],
    )
    d.panel(
        "Agents connected", [(f"{C}_agents_connected", "connected")], kind="stat", width=6, height=4
    )
    d.panel("Agents stale", [(f"{C}_agents_stale", "stale")], kind="stat", width=6, height=4)
    d.panel(
        "Pending acknowledgements",
        [(f"{C}_pending_acks", "pending")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "Desired generation",
        [(f"{C}_desired_generation", "generation")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "Events per second by node and event set",
        [(rate(f"{C}_events_delivered_total", "node, event_set"), "{{node}} {{event_set}}")],
        unit="ops",
    )
    d.panel(
        "Events per second by syscall",
        [(rate(f"{C}_syscall_events_total", "event_set, syscall"), "{{event_set}} {{syscall}}")],
        unit="ops",
    )
    r = ratios(C, "node, event_set")
    legend = "{{node}} {{event_set}}"
    d.panel(
        "Fault rate",
        [(r["fault"], legend)],
        unit="percentunit",
        description="Share of captured arguments whose page was not resident at syscall "
        "entry (outcome recovered or lost).",
    )
    d.panel(
        "Recovery rate",
        [(r["recovery"], legend)],
        unit="percentunit",
        description="Share of faulted arguments that were recovered.",
    )
    d.panel(
        "Loss rate",
        [(r["loss"], legend)],
        unit="percentunit",
        description="Share of captured arguments lost.",
    )
    d.panel(
        "Drop rate",
        [(r["drop"], legend)],
        unit="percentunit",
        description="Share of events dropped (ring buffer full, consumer lag, outage "
        "buffer overflow).",
    )
    d.panel(
        "Capture latency p50",
        [(quantile(0.5, f"{C}_capture_latency_seconds", "node, event_set"), legend)],
        unit="s",
        description="Syscall entry to decoded in the agent.",
    )
    d.panel(
        "Capture latency p99",
        [(quantile(0.99, f"{C}_capture_latency_seconds", "node, event_set"), legend)],
        unit="s",
        description="Syscall entry to decoded in the agent.",
    )
    d.panel(
        "Arguments per second by strategy and outcome",
        [(rate(f"{C}_arguments_total", "strategy, outcome"), "{{strategy}} {{outcome}}")],
        unit="ops",
        width=24,
    )
    return d


def node_drilldown() -> Dashboard:
    n = 'node="$node"'
    d = Dashboard(
        "tracefleet-node",
        "tracefleet / Node",
        "One node: its agent's own metrics (kernel counters, BPF program cost, strategy) and "
        "what the controller receives from it.",
        [DATASOURCE_VAR, NODE_VAR],
    )
    d.panel(
        "Controller connection",
        [(f"{A}_controller_connected{{{n}}}", "connected")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "Applied generation",
        [(f"{A}_applied_generation{{{n}}}", "agent"), (f"{C}_desired_generation", "desired")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "BPF stats enabled",
        [(f"{A}_bpf_stats_enabled{{{n}}}", "bpf_stats")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "Event sets enabled",
        [(f"sum({A}_event_set_enabled{{{n}}})", "enabled")],
        kind="stat",
        width=6,
        height=4,
    )
    d.panel(
        "Capture strategy per event set",
        [(f"max by (event_set, strategy) ({A}_strategy_info{{{n}}})", "")],
        kind="table",
        instant=True,
        width=24,
        height=6,
    )
    d.panel(
        "Events per second (agent)",
        [(rate(f"{A}_events_delivered_total", "event_set", n), "{{event_set}}")],
        unit="ops",
    )
    d.panel(
        "Drops per second (kernel counters)",
        [(rate(f"{A}_events_dropped_total", "event_set", n), "{{event_set}}")],
        unit="ops",
    )
    r = ratios(A, "event_set", n)
    d.panel(
        "Fault, recovery and loss rates",
        [
            (r["fault"], "fault {{event_set}}"),
            (r["recovery"], "recovery {{event_set}}"),
            (r["loss"], "loss {{event_set}}"),
        ],
        unit="percentunit",
    )
    d.panel(
        "Arguments per second by strategy and outcome",
        [
            (
                rate(f"{A}_arguments_total", "event_set, strategy, outcome", n),
                "{{event_set}} {{strategy}} {{outcome}}",
            )
        ],
        unit="ops",
    )
    d.panel(
        "Capture latency (agent)",
        [
            (quantile(0.5, f"{A}_capture_latency_seconds", "event_set", n), "p50 {{event_set}}"),
            (quantile(0.99, f"{A}_capture_latency_seconds", "event_set", n), "p99 {{event_set}}"),
        ],
        unit="s",
    )
    d.panel(
        "Batch arrival at the controller p99",
        [(quantile(0.99, f"{C}_arrival_latency_seconds", "", n), "p99")],
        unit="s",
        description="Agent interval end to receipt at the controller.",
    )
    d.panel(
        "BPF CPU time per second by program",
        [
            (
                rate(f"{A}_bpf_program_run_time_seconds_total", "event_set, program", n),
                "{{event_set}} {{program}}",
            )
        ],
        unit="percentunit",
        description="Kernel bpf_stats: share of one CPU spent in each program.",
    )
    d.panel(
        "BPF runs per second by program",
        [
            (
                rate(f"{A}_bpf_program_runs_total", "event_set, program", n),
                "{{event_set}} {{program}}",
            )
        ],
        unit="ops",
    )
    d.panel(
        "BPF mean run time by program",
        [
            (
                f"{rate(f'{A}_bpf_program_run_time_seconds_total', 'event_set, program', n)} / "
                f"{rate(f'{A}_bpf_program_runs_total', 'event_set, program', n)}",
                "{{event_set}} {{program}}",
            )
        ],
        unit="s",
        width=24,
    )
    return d


def control_plane() -> Dashboard:
    d = Dashboard(
        "tracefleet-control-plane",
        "tracefleet / Control plane",
        "Generations, acknowledgements, agent connections and how fast the fleet applies a change.",
        [DATASOURCE_VAR],
    )
    d.panel(
        "Agents by state",
        [
            (f"{C}_agents_connected", "connected"),
            (f"{C}_agents_disconnected", "disconnected"),
            (f"{C}_agents_stale", "stale"),
        ],
    )
    d.panel("Pending acknowledgements", [(f"{C}_pending_acks", "pending")])
    d.panel(
        "Generations",
        [
            (f"{C}_desired_generation", "desired"),
            (f"{C}_agent_applied_generation", "applied {{node}}"),
        ],
    )
    d.panel(
        "Enable to applied latency",
        [
            (quantile(0.5, f"{C}_enable_to_applied_seconds", ""), "p50"),
            (quantile(0.99, f"{C}_enable_to_applied_seconds", ""), "p99"),
        ],
        unit="s",
        description="New generation to its acknowledgement by each agent.",
    )
    d.panel(
        "Batch arrival latency p99 by node",
        [(quantile(0.99, f"{C}_arrival_latency_seconds", "node"), "{{node}}")],
        unit="s",
    )
    d.panel(
        "Batches per second by node", [(rate(f"{C}_batches_total", "node"), "{{node}}")], unit="ops"
    )
    d.panel(
        "Seconds since last heard from",
        [(f"time() - {C}_agent_last_seen_timestamp_seconds", "{{node}}")],
        unit="s",
        width=24,
    )
    return d


DASHBOARDS = {
    "tracefleet-fleet-overview.json": fleet_overview,
    "tracefleet-node.json": node_drilldown,
    "tracefleet-control-plane.json": control_plane,
}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build().json(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = p.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python3 {Path(__file__).name}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
