"""tracefleet CLI: exit codes scripts rely on, one-line errors with a fix, output formats."""

import io
import json

import pytest
import yaml

from tests.ports import free_port
from tests.unit.controller_helpers import InProcessController
from tracefleet.controller.common import env
from tracefleet.controller.operator import cli


@pytest.fixture(scope="module")
def controller():
    c = InProcessController()
    yield c
    c.stop()


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_unreachable_controller_exits_3_with_the_fix():
    code, out, err = run("--controller", f"127.0.0.1:{free_port()}", "--timeout", "3s", "status")
    assert code == cli.EXIT_UNREACHABLE == 3
    assert out == ""
    assert err.count("\n") == 1
    assert "cannot reach the controller" in err and "--controller" in err
    assert env.CONTROLLER in err


def test_env_var_names_the_controller(controller, monkeypatch):
    monkeypatch.setenv(env.CONTROLLER, controller.address)
    code, out, _ = run("status", "-o", "json")
    assert code == 0
    assert json.loads(out)["known_event_sets"] == ["exec", "file", "net", "vfs"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["enable", "file", "--selector", "role"], "has no '='"),
        (["enable", "file", "--selector", "role=db,,zone=a"], "extra comma"),
        (["enable", "file", "--ttl", "10x"], "bad duration"),
        (["enable", "file", "--canary", "150"], "canary must be 1..100"),
        (["enable", "file", "--pid", "-3"], "a pid must be 1..4194304"),
        # issue 15: each of these was a traceback or went through to the controller
        (["enable", "file", "--ttl", "nan"], "bad duration 'nan'"),
        (["enable", "file", "--ttl", "inf"], "out of range"),
        (["enable", "file", "--ttl", "99999999999d"], "out of range: use 0 to 366d"),
        (["enable", "file", "--pid", "99999999999999"], "a pid must be 1..4194304"),
        (["enable", "file", "--cgroup-id", "1e23"], "a cgroup id must be a whole number"),
        (
            ["enable", "file", "--cgroup-id", str(2**64)],
            "a cgroup id must be 1..18446744073709551615",
        ),
        (["top", "--limit", "1e21"], "the limit must be a whole number 1..10000"),
        (["top", "--limit", "1000000000000000000000"], "the limit must be 1..10000"),
        (["events", "--count", "99999999999999999"], "the count must be 1..1000000000"),
        (["enable", "file", "--node", ""], "bad node name ''"),
        (["node", "rm", ""], "bad node name ''"),
        (["enable", "file", "--selector", "node=" + "a" * 3_000_000], "at most 4096"),
        (["status", "--output", "xml"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--controller", "127.0.0.1:1", *argv])
    assert e.value.code == cli.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "--help" in err


def test_unknown_event_set_is_rejected_with_the_known_list(controller):
    code, out, err = run("--controller", controller.address, "enable", "fiel")
    assert code == cli.EXIT_REJECTED == 4
    assert out == ""
    assert "unknown event set 'fiel'" in err and "exec, file, net, vfs" in err
    assert err.count("\n") == 1


def test_enable_disable_outputs(controller):
    addr = ["--controller", controller.address]
    code, out, err = run(
        *addr, "enable", "file", "--selector", "role=db", "--ttl", "10m", "-o", "json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["changed"] is True and data["event_set"] == "file" and data["enabled"] is True
    assert data["matched_nodes"] == [] and data["expires_at"].endswith("Z")
    assert "no known node matches" in err
    code, out, _ = run(
        *addr, "enable", "file", "--selector", "role=db", "--ttl", "10m", "-o", "yaml"
    )
    again = yaml.safe_load(out)
    assert code == 0 and again["changed"] is False and again["generation"] == data["generation"]
    code, out, _ = run(*addr, "disable", "file", "--wait")
    assert code == 0 and out.startswith("file: disabled on 0 node(s), generation")
    code, out, _ = run(*addr, "status")
    assert code == 0 and "file  off" in out
    code, out, _ = run(*addr, "top", "-o", "json")
    assert code == 0 and json.loads(out)["rows"] == []
    code, out, err = run(*addr, "events", "--duration", "0.5s", "-o", "json")
    assert code == 0 and out == "" and "no events" in err


def test_help_documents_exit_codes_and_default_address(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert env.DEFAULT_CONTROLLER in text and env.CONTROLLER in text
    for line in ("3  controller unreachable", "4  rejected by the controller", "examples:"):
        assert line in text


def test_a_signal_ends_the_cli_even_when_grpc_never_lets_go(tmp_path):
    """Ctrl-C/SIGTERM on `tracefleet events` cancels the stream; if grpc then hangs (CI saw the
    CLI alive 30 s after a SIGTERM), the process still ends, saying why, instead of waiting
    forever. The stream here ignores cancel() and never yields."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            """
            import io, sys, threading, time
            from tracefleet.controller.operator import cli

            class Stuck:  # a stream whose cancel() does nothing
                def cancel(self):
                    return True

            cli._SignalCancel(Stuck(), sys.stderr, threading.Event())
            print("ready", flush=True)
            while True:  # grpc waiting for a message that never comes
                time.sleep(0.1)
            """
        )
    )
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=120)  # the grace is 5 s; generous for a loaded host
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the CLI ignored SIGTERM while its stream hung")
    assert p.returncode == 130
    assert "did not close within" in err and "exiting" in err


def test_status_shows_kernel_skipped_runs_once_in_table_and_json():
    """The kernel-skipped runs an agent reports reach `status` (table and -o json) summed
    once: a resent batch (same instance and seq) does not add them again. A set with skips
    and no call accounting (vfs) is listed too, its PENDING not computed."""
    from tracefleet.controller.domain.fleet import Connection
    from tracefleet.v1 import agent_pb2

    c = InProcessController()
    try:
        ctl = c.controller
        reg = agent_pb2.Register(node_name="ks1", instance_id="i1", event_sets=["file", "vfs"])
        node = c.call(ctl.on_register, reg, Connection())
        for seq, (entry, exit_) in enumerate([(3, 1), (4, 0)], start=1):
            b = agent_pb2.ResultBatch(instance_id="i1", seq=seq, interval_end_ns=1)
            b.sets.add(event_set="file", delivered=5, passed=6, lost=1, lost_deleted=1,
                       kernel_missed_entry=entry, kernel_missed_exit=exit_)  # fmt: skip
            b.sets.add(event_set="vfs", delivered=9, kernel_missed_entry=2)
            c.call(ctl.on_batch, node, b)
        c.call(ctl.on_batch, node, b)  # the last one again, as after a reconnect: ignored
        addr = ["--controller", c.address]
        code, out, _ = run(*addr, "status", "-o", "json")
        assert code == 0
        [n] = json.loads(out)["nodes"]
        totals = {t["event_set"]: t for t in n["totals"]}
        assert int(totals["file"]["kernel_missed_entry"]) == 7
        assert int(totals["file"]["kernel_missed_exit"]) == 1
        assert int(totals["vfs"]["kernel_missed_entry"]) == 4
        assert int(n["batches_duplicate"]) == 1
        code, out, _ = run(*addr, "status")
        assert code == 0
        lines = out.splitlines()
        [title] = [ln for ln in lines if ln.startswith("calls that passed the filters")]
        assert "KERNEL SKIPPED: runs of the set's programs the kernel skipped" in title
        assert "KERNEL SKIPPED ENTRY/EXIT" in lines[lines.index(title) + 1]
        rows = {r[1]: r for ln in lines if (r := ln.split())[:1] == ["ks1"] and len(r) == 12}
        assert rows["file"][2] == "12" and rows["file"][-2:] == ["0", "7/1"], out
        assert rows["vfs"][2] == "0" and rows["vfs"][-2:] == ["-", "4/0"], out
    finally:
        c.stop()
