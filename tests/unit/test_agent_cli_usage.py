"""Agent CLI input errors that need no kernel access."""

from __future__ import annotations

import subprocess
import sys

AGENT = [sys.executable, "-m", "tracefleet.agent"]


def test_unknown_event_set_is_a_usage_error_listing_known_sets():
    out = subprocess.run([*AGENT, "capture", "-e", "file,bogus"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "unknown event set 'bogus'" in out.stderr and "file, exec, net" in out.stderr


def test_help_teaches_with_examples_and_strategies():
    out = subprocess.run([*AGENT, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for needle in ("tracefleet-agent capture --event-set file", "exit-retry", "exit codes"):
        assert needle in out.stdout


def test_bad_label_is_rejected():
    out = subprocess.run([*AGENT, "run", "--controller", "127.0.0.1:1", "--labels", "role"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "key=value" in out.stderr


def test_filter_values_are_range_checked_not_truncated() -> None:
    """issue 15: --pid -5 was truncated to 4294967291 in the kernel filter."""
    from tracefleet.agent import cli

    p = cli.build_parser()
    for argv, fragment in (
        (["capture", "-e", "file", "--pid", "-5"], "a pid must be 1..4194304, not '-5'"),
        (["capture", "-e", "file", "--pid", "99999999999999"], "a pid must be 1..4194304"),
        (["capture", "-e", "file", "--cgroup-id", "1e23"], "a cgroup id must be a whole number"),
        (["capture", "-e", "file", "--cgroup-id", str(2**64)], "a cgroup id must be 1.."),
        (["capture", "-e", "file", "--comm", "x" * 16], "1..15 printable bytes"),
        (["run", "--node", ""], "bad node name ''"),
        (["run", "--labels", "role=" + "x" * 64], "keys and values as in Kubernetes"),
        (["run", "--labels", "ro le=db"], "keys and values as in Kubernetes"),
    ):
        out = subprocess.run([*AGENT, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (argv, out.stderr)
        assert fragment in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)
    assert p.parse_args(["capture", "-e", "file", "--pid", "4194304"]).pid == [4194304]


def test_build_filter_refuses_values_ctypes_would_truncate() -> None:
    import pytest

    from tracefleet.agent.capture.bpfengine import FilterError, build_filter
    from tracefleet.agent.capture.engine import Filters
    from tracefleet.agent.kernel import abi

    ctl = abi.TfControl()
    with pytest.raises(FilterError, match=r"pids must be 1\.\.4194304, got -5"):
        build_filter(ctl, 0, Filters(pids=(-5,)))
    build_filter(ctl, 0, Filters(pids=(42,)))
    assert ctl.filter[0].pids[0] == 42


def test_bad_otlp_metrics_endpoint_is_a_usage_error():
    for value, fragment in (("collector:4317", "use grpc:HOST:PORT or http://"),):
        out = subprocess.run([*AGENT, "run", "--controller", "unix:/nonexistent.sock",
                              "--node", "n1", "--otlp-metrics", value],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 2 and fragment in out.stderr, out.stderr
    out = subprocess.run([*AGENT, "run", "--controller", "unix:/nonexistent.sock", "--node",
                          "n1", "--otlp-metrics", "grpc:h:4317", "--otlp-metrics-interval",
                          "0"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "0.1 to 3600 seconds" in out.stderr, out.stderr


def test_controller_takes_a_list_of_replicas_and_names_a_bad_address():
    from tracefleet.agent.cli import controller_addresses

    got = controller_addresses(["10.0.0.5:7070,10.0.0.6:7070", " 10.0.0.7:7070", "10.0.0.5:7070"])
    assert got == ["10.0.0.5:7070", "10.0.0.6:7070", "10.0.0.7:7070"]
    assert controller_addresses(["unix:/run/tracefleet/controller.sock"]) == [
        "unix:/run/tracefleet/controller.sock"
    ]
    out = subprocess.run([*AGENT, "run", "--controller", "127.0.0.1:7070,ctl-b", "--node", "n1",
                          "--metrics-listen", "off"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 2 and "'ctl-b'" in out.stderr and "host:port" in out.stderr
    out = subprocess.run([*AGENT, "run", "--controller", "127.0.0.1:7070,,127.0.0.1:7071",
                          "--node", "n1"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "empty address" in out.stderr
    # every address is held to the TLS rule, not only the first
    out = subprocess.run([*AGENT, "run", "--controller", "127.0.0.1:7070",
                          "--controller", "10.0.0.6:7070", "--node", "n1"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "refusing to talk to 10.0.0.6:7070 without TLS" in out.stderr
    help_text = subprocess.run([*AGENT, "run", "--help"], capture_output=True, text=True,
                               timeout=30).stdout  # fmt: skip
    assert "moves to the next" in " ".join(help_text.split())


def test_ring_size_must_be_a_power_of_two_mib() -> None:
    """--ring-mib: the kernel refuses a BPF ring buffer that is not a power of two; the CLI
    says so before loading anything, and a good value reaches the engine in bytes."""
    import argparse

    from tracefleet.agent import cli

    for bad, fragment in (("3", "must be a power of two"), ("0", "must be 1..1024"),
                          ("2048", "must be 1..1024"), ("8M", "whole number")):  # fmt: skip
        try:
            cli._ring_mib(bad)
        except argparse.ArgumentTypeError as e:
            assert fragment in str(e), (bad, str(e))
        else:
            raise AssertionError(f"--ring-mib {bad} accepted")
    args = cli.build_parser().parse_args(["run", "--ring-mib", "64"])
    assert args.ring_mib << 20 == 64 << 20
    assert cli.build_parser().parse_args(["capture", "-e", "file"]).ring_mib == 8
