"""What `capture`'s start-up costs, as counts rather than times (so they hold on a loaded or
emulated machine): the instructions the verifier walks per program (bpf_prog_info
.verified_insns; verifying is most of the start-up, about 100 ms per 49,000 instructions
here), the feature probes a set runs, and the libbpf lines formatted while it loads."""

from __future__ import annotations

import pytest

from tests.bpf.conftest import ALL_SETS, shared_engine
from tests.conftest import BPF_DIR

pytestmark = pytest.mark.bpf

# the filters and argument reads of an entry program; the byte-by-byte comm compare that
# used to be there took ~48,000 in every entry program alone
ENTRY_MAX_INSNS = 5000
# an exit program of file or net: emit, plus the executable's path walk and (open family)
# the opened file's; ~14,500 here, 38,700 when the walk kept its offset on the stack
EXIT_MAX_INSNS = 20000


def _verified(sets: tuple[str, ...], prefix: str) -> dict[str, int]:
    from tracefleet.agent.kernel import libbpf

    eng = shared_engine("exit-retry")  # the programs of every non-sleepable rung
    out = {}
    for name in sets:
        loaded = eng._sets[name].loaded
        assert loaded is not None, eng._sets[name].error
        for prog, fd in loaded.program_fds().items():
            if prog.startswith(prefix):
                out[prog] = libbpf.prog_verified_insns(fd)
    assert len(out) >= len(sets) and all(out.values()), out  # 0: the kernel did not say
    return out


def test_entry_programs_verify_in_few_instructions(host):
    costs = _verified(ALL_SETS, "tp_enter_")
    heavy = {p: n for p, n in costs.items() if n > ENTRY_MAX_INSNS}
    assert not heavy, f"entry programs above {ENTRY_MAX_INSNS} verified instructions: {heavy}"


def test_path_walks_verify_in_few_passes(host):
    costs = _verified(("file", "net"), "tp_exit_")
    heavy = {p: n for p, n in costs.items() if n > EXIT_MAX_INSNS}
    assert not heavy, f"exit programs above {EXIT_MAX_INSNS} verified instructions: {heavy}"


def test_a_set_probes_only_what_its_rungs_need_and_still_says_why_better_ones_failed(host):
    """Enabling `file` runs the feature probes of its ladder's rungs, not the vfs hooks'
    (fentry, d_path: ~30 ms each where refused); the refusals of the rungs above the one it
    runs keep the kernel's words, and the probe report still probes every feature."""
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig, Filters
    from tracefleet.agent.capture.ladder import FEATURE_PROBES, LADDER, RUNG_NEEDS
    from tracefleet.agent.kernel.abi import Strategy

    with BpfEngine(EngineOptions(bpf_dir=BPF_DIR, sets=("file",))) as eng:
        (st,) = eng.apply({"file": EventSetConfig("file", True, Filters(comms=("nothing",)))})
        assert st.enabled and st.attached, st
        ladder_features = {f for s in LADDER for f in RUNG_NEEDS[s]}
        assert set(eng._probes) == ladder_features
        loaded = eng._sets["file"].loaded
        assert loaded is not None
        chosen = Strategy.NOFAULT if loaded.strategy == Strategy.USER_FALLBACK else loaded.strategy
        for a in eng._sets["file"].attempts:
            if not a.ok:  # a better rung, refused: why, in the kernel's words
                assert a.reason, a
        assert eng._sets["file"].attempts[-1].ok
        assert LADDER.index(chosen) == len(eng._sets["file"].attempts) - 1
        report = eng.capabilities()
        assert set(report["features"]["probes"]) == {fp.feature for fp in FEATURE_PROBES}


def test_loading_a_set_formats_no_libbpf_debug_lines(host):
    """libbpf prints ~5,000 debug lines to load `file` (each CO-RE relocation); each was
    formatted in Python (~50 ms of start-up) though only a debug log shows them."""
    import logging

    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.kernel import libbpf

    logger = logging.getLogger("tracefleet.agent.libbpf")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with BpfEngine(EngineOptions(bpf_dir=BPF_DIR, sets=("file",))) as eng:
            before = libbpf.message_count()
            st = eng.ensure_loaded("file")
            assert st.loaded is not None, st.error
            printed = libbpf.message_count() - before
    finally:
        logger.setLevel(level)
    assert printed < 100, f"{printed} libbpf lines formatted to load file"
