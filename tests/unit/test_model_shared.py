"""One home per concept (tracefleet.model): the agent and the controller use the same
histogram, outcome and strategy names, address, label and TLS-directory parsing, and argparse
integer types, so the two cannot disagree."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from tests import loadgen
from tracefleet.agent import cli as agent_cli
from tracefleet.agent.control.tls import AgentTLS, AgentTLSError
from tracefleet.agent.kernel.abi import Status, Strategy
from tracefleet.controller.api.tls import TLSConfigError, read_tls_dir
from tracefleet.model import netaddr

# the tests import tracefleet.model where they use it, so that each one runs (and fails) on
# its own against a tree without the shared modules


def test_histogram_bulk_add_counts_and_cumulative_buckets():
    from tracefleet.model.histogram import LATENCY_BUCKETS_SECONDS, Histogram, HistogramMismatch

    h = Histogram()
    assert len(h.counts) == len(LATENCY_BUCKETS_SECONDS) + 1
    h.observe(3e-6)
    bulk = [0] * len(h.counts)
    bulk[0], bulk[-1] = 4, 2
    h.add_counts(bulk, 20.5)
    assert h.count == 7 and h.sum == pytest.approx(20.5 + 3e-6)
    buckets = h.cumulative_buckets()
    assert buckets[0] == ("1e-06", 4.0) and buckets[2] == ("5e-06", 5.0)
    assert buckets[-1] == ("+Inf", 7.0)
    with pytest.raises(HistogramMismatch, match="cannot add 3 bucket counts"):
        h.add_counts([1, 2, 3], 0.0)
    # one name for the sum: the agent's old ``total`` is refused, not silently added
    with pytest.raises(AttributeError):
        setattr(h, "total", 1.0)  # noqa: B010 (an attribute the type does not have)


def test_agent_engine_and_controller_aggregate_share_one_histogram():
    from tracefleet.agent.capture.engine import Histogram as AgentHistogram
    from tracefleet.controller.domain.aggregate import Hist
    from tracefleet.model.histogram import Histogram

    assert AgentHistogram is Histogram and Hist is Histogram


def test_kernel_statuses_and_strategies_are_the_shared_names():
    from tracefleet.model.names import OUTCOMES, STRATEGIES

    kernel_statuses = {s.label for s in Status} - {"none", "pending"}
    assert kernel_statuses == set(OUTCOMES)
    assert tuple(s.label for s in Strategy if s != Strategy.NONE) == STRATEGIES
    assert ("auto", *STRATEGIES) == agent_cli.STRATEGY_CHOICES


@pytest.mark.parametrize("bad", ["unix:relative", "unix:/a\0b", "unix:/" + "x" * 107])
def test_agent_cli_and_the_shared_parser_refuse_the_same_unix_addresses(bad):
    with pytest.raises(ValueError, match="unix:/ABSOLUTE/PATH"):
        agent_cli.check_address(bad)
    with pytest.raises(ValueError, match="unix:/ABSOLUTE/PATH"):
        netaddr.check_address(bad)


def test_agent_addresses():
    assert agent_cli.check_address(" unix:/run/x.sock ") == "unix:/run/x.sock"
    assert agent_cli.check_address("[::1]:7070") == "[::1]:7070"
    for bad in ("127.0.0.1:0", ":7070", "host", "host:99999"):
        with pytest.raises(ValueError, match="use host:port"):
            agent_cli.check_address(bad)
    assert agent_cli.check_address("0.0.0.0:0", listen=True) == "0.0.0.0:0"
    with pytest.raises(ValueError):
        agent_cli.check_address("unix:/run/x.sock", listen=True)


def test_labels_are_checked_alike_by_agent_and_load_generator():
    assert loadgen.parse_labels(" zone = a ,role=db,") == {"zone": "a", "role": "db"}
    for bad, why in (("role", "key=value"), ("=x", "key=value"), ("a b=1", "Kubernetes")):
        with pytest.raises(ValueError, match=why):
            loadgen.parse_labels(bad)


def test_int_types_name_option_range_and_hint():
    with pytest.raises(argparse.ArgumentTypeError) as e:
        agent_cli._inflight_entries("many")
    assert "--inflight-entries" in str(e.value) and "64..1048576" in str(e.value)
    with pytest.raises(argparse.ArgumentTypeError) as e:
        agent_cli._inflight_entries("10")
    assert "64..1048576" in str(e.value) and "threads that may block" in str(e.value)
    assert agent_cli._inflight_entries("4096") == 4096


def test_tls_directory_errors_are_worded_alike(tmp_path):
    with pytest.raises(AgentTLSError) as agent_err:
        AgentTLS(tmp_path)
    with pytest.raises(TLSConfigError) as controller_err:
        read_tls_dir(tmp_path)
    from tracefleet.controller.operator import cli as controller_cli

    with pytest.raises(controller_cli.CliError) as operator_err:  # the CLI's --tls-dir
        controller_cli._operator_credentials(str(tmp_path))
    assert "'tracefleet certs operator', or unset --tls-dir" in str(operator_err.value)
    for e in (agent_err.value, controller_err.value, operator_err.value):
        assert str(e).startswith(f"cannot read {tmp_path}/ca.crt: No such file or directory")
        assert "the TLS directory holds ca.crt, tls.crt, tls.key; make them with" in str(e)


def test_api_enums_use_the_shared_names():
    from tracefleet.model.names import ALL_STRATEGIES, OUTCOMES
    from tracefleet.v1 import types_pb2

    def labels(enum: Any, prefix: str) -> list[str]:  # minus the UNSPECIFIED zero
        names = [v.name for v in enum.DESCRIPTOR.values]
        return [n.removeprefix(prefix).lower().replace("_", "-") for n in names][1:]

    assert tuple(labels(types_pb2.Strategy, "STRATEGY_")) == ALL_STRATEGIES
    # the API's ArgStatus may lag (a status also travels as text): never a name of its own
    assert set(labels(types_pb2.ArgStatus, "ARG_STATUS_")) <= set(OUTCOMES)


def test_histogram_bucket_edges():
    from tracefleet.model.histogram import Histogram

    h = Histogram((0.001, 0.01, 0.1))
    for v, want in ((0.0, 0), (0.001, 0), (0.0011, 1), (0.01, 1), (0.1, 2), (0.2, 3)):
        assert h.bucket(v) == want, v
    for v in (0.0, 0.001, 0.0011, 0.01, 0.1, 0.2):
        h.observe(v)
    assert h.counts == [2, 2, 1, 1]


def test_histogram_observe_many_counts_as_observe_does() -> None:
    """Bulk observation (user_events' count-only batches) equals one observe() per value,
    on the bounds, between them and beyond the last."""
    import random

    from tracefleet.model.histogram import Histogram

    rng = random.Random(7)
    values = [*Histogram().bounds, *(b + 1e-12 for b in Histogram().bounds), 0.0, 99.0]
    values += [rng.uniform(0, 12) for _ in range(300)]
    want, got = Histogram(), Histogram()
    for v in values:
        want.observe(v)
    got.observe_many(iter(values))
    assert got.counts == want.counts and got.count == len(values)
    assert got.sum == pytest.approx(want.sum, rel=1e-12)
    got.observe_many([])
    assert got.count == len(values)
