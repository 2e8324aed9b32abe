"""The SQLite store: generation monotonic and durable, rules and nodes survive a reopen."""

import pytest

from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.store import NodeRecord, Store, StoreError
from tracefleet.model.filters import Filters


def test_generation_is_monotonic_and_survives_reopen(tmp_path):
    path = str(tmp_path / "sub" / "c.db")  # parent directory is created
    s = Store(path)
    assert s.generation() == 0
    gens = [s.put_rules([Rule("file", True, "role=db")])[0] for _ in range(3)]
    assert gens == [1, 2, 3]
    s.close()
    s = Store(path)
    assert s.generation() == 3
    gen, (stored,) = s.put_rules([Rule("exec", True)])
    assert gen == 4 and stored.generation == 4
    s.close()


def test_rules_round_trip(tmp_path):
    path = str(tmp_path / "c.db")
    s = Store(path)
    rule = Rule(
        "file",
        True,
        "role=db,zone=a",
        Filters(pids=(1, 2), comms=("postgres",), cgroup_ids=(7,), path_prefixes=("/etc",)),
        canary_percent=10,
        sample_rate=0.25,
        expires_at=1234.5,
    )
    gen, _ = s.put_rules([rule, Rule("exec", False)])
    s.close()
    s = Store(path)
    rules = {r.event_set: r for r in s.rules()}
    assert rules["file"] == rule.with_changes(generation=gen)
    assert rules["exec"].enabled is False and rules["exec"].generation == gen
    s.update_expiry("file", 99.0)  # no new generation
    assert s.generation() == gen
    assert {r.event_set: r for r in s.rules()}["file"].expires_at == 99.0
    s.close()


def test_ensure_generation_above():
    s = Store(":memory:")
    s.put_rules([Rule("file", True)])
    assert s.ensure_generation_above(0) == 1  # already above
    assert s.ensure_generation_above(41) == 42
    assert s.put_rules([Rule("file", False)])[0] == 43


def test_nodes_round_trip(tmp_path):
    path = str(tmp_path / "c.db")
    s = Store(path)
    rec = NodeRecord("db-1", {"role": "db"}, "6.18", "0.1", {"event_sets": ["file"]}, 7, 1e9)
    s.put_nodes([rec])
    s.put_nodes([NodeRecord("db-1", {"role": "db"}, "6.18", "0.1", {}, 8, 2e9)])
    s.close()
    (got,) = Store(path).nodes()
    assert got.applied_generation == 8 and got.last_seen == 2e9 and got.labels == {"role": "db"}


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot"):
        Store(str(blocker / "c.db"))
