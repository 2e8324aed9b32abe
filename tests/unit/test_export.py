"""Exporter mechanics without a kernel: a full queue never blocks the caller and is counted,
bad configuration names the fix, per-rule routes report the exporters an agent lacks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.loadgen import SyntheticEngine
from tracefleet.agent import export


class _Blocked(export.Exporter):
    """An exporter whose writer is stuck until released (a slow disk, a dead receiver)."""

    def __init__(self, queue_size: int) -> None:
        super().__init__("slow", queue_size=queue_size, accounting_seconds=3600)
        self.release = threading.Event()
        self.lines: list[bytes] = []

    def _write(self, data: bytes, *, event: bool) -> None:
        self.release.wait()
        self.lines.append(data)


def _ev(i: int) -> dict[str, Any]:
    return {"ts_ns": i, "event_set": "file", "syscall": "openat", "pid": 1, "tid": 1,
            "comm": "x", "ret": 0, "args": {}}  # fmt: skip


def test_full_queue_counts_and_never_blocks():
    exp = _Blocked(queue_size=4)
    exp.start()
    done = threading.Event()

    def offer() -> None:
        for i in range(100):
            exp.offer(_ev(i))
        done.set()

    threading.Thread(target=offer, daemon=True).start()
    assert done.wait(60), "offer() blocked behind a stuck writer"
    exp.release.set()
    exp.close()
    s = exp.snapshot()
    assert s["received"] == 100
    # at most the queue plus the one event the writer held
    assert s["written"] <= 5 and s["undeliverable"]["queue_full"] >= 95
    assert s["received"] == s["written"] + sum(s["undeliverable"].values())
    events = [line for line in exp.lines if b'"type"' not in line]
    assert len(events) == s["written"]
    assert b'"type":"tracefleet.accounting"' in exp.lines[-1]


def test_file_spec_refuses_bad_configuration_naming_the_fix(tmp_path: Path):
    with pytest.raises(export.ExportConfigError, match="absolute path"):
        export.file_spec("relative.jsonl")
    with pytest.raises(export.ExportConfigError, match="does not exist"):
        export.file_spec(str(tmp_path / "no" / "x.jsonl"))
    with pytest.raises(export.ExportConfigError, match="is a directory"):
        export.file_spec(str(tmp_path))
    with pytest.raises(export.ExportConfigError, match="64M"):
        export.file_spec(str(tmp_path / "x"), "lots")
    with pytest.raises(export.ExportConfigError, match=">= 4096"):
        export.file_spec(str(tmp_path / "x"), "1K")
    assert export.file_spec(str(tmp_path / "x"), "2M").max_bytes == 2 << 20


def test_hostile_strings_stay_one_escaped_line(tmp_path: Path):
    spec = export.file_spec(str(tmp_path / "x.jsonl"), "4K", keep=1)
    exp = export.FileExporter("f", spec, node="n1")
    exp.start()
    ev = _ev(1)
    ev["args"] = {"pathname": {"value": "a\nb\x1b[2J\u2028" + "z" * 5000, "status": "ok"}}
    exp.offer(ev)
    exp.close()
    # a line longer than the bound is written whole (into a file of its own), never cut
    lines = [line for f in sorted(tmp_path.iterdir()) for line in f.read_bytes().splitlines()]
    assert all(line.isascii() for line in lines)
    assert sum(b'"event_set"' in line for line in lines) == 1


def test_routes_report_exporters_the_agent_lacks(tmp_path: Path):
    exp = export.FileExporter("audit", export.file_spec(str(tmp_path / "a")))
    hub = export.ExportHub([exp])
    missing = hub.set_routes({"file": ["audit", "siem"], "exec": []})
    assert missing == {"file": ["siem"]}
    hub(_ev(1))
    hub({**_ev(2), "event_set": "exec"})
    assert exp.snapshot()["received_by_set"] == {"file": 1}


def test_user_events_route_by_their_rule_user_name(tmp_path: Path):
    """`tracefleet enable user:tf_test --export audit`: the event's event_set is "user" and
    its name is the syscall; the route is the rule's set, user:tf_test."""
    exp = export.FileExporter("audit", export.file_spec(str(tmp_path / "a")))
    hub = export.ExportHub([exp])
    assert hub.set_routes({"user:tf_test": ["audit"], "user:other": []}) == {}
    hub({**_ev(1), "event_set": "user", "syscall": "tf_test"})
    hub({**_ev(2), "event_set": "user", "syscall": "other"})
    assert exp.snapshot()["received_by_set"] == {"user": 1}


