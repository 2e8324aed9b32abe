"""What loading an event set costs the verifier, per program: counts the kernel reports
(bpf_prog_info.verified_insns), not times, so they hold on a loaded or emulated machine.
Verifying is most of `capture`'s start-up (about 100 ms per 49,000 instructions here)."""

from __future__ import annotations

import pytest

from tests.bpf.conftest import ALL_SETS, shared_engine

pytestmark = pytest.mark.bpf

# the filters and argument reads of an entry program; the byte-by-byte comm compare that
# used to be there took ~48,000 in every entry program alone
ENTRY_MAX_INSNS = 5000


def test_entry_programs_verify_in_few_instructions(host):
    from tracefleet.agent.kernel import libbpf

    eng = shared_engine("exit-retry")  # the entry programs of every non-sleepable rung
    costs = {}
    for name in ALL_SETS:
        loaded = eng._sets[name].loaded
        assert loaded is not None, eng._sets[name].error
        for prog, fd in loaded.program_fds().items():
            if prog.startswith("tp_enter_"):
                costs[prog] = libbpf.prog_verified_insns(fd)
    assert len(costs) >= len(ALL_SETS), costs
    heavy = {p: n for p, n in costs.items() if n > ENTRY_MAX_INSNS}
    assert not heavy, f"entry programs above {ENTRY_MAX_INSNS} verified instructions: {heavy}"
