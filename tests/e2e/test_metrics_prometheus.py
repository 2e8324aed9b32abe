"""A real Prometheus scrapes a real controller and a real agent (root, BPF) and runs every
query of every Grafana dashboard, plus the recording and alerting rules.

controller (subprocess, loopback) <- tracefleet-agent run (real BPF) ; `tracefleet enable file`;
cold_rodata and `cat /etc/hostname` in a loop; /usr/bin/prometheus scraping both /metrics
every second with deploy/prometheus/tracefleet-rules.yaml loaded. Every panel's query, with
its template variables substituted, must parse and return data (a finite value); every rule
must evaluate healthy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, REPO, WORKLOADS, require_root
from tests.e2e.fleet_helpers import PY, cli, wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
GRAFANA = REPO / "deploy" / "grafana"
RULES = REPO / "deploy" / "prometheus" / "tracefleet-rules.yaml"
NODE = "tf-metrics-e2e"
RATE_INTERVAL = "1m"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, **kw)
        log.close()
        self.procs.append((name, p))
        return p

    def alive(self, name: str) -> bool:
        p = dict(self.procs)[name]
        assert p.poll() is None, f"{name} exited {p.returncode}:\n{self.log(name)}"
        return True

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.stop_all()
        for name, _ in ps.procs:  # captured: pytest shows it when the test fails
            print(f"----- {name} log (tail) -----\n{ps.log(name)}")


def _prereqs() -> None:
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("BPF objects not built: run `make bpf`")
    if not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("test workloads not built: run `make workloads`")
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("prometheus not installed (Debian package prometheus; install-deps.sh)")


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get(url)
        except urllib.error.HTTPError as e:  # 400 = the query does not parse
            return json.loads(e.read() or b"{}") | {"http_status": e.code}

    def values(self, expr: str) -> list[float]:
        r = self.query(expr)
        if r.get("status") != "success":
            return []
        data = r["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(s["value"][1]) for s in data["result"]]

    def positive(self, expr: str) -> bool:
        return any(v > 0 for v in self.values(expr))


def _panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(GRAFANA.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel["targets"]:
                expr = (
                    t["expr"]
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$node", NODE)
                    .replace("${node}", NODE)
                )
                assert "$" not in expr, f"unsubstituted variable in {dash['title']}: {expr}"
                out.append((dash["title"], panel["title"], expr))
    return out


def _workload(stop: threading.Event) -> None:
    while not stop.is_set():
        subprocess.run([str(WORKLOADS / "cold_rodata")], capture_output=True, timeout=30)
        for _ in range(3):
            subprocess.run(["cat", "/etc/hostname"], capture_output=True, timeout=10)
        stop.wait(0.1)


def test_dashboards_and_rules_on_real_prometheus(procs: Procs, tmp_path: Path) -> None:
    _prereqs()
    ctl_port, ctl_metrics, agent_metrics, prom_port = (free_port() for _ in range(4))
    controller = f"127.0.0.1:{ctl_port}"
    procs.start(
        "controller",
        [
            PY,
            "-m",
            "tracefleet.controller.server",
            "--listen",
            controller,
            "--insecure-listen",
            "--db",
            ":memory:",
            "--stale-after",
            "5",
            "--window",
            "5",
            "--metrics-listen",
            f"127.0.0.1:{ctl_metrics}",
        ],
    )
    wait_until(
        lambda: procs.alive("controller") and "listening on" in procs.log("controller"),
        30,
        "controller to listen",
    )
    procs.start(
        "agent",
        [
            PY,
            "-m",
            "tracefleet.agent.cli",
            "run",
            "--controller",
            controller,
            "--node",
            NODE,
            "--labels",
            "role=e2e,tier=metrics",
            "--metrics-listen",
            f"127.0.0.1:{agent_metrics}",
            "--bpf-stats",  # the dashboards' per-program run-time panels (off by default)
        ],
        env={**os.environ, "TRACEFLEET_BPF_DIR": str(BPF_DIR)},
    )

    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "tracefleet-controller",
                        "static_configs": [{"targets": [f"127.0.0.1:{ctl_metrics}"]}],
                    },
                    {
                        "job_name": "tracefleet-agent",
                        "static_configs": [{"targets": [f"127.0.0.1:{agent_metrics}"]}],
                    },
                ],
            }
        )
    )
    procs.start(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
    )
    prom = Prom(prom_port)

    def targets_up() -> bool:
        procs.alive("prometheus")
        procs.alive("agent")
        if not _http_ok(f"{prom.base}/-/ready"):
            return False
        active = _get(f"{prom.base}/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    wait_until(targets_up, 45, "Prometheus to scrape the controller and the agent", every=0.5)
    wait_until(
        lambda: prom.positive(f'tracefleet_controller_agent_connected{{node="{NODE}"}}'),
        30,
        "agent registered",
    )

    r = cli(controller, "enable", "file")
    assert r.returncode == 0, r.stderr
    stop = threading.Event()
    worker = threading.Thread(target=_workload, args=(stop,), daemon=True)
    worker.start()
    try:
        # data for every kind of panel: rates over at least two scrapes after the enable
        ready = [
            "increase(tracefleet_controller_events_delivered_total[1m])",
            "increase(tracefleet_controller_capture_latency_seconds_count[1m])",
            "increase(tracefleet_controller_arguments_total[1m])",
            "increase(tracefleet_controller_enable_to_applied_seconds_count[1m])",
            "increase(tracefleet_controller_arrival_latency_seconds_count[1m])",
            "increase(tracefleet_agent_capture_latency_seconds_count[1m])",
            "increase(tracefleet_agent_bpf_program_runs_total[1m])",
            "increase(tracefleet_agent_arguments_total[1m])",
            "tracefleet_agent_event_set_enabled",
            "tracefleet_agent_applied_generation",
        ]
        for q in ready:
            wait_until(
                lambda q=q: procs.alive("agent") and prom.positive(q),
                60,
                f"data for {q}",
                every=0.5,
            )

        queries = _panel_queries()

        def panel_failures() -> list[str]:
            # cold_rodata faults on kernels without sleepable capture; with it, nothing
            # faults and a recovery rate (recovered / faulted) is rightly NaN
            faulted = prom.positive(
                'sum(increase(tracefleet_controller_arguments_total{outcome=~"recovered|lost"}[1m]))'
            )
            failures = []
            for dashboard, panel, expr in queries:
                r = prom.query(expr)
                if r.get("status") != "success":
                    failures.append(
                        f"{dashboard} / {panel}: does not run: {r.get('error')}: {expr}"
                    )
                    continue
                vals = prom.values(expr)
                if not vals:
                    failures.append(f"{dashboard} / {panel}: no data: {expr}")
                elif not any(math.isfinite(v) for v in vals) and (
                    faulted or "recover" not in panel.lower()
                ):
                    failures.append(f"{dashboard} / {panel}: only NaN/Inf {vals}: {expr}")
            return failures

        # a rate needs two scrapes of its series after the first event: a loaded machine can
        # be a scrape behind the readiness checks above, so panels get until the deadline
        deadline = time.monotonic() + 60
        while (failures := panel_failures()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not failures, "\n".join(failures)
        assert len(queries) >= 30

        # the recording rules produce the rates the alerts use
        for rec in (
            "node_event_set:tracefleet_arguments:rate5m",
            "node_event_set:tracefleet_argument_faults:ratio_rate5m",
            "node_event_set:tracefleet_argument_recoveries:ratio_rate5m",
            "node_event_set:tracefleet_argument_losses:ratio_rate5m",
            "node_event_set:tracefleet_events_dropped:ratio_rate5m",
        ):
            wait_until(
                lambda rec=rec: prom.values(f'{rec}{{node="{NODE}",event_set="file"}}'),
                20,
                f"recording rule {rec}",
                every=0.5,
            )

        def rules_evaluated() -> list[dict[str, Any]]:
            groups = _get(f"{prom.base}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            done = rules and all(r.get("health") in ("ok", "err") for r in rules)
            return rules if done else []

        rules = wait_until(rules_evaluated, 20, "every rule to be evaluated", every=0.5)
        import yaml  # every rule of the file is loaded and evaluated, none left out

        in_file = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        assert len(rules) == len(in_file), sorted(r["name"] for r in rules)
        bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
        assert not bad, bad
        # a healthy single node: no agent is stale
        stale = [
            a for r in rules if r["name"] == "TracefleetAgentStale" for a in r.get("alerts", [])
        ]
        assert not stale
    finally:
        stop.set()
        worker.join(timeout=30)
