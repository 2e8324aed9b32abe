"""The load generator's engine shares one aggregate per (set, event count) between its agents;
what each agent reports must still add up: totals() is the sum of every collect(), produced()
its delivered + dropped, and a caller changing the counts of what it got changes nothing
else."""

from __future__ import annotations

from tests.loadgen import SyntheticEngine
from tracefleet.agent.capture.engine import EventSetConfig, SetAggregate, add_all


def _sum(aggs: list[SetAggregate]) -> SetAggregate:
    out = SetAggregate()
    for a in aggs:
        add_all(out, a)
    return out


def test_totals_are_the_sum_of_every_interval_and_callers_own_their_counts() -> None:
    engines = [SyntheticEngine(5000.0, seed=i) for i in range(3)]
    got: list[dict[str, list[SetAggregate]]] = [{} for _ in engines]
    for e in engines:
        e.apply({"file": EventSetConfig("file", True), "net": EventSetConfig("net", True)})
    for step in range(40):
        for e, seen in zip(engines, got, strict=True):
            e._last_collect -= 10_000_000  # 10 ms of made-up time per interval
            agg = e.collect()
            for name, sa in agg.sets.items():
                seen.setdefault(name, []).append(sa)
                if step % 3 == 0:  # a caller may change the counts it was handed
                    sa.delivered += 1_000_000
                    sa.dropped += 7
    for e, seen in zip(engines, got, strict=True):
        totals = e.totals()
        assert set(totals) == set(seen) == {"file", "net"}
        for name, aggs in seen.items():
            want = _sum(aggs)
            want.delivered -= 1_000_000 * len(range(0, 40, 3))  # the callers' own changes
            want.dropped -= 7 * len(range(0, 40, 3))
            t = totals[name]
            assert (t.delivered, t.dropped) == (want.delivered, want.dropped) != (0, 0)
            assert t.events_by_syscall == want.events_by_syscall
            assert t.outcomes == want.outcomes
            assert t.latency.counts == want.latency.counts
            assert e.produced()[name] == t.delivered + t.dropped
