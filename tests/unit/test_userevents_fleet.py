"""user_events across the fleet without a kernel (no root): what each agent finds registered
reaches the controller and `tracefleet status` (bounded), and a user set that attaches after
its rule (the event registered late) is reported at once, not at the next rule change."""

from __future__ import annotations

import json
import re
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import scaled
from tests.loadgen import SyntheticEngine
from tests.unit.controller_helpers import InProcessController
from tests.unit.controller_helpers import wait_until as _wait_until
from tracefleet.agent.capture import userevents
from tracefleet.agent.capture.engine import EventSetConfig
from tracefleet.agent.control.client import ClientOptions, run_agent
from tracefleet.controller.domain.limits import MAX_USER_EVENTS, Limits, Refusals
from tracefleet.controller.operator import cli
from tracefleet.v1 import control_pb2, types_pb2


def wait_until(fn: Any, what: str) -> Any:
    return _wait_until(fn, scaled(20), what=what)


FAST = ClientOptions(interval=0.1, backoff_initial=0.05, backoff_max=0.3, agent_version="test")


def fake_tracefs(root: Path, status: str) -> Path:
    (root / "events").mkdir(exist_ok=True)
    (root / "user_events_data").write_text("")
    (root / "user_events_status").write_text(status)
    return root


STATUS = "tf_test # Used by perf\ntf_idle\nbad-name\n\nActive: 3\nBusy: 1\n"


# --- agent: discovery ---------------------------------------------------------------------


def test_discovery_report_reads_the_status_file(tmp_path: Path) -> None:
    fake_tracefs(tmp_path, STATUS)
    rep = userevents.discovery_report(tmp_path, frozenset({"tf_test"}))
    assert rep == {
        "available": True,
        "reason": "",
        "events": [
            {"name": "tf_test", "used_by": ["perf"], "attached": True},
            {"name": "tf_idle", "used_by": [], "attached": False},
        ],
        "total": 2,  # bad-name is no event a user:NAME set can name
    }


def test_discovery_report_is_capped_attached_first(tmp_path: Path) -> None:
    fake_tracefs(tmp_path, "".join(f"ev{i:03}\n" for i in range(50)) + "\nActive: 50\n")
    rep = userevents.discovery_report(tmp_path, frozenset({"ev049"}), cap=10)
    assert rep["total"] == 50 and len(rep["events"]) == 10
    assert [e["name"] for e in rep["events"]][:2] == ["ev049", "ev000"]


def test_discovery_report_without_user_events_says_why(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    rep = userevents.discovery_report(tmp_path)
    assert rep["available"] is False and "CONFIG_USER_EVENTS" in rep["reason"]
    assert rep["events"] == [] and rep["total"] == 0


# --- agent: a user set attached after its rule ----------------------------------------------


class FakeConsumer:
    """Stands in for the perf rings (root and user_events needed): opens only the names in
    ``registered``, as the kernel would once a process registered them."""

    registered: set[str] = set()

    def __init__(self, name: str, tracefs: Path, pages: int = 64) -> None:
        if name not in self.registered:
            raise userevents.UserEventsError(f"user:{name}: no such user_event is registered")
        self.event = types.SimpleNamespace(name=name)
        self.perf = types.SimpleNamespace(
            rings=[], read=lambda: iter(()), read_batch=lambda payloads=True: userevents.PerfBatch()
        )
        self.counters = types.SimpleNamespace(dropped=0)
        self.reported_drops = 0

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def poll(self, timeout_s: float) -> list[Any]:
        return []


@pytest.fixture
def late_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setattr(userevents, "UserEventConsumer", FakeConsumer)
    monkeypatch.setattr(userevents, "RETRY_SECONDS", 0.05)
    monkeypatch.setattr(FakeConsumer, "registered", set())
    fake_tracefs(tmp_path, "\nActive: 0\nBusy: 0\n")
    engine = userevents.UserEventsEngine(SyntheticEngine(rate=0, seed=1), tracefs=tmp_path)
    yield engine, tmp_path
    engine.close()


def test_engine_reports_a_late_attach_as_a_status_update(late_engine: Any) -> None:
    engine, _ = late_engine
    statuses = engine.apply({"user:tf_late": EventSetConfig("user:tf_late", True)})
    [st] = [s for s in statuses if s.name == "user:tf_late"]
    assert (st.enabled, "no such user_event" in st.error) == (False, True)
    assert engine.status_updates() == []  # nothing changed since apply() said so
    FakeConsumer.registered.add("tf_late")  # a process registers it
    got = wait_until(engine.status_updates, what="status update after the late attach")
    assert [(s.name, s.enabled, s.attached, s.error) for s in got] == [
        ("user:tf_late", True, True, "")
    ]
    assert engine.status_updates() == []  # reported once


def test_late_attach_and_discovery_reach_the_controller_without_a_new_rule(
    late_engine: Any,
) -> None:
    engine, tracefs = late_engine
    ctl = InProcessController()
    stop = threading.Event()
    t = threading.Thread(
        target=run_agent, args=(engine, ctl.address, "ue-1", {"role": "web"}, stop, FAST)
    )
    t.start()
    try:
        node = wait_until(lambda: ctl.controller.fleet.nodes.get("ue-1"), what="register")
        res = ctl.call(ctl.controller.configure, "user:tf_late", True, "role=web")
        wait_until(lambda: node.applied_generation == res.generation, what="ack")

        def late() -> dict[str, Any]:
            return {s["name"]: s for s in node.info["statuses"]}.get("user:tf_late", {})

        wait_until(lambda: "no such user_event" in late().get("error", ""), what="error shown")
        wait_until(lambda: "user_events" in node.info, what="first report")
        assert node.info["user_events"] == {
            "available": True, "reason": "", "events": [], "total": 0,
        }  # fmt: skip
        # a process registers the event: the agent attaches and says so, no rule changed
        (tracefs / "user_events_status").write_text("tf_late # Used by perf\n\nActive: 1\n")
        FakeConsumer.registered.add("tf_late")
        generation = ctl.controller.generation
        wait_until(lambda: late().get("attached"), what="attached status at the controller")
        assert (late()["enabled"], late()["error"]) == (True, "")
        assert ctl.controller.generation == generation
        wait_until(lambda: node.info["user_events"]["events"], what="discovery")
        assert node.info["user_events"]["events"] == [
            {"name": "tf_late", "used_by": ["perf"], "attached": True}
        ]
        # and through the API, as `tracefleet status -o json` shows it
        st = cli_json(ctl.address, "status")
        [n] = st["nodes"]
        assert n["user_events"]["events"] == [
            {"name": "tf_late", "used_by": ["perf"], "attached": True}
        ]
    finally:
        stop.set()
        t.join(timeout=10)
        ctl.stop()


def cli_json(address: str, *argv: str) -> Any:
    import io

    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--controller", address, "-o", "json", *argv], out=out, err=err)
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue())


