"""deploy/grafana: the committed dashboards are the generator's output, and every query
names only metrics the agent or the controller exports (the e2e test runs them for real)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

from tracefleet.agent import metrics as am
from tracefleet.controller.api import metrics as cm

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "tracefleet-rules.yaml"
METRIC = re.compile(r"\btracefleet_(?:agent|controller)_[a-z0-9_]+")
EXPORTED = set(am.METRICS) | set(cm.METRICS)


def _generator():
    spec = importlib.util.spec_from_file_location("tf_grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _exported(name: str) -> bool:
    for suffix in ("_bucket", "_count", "_sum", ""):
        if name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED:
            return True
    return False


def test_committed_json_equals_generator_output():
    rendered = _generator().render()
    assert sorted(rendered) == sorted(p.name for p in GRAFANA.glob("*.json"))
    for name, text in rendered.items():
        assert (GRAFANA / name).read_text() == text, (
            f"deploy/grafana/{name} differs from the generator: run "
            "python3 deploy/grafana/generate.py"
        )


def test_dashboards_are_complete_and_query_exported_metrics():
    titles = set()
    for path in sorted(GRAFANA.glob("*.json")):
        dash = json.loads(path.read_text())
        titles.add(dash["title"])
        assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dash["panels"]:
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            for t in panel["targets"]:
                names = METRIC.findall(t["expr"])
                assert names, f"{path.name}: {panel['title']}: {t['expr']}"
                unknown = [n for n in names if not _exported(n)]
                assert not unknown, f"{path.name}: {panel['title']}: not exported: {unknown}"
    assert titles == {
        "tracefleet / Fleet overview",
        "tracefleet / Node",
        "tracefleet / Control plane",
    }


def test_node_dashboard_is_templated_by_node():
    dash = json.loads((GRAFANA / "tracefleet-node.json").read_text())
    assert "node" in {v["name"] for v in dash["templating"]["list"]}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    agent = [e for e in exprs if "tracefleet_agent_" in e]
    assert agent and all('node="$node"' in e for e in agent)


def test_fleet_overview_has_the_rates_and_latencies():
    dash = json.loads((GRAFANA / "tracefleet-fleet-overview.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    for want in ("Fault rate", "Recovery rate", "Loss rate", "Drop rate",
                 "Capture latency p50", "Capture latency p99"):  # fmt: skip
        assert want in titles


def test_provisioning_files():
    (prov,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/tracefleet.yaml").read_text())[
        "providers"
    ]
    assert prov["type"] == "file" and prov["options"]["path"]
    (ds,) = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/tracefleet-prometheus.yaml").read_text()
    )["datasources"]
    assert ds["type"] == "prometheus"


def test_rules_query_exported_metrics():
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = [n for n in METRIC.findall(rule["expr"]) if not _exported(n)]
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