def test_metrics_expose_exported_and_undeliverable_per_exporter(tmp_path: Path):
    from prometheus_client import CollectorRegistry, generate_latest

    from tracefleet.agent import metrics

    exp = _Blocked(queue_size=1)
    exp.start()
    for i in range(10):
        exp.offer(_ev(i))
    exp.release.set()
    exp.close()
    reg = CollectorRegistry()
    reg.register(metrics.AgentCollector(SyntheticEngine(0), "n1", hub=export.ExportHub([exp])))
    text = generate_latest(reg).decode()
    snap = exp.snapshot()
    full = snap["undeliverable"]["queue_full"]
    assert full >= 8
    assert (
        f'tracefleet_agent_export_events_total{{exporter="slow",node="n1"}} {snap["written"]}.0'
        in text
    )
    assert (f'tracefleet_agent_export_undeliverable_total{{cause="queue_full",exporter="slow",'
            f'node="n1"}} {full}.0') in text  # fmt: skip


def test_rule_export_round_trips_through_the_store_and_reaches_the_agent(tmp_path: Path):
    import sqlite3

    from tracefleet.controller.domain.controller import ConfigError, Controller
    from tracefleet.controller.domain.fleet import Node
    from tracefleet.controller.storage.store import Store

    db = str(tmp_path / "c.db")
    ctl = Controller(Store(db))
    first = ctl.configure("file", True, export=("audit",))
    # a different export is a different intent: a new generation
    assert ctl.configure("file", True, export=("audit", "siem")).generation > first.generation
    assert not ctl.configure("file", True, export=("audit", "siem")).changed
    with pytest.raises(ConfigError, match="exporter names"):
        ctl.configure("file", True, export=("Bad Name",))
    ctl.store.close()
    ctl = Controller(Store(db))
    assert ctl.rules["file"].export == ("audit", "siem")
    [spec] = ctl.desired_message(Node("n1")).desired_state.event_sets
    assert list(spec.export) == ["audit", "siem"]
    ctl.store.close()
    # a database from before per-rule export gets the column, its rules export nothing
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute(
        "CREATE TABLE rules (event_set TEXT PRIMARY KEY, enabled INTEGER NOT NULL, selector "
        "TEXT NOT NULL, filters TEXT NOT NULL, canary_percent INTEGER NOT NULL, sample_rate "
        "REAL NOT NULL, expires_at REAL, expired INTEGER NOT NULL, generation INTEGER NOT NULL)"
    )
    con.execute("INSERT INTO rules VALUES ('file', 1, 'all', '{}', 0, 0, NULL, 0, 1)")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    assert Store(str(old)).rules()[0].export == ()


def test_parse_exporter_names_the_fix(tmp_path: Path):
    name, spec = export.parse_exporter(f"audit=file:{tmp_path}/a.jsonl,max_bytes=1M,keep=3")
    assert (name, spec.max_bytes, spec.keep) == ("audit", 1 << 20, 3)
    with pytest.raises(export.ExportConfigError, match="known: file"):
        export.parse_exporter("audit=kafka:x")
    with pytest.raises(export.ExportConfigError, match="NAME=file:/PATH"):
        export.parse_exporter(f"Audit=file:{tmp_path}/a")
    with pytest.raises(export.ExportConfigError, match="bad option"):
        export.parse_exporter(f"audit=file:{tmp_path}/a,keep=lots")


def test_parse_otlp_exporters():
    assert export.parse_exporter("o=otlp-grpc:collector:4317") == ("o", ("grpc", "collector:4317"))
    assert export.parse_exporter("h=otlp-http:http://c:4318/v1/logs") == (
        "h",
        ("http", "http://c:4318/v1/logs"),
    )
    with pytest.raises(export.ExportConfigError, match="otlp-grpc:HOST:PORT"):
        export.parse_exporter("o=otlp-grpc:collector")


def test_otlp_attributes_name_the_workload_with_semantic_conventions():
    """Pod, namespace and container reach OTLP under the k8s.* / container.* names a log
    store indexes, when the agent attributed the event; a host process gets none of them."""
    from tracefleet.agent.export.otlp import attributes

    ev = {"pid": 10, "tid": 10, "comm": "psql", "event_set": "file", "syscall": "openat",
          "ret": 3, "args": {}, "attribution": "pod", "container_id": "abc123", "pod": "db-0",
          "namespace": "prod", "pod_uid": "u-1", "container": "postgres"}  # fmt: skip
    a = attributes(ev)
    assert {k: a[k] for k in a if k.startswith(("k8s.", "container."))} == {
        "container.id": "abc123",
        "k8s.container.name": "postgres",
        "k8s.pod.name": "db-0",
        "k8s.pod.uid": "u-1",
        "k8s.namespace.name": "prod",
    }
    assert a["tracefleet.attribution"] == "pod"
    host = dict(ev, attribution="host", container_id="", pod="", namespace="", pod_uid="",
                container="")  # fmt: skip
    assert not [k for k in attributes(host) if k.startswith(("k8s.", "container."))]