# --- controller: what an agent may report, and how status shows it --------------------------


def test_limits_keep_valid_names_bounded_and_marked_capped() -> None:
    limits = Limits(Refusals())
    rep = types_pb2.UserEventsReport(available=True, total=5)
    rep.events.add(name="ok_one", used_by=["perf", "rm -rf", "ftrace"], attached=True)
    rep.events.add(name="../etc/passwd")
    rep.events.add(name="x" * 300)
    got = limits.user_events(rep, "n1")
    assert got == {
        "available": True,
        "reason": "",
        "events": [{"name": "ok_one", "used_by": ["ftrace", "perf"], "attached": True}],
        "total": 5,
    }
    big = types_pb2.UserEventsReport(available=True, total=0, reason="r" * 10_000)
    for i in range(MAX_USER_EVENTS + 50):
        big.events.add(name=f"ev{i}")
    got = limits.user_events(big, "n1")
    assert len(got["events"]) == MAX_USER_EVENTS and got["total"] == MAX_USER_EVENTS
    assert len(got["reason"]) == 512
    # a list the controller capped is shown capped: total above what is kept
    big.total = MAX_USER_EVENTS + 50
    assert limits.user_events(big, "n1")["total"] == MAX_USER_EVENTS + 50


def node_status(name: str, **kw: Any) -> control_pb2.NodeStatus:
    return control_pb2.NodeStatus(name=name, **kw)


def test_status_table_registered_enabled_and_caps() -> None:
    ue = types_pb2.UserEventsReport(available=True, total=3)
    ue.events.add(name="tf_test", used_by=["perf"], attached=True)
    ue.events.add(name="tf_idle")
    web = node_status(
        "web-1",
        user_events=ue,
        statuses=[
            types_pb2.SetStatus(name="user:tf_test", enabled=True, attached=True),
            types_pb2.SetStatus(name="user:tf_late", error="no such user_event"),
        ],
        totals=[control_pb2.SetTotals(event_set="user:tf_test", delivered=40, dropped=2)],
    )
    old = node_status(  # an agent that does not report user_events
        "old-1", statuses=[types_pb2.SetStatus(name="user:tf_test", enabled=True)]
    )
    bare = node_status(  # no user_events in its kernel, no user set: nothing to say
        "bare-1", user_events=types_pb2.UserEventsReport(reason="no CONFIG_USER_EVENTS")
    )
    text = "\n".join(cli.user_events_text([web, old, bare]))
    rows = [line.split() for line in text.splitlines()[2:] if line.startswith(("web", "old"))]
    assert rows == [
        # NODE USER EVENT REGISTERED ENABLED USED BY DELIVERED DROPPED DISCARDED
        ["web-1", "user:tf_idle", "yes", "no", "-", "0", "0", "0"],
        ["web-1", "user:tf_late", "?", "waiting", "-", "0", "0", "0"],  # capped list
        ["web-1", "user:tf_test", "yes", "yes", "perf", "40", "2", "0"],
        ["old-1", "user:tf_test", "?", "yes", "-", "0", "0", "0"],
    ]
    assert re.search(r"NODE +USER EVENT +REGISTERED +ENABLED +USED BY +DELIVERED", text), text
    assert "web-1: 2 of 3 registered user_events listed" in text
    assert "bare-1" not in text
    web.user_events.total = 2  # complete list: an event not in it is not registered
    text = "\n".join(cli.user_events_text([web]))
    assert [ln.split()[:4] for ln in text.splitlines() if "tf_late" in ln] == [
        ["web-1", "user:tf_late", "no", "waiting"]
    ]
    assert cli.user_events_text([bare]) == []
    # the agent's text reaches a terminal escaped, never as control sequences
    web.user_events.reason = "tracefs\x1b[2J gone"
    text = "\n".join(cli.user_events_text([web]))
    assert "\x1b" not in text and "tracefs\\x1b[2J gone" in text, text