def test_last_accounting_record_counts_only_the_events_in_the_files_kept(tmp_path: Path):
    """The accounting record written at close can itself need a rotation, which deletes the
    oldest file: its counts must be taken after that, so that written == the event lines
    kept and received == written + undeliverable, whatever the number of events (the 7.2
    guest hit the case: written 63 against 42 events kept)."""
    import json

    for n in range(1, 60):
        d = tmp_path / str(n)
        d.mkdir()
        exp = export.FileExporter("f", export.file_spec(str(d / "e.jsonl"), "4K", keep=1))
        exp.start()
        for i in range(n):
            exp.offer(_ev(i))
        exp.close()
        lines = [json.loads(x) for f in sorted(d.iterdir()) for x in f.read_text().splitlines()]
        acct = [x for x in lines if x.get("type") == export.ACCOUNTING_TYPE][-1]["counts"]
        events = sum(1 for x in lines if "type" not in x)
        assert acct["written"] == events, (n, acct, events)
        assert acct["received"] == n == acct["written"] + sum(acct["undeliverable"].values())


class _Slow(export.Exporter):
    """An exporter whose destination takes 20 ms a line (a slow disk, a remote file system)."""

    def __init__(self) -> None:
        super().__init__("slow", queue_size=1000, accounting_seconds=3600)
        self.lines: list[bytes] = []

    def _write(self, data: bytes, *, event: bool) -> None:
        time.sleep(0.02)
        self.lines.append(data)


def test_close_counts_what_a_slow_writer_did_not_write():
    """Stopping the agent waits for the writer a bounded time; what it has not written by
    then is counted (``shutdown``) and the last accounting record says so, instead of going
    unwritten and uncounted (the 7.2 guest's exactly-once test lost 133 events this way)."""
    import json

    exp = _Slow()
    exp.start()
    for i in range(200):
        exp.offer(_ev(i))
    exp.close(timeout=0.5)
    s = exp.snapshot()
    assert s["received"] == 200 and s["queued"] == 0
    assert 0 < s["undeliverable"]["shutdown"] < 200
    assert s["received"] == s["written"] + sum(s["undeliverable"].values())
    last = json.loads(exp.lines[-1])
    assert last["type"] == export.ACCOUNTING_TYPE and last["counts"] == s
    assert sum(1 for line in exp.lines if b'"type"' not in line) == s["written"]


def test_rotation_touches_only_the_files_there_are(tmp_path: Path, monkeypatch):
    """keep=1000 must not cost 1,000 file-system calls per rotation: only the rotated files
    there are move (on the guest's slow file system the writer fell behind by minutes), and
    files of an earlier run keep their order after the new ones."""
    import json
    import os

    path = tmp_path / "e.jsonl"
    for i in (1, 2):  # an earlier run's rotated files
        (tmp_path / f"e.jsonl.{i}").write_text(json.dumps({"old": i}) + "\n")
    probes: list[str] = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: probes.append(str(p)) or real_exists(p))
    monkeypatch.setattr(Path, "exists", lambda p, **kw: probes.append(str(p)) or real_exists(p))
    renames: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append(str(a)) or real_replace(a, b))
    exp = export.FileExporter("f", export.file_spec(str(path), "4K", keep=1000))
    exp.start()
    for i in range(400):
        exp.offer(_ev(i))
    exp.close()
    files = sorted(tmp_path.iterdir(), key=lambda f: int(f.suffix[1:]) if f.suffix[1:].isdigit()
                   else 0)  # fmt: skip
    rotations = len(files) - 3  # the current file and the two old ones
    assert rotations > 10
    assert len(probes) <= 3, probes[:10]  # PATH.1, PATH.2, PATH.3 once
    # each rotation moves the files there are, then PATH itself
    assert len(renames) == sum(2 + r + 1 for r in range(rotations))
    assert [json.loads(f.read_text()) for f in files[-2:]] == [{"old": 1}, {"old": 2}]
    events = [json.loads(x) for f in files[:-2] for x in f.read_text().splitlines()]
    got = [e["ts_ns"] for e in events if "type" not in e]
    assert sorted(got) == list(range(400)) and len(got) == 400


def test_hub_close_leaves_no_event_of_any_exporter_uncounted():
    """A stop with two slow destinations: every event each received is written or counted,
    and each wrote its last accounting record."""
    import json

    a, b = _Slow(), _Slow()
    b.name = "slow2"
    hub = export.ExportHub([a, b], default=["slow", "slow2"])
    for e in (a, b):
        e.start()
    for i in range(100):
        for e in (a, b):
            e.offer(_ev(i))
    hub.close(timeout=0.5)
    for e in (a, b):
        s = e.snapshot()
        assert s["received"] == 100 == s["written"] + sum(s["undeliverable"].values()), s
        assert s["undeliverable"]["shutdown"] > 0
        assert json.loads(e.lines[-1])["counts"] == s
