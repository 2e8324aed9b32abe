"""Fixtures of the BPF suite: real kernel, real programs, no mocks.

Every test here needs root (as non-root they fail). A strategy the running kernel refuses
is skipped only if tests/expected_skips.json lists that refusal (errno and message) for
this kernel, e.g. the verifier's "can be sleepable" before 7.2; any other load failure
fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, WORKLOADS, require_root, scaled, skip_if_known_refusal

pytestmark = pytest.mark.bpf

ALL_SETS = ("file", "exec", "net")
STRATEGY_LABELS = ("sleepable", "fentry-sleepable", "exit-retry", "user-fallback", "nofault")

# One engine per forced strategy (None = the ladder's choice), shared by the whole session:
# loading runs the verifier over every program, which costs seconds per object (and much
# more under the emulated 7.2 guest), so tests reuse loaded engines and only flip bits.
_engines: dict[str | None, Any] = {}


def _check_host() -> None:
    require_root()
    from tracefleet.agent.kernel.hostcheck import HostCheckError, check_host

    # failures, not skips: a BPF run that cannot load anything must not pass empty
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.fail("BPF objects not built: run `make bpf`", pytrace=False)
    try:
        check_host()
    except HostCheckError as e:
        pytest.fail(f"host cannot run BPF capture: {e}", pytrace=False)


def shared_engine(strategy: str | None) -> Any:
    """A started engine forcing ``strategy`` on every set (loaded once per session)."""
    if strategy not in _engines:
        from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
        from tracefleet.agent.kernel.abi import Strategy

        forced = {n: Strategy.from_label(strategy) for n in ALL_SETS} if strategy else {}
        # a forced capture strategy means nothing to the vfs set (its rungs are hooks):
        # only the ladder's engine offers it
        sets = ALL_SETS if strategy else ()
        eng = BpfEngine(EngineOptions(strategies=forced, bpf_dir=BPF_DIR, hold_seconds=3600,
                                      sets=sets))  # fmt: skip
        eng.capabilities(load=True)  # loads every set through the (forced) ladder
        eng.start()
        _engines[strategy] = eng
    return _engines[strategy]


def ladder_report() -> dict[str, Any]:
    """What each rung of the ladder does on this kernel, per event set."""
    report: dict[str, Any] = {}
    for strat in STRATEGY_LABELS:
        caps = shared_engine(strat).capabilities()
        report[strat] = {
            name: (s["strategy"] is not None, s["reason"]) for name, s in caps["event_sets"].items()
        }
    return report


@pytest.fixture(scope="session")
def host() -> Iterator[None]:
    _check_host()
    yield
    for eng in _engines.values():
        eng.close()
    _engines.clear()


def need_strategy(strategy: str, event_set: str) -> None:
    ok, reason = ladder_report()[strategy][event_set]
    if not ok:
        skip_if_known_refusal(strategy, event_set, reason)


class Capture:
    """Events of a running BpfEngine, collected into a list by a background consumer."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.events: list[dict[str, Any]] = []
        self.sink = self.events.append
        engine.add_sink(self.sink)
        # consume in the background, as the agent does: the user-space fallback must read a
        # process while it still lives
        engine.start()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], n: int = 1,
                 timeout: float = 5.0) -> list[dict[str, Any]]:  # fmt: skip
        """Events matching ``pred`` once there are ``n``, or what there is after ``timeout``
        seconds (scaled to the machine)."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            time.sleep(0.02)
            got = [e for e in list(self.events) if pred(e)]
            if len(got) >= n or time.monotonic() > deadline:
                return got

    def for_pid(self, pid: int, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        return self.wait_for(lambda e: e["pid"] == pid, n, timeout)


@pytest.fixture
def capture(host: None) -> Iterator[Callable[..., Capture]]:
    """``capture(sets, strategy=None, filters=None, **engine_options)``: the shared engine
    of that strategy with ``sets`` enabled (a private engine if options are given)."""
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig, Filters
    from tracefleet.agent.kernel.abi import Strategy

    used: list[tuple[Any, Capture, bool]] = []

    def start(sets: list[str], strategy: str | None = None, filters: Filters | None = None,
              **opts: Any) -> Capture:  # fmt: skip
        if opts:
            forced = {n: Strategy.from_label(strategy) for n in sets} if strategy else {}
            eng = BpfEngine(EngineOptions(strategies=forced, bpf_dir=BPF_DIR, **opts))
            private = True
        else:
            eng = shared_engine(strategy)
            private = False
        cap = Capture(eng)
        used.append((eng, cap, private))
        statuses = eng.apply({n: EventSetConfig(n, True, filters or Filters()) for n in sets})
        for st in statuses:
            if st.name in sets:
                assert st.enabled and st.attached, st
        return cap

    yield start
    for eng, cap, private in used:
        if private:
            eng.close()
        else:
            eng.apply({})  # every bit off; the programs stay loaded for the next test
            eng.remove_sink(cap.sink)


def _swap_devices() -> list[str]:
    return [ln.split()[0] for ln in Path("/proc/swaps").read_text().splitlines()[1:] if ln]


def _sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise OSError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")


@pytest.fixture
def swap(host: None, tmp_path: Path) -> Iterator[str]:
    """A swap device for the duration of the test: the host's if it has one, else a small
    zram device (built in on the 6.18 host, or `modprobe zram`), else a swap file in TMPDIR;
    removed afterwards. Skipped, naming why, only where the kernel has no swap at all or
    neither can be made (the 7.2 guest: zram is a module and TMPDIR is a tmpfs)."""
    if not Path("/proc/swaps").exists():
        pytest.skip(f"kernel {os.uname().release} has no swap support (no /proc/swaps)")
    if _swap_devices():
        yield _swap_devices()[0]
        return
    ctl = Path("/sys/class/zram-control")
    why = []
    if not ctl.exists():
        try:
            subprocess.run(["modprobe", "zram", "num_devices=0"], capture_output=True)
        except FileNotFoundError:  # no kmod on this machine: zram only if built in
            why.append("no modprobe (kmod) to load zram")
    if ctl.exists():
        n = int((ctl / "hot_add").read_text())
        dev = f"/dev/zram{n}"
        try:
            Path(f"/sys/block/zram{n}/disksize").write_text("64M")
            _sh("mkswap", dev)
            _sh("swapon", dev)
        except OSError as e:
            (ctl / "hot_remove").write_text(str(n))
            pytest.fail(f"zram swap on {dev} could not be set up: {e}", pytrace=False)
        try:
            yield dev
        finally:
            subprocess.run(["swapoff", dev], check=False)
            (ctl / "hot_remove").write_text(str(n))
        return
    why.append("no zram in this kernel (built in or module)")
    f = tmp_path / "swapfile"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", "count=32"], check=True,
                       capture_output=True)  # fmt: skip
        f.chmod(0o600)
        _sh("mkswap", str(f))
        _sh("swapon", str(f))
    except (OSError, subprocess.CalledProcessError) as e:
        why.append(f"no swap file in {tmp_path} (a tmpfs takes none): {e}")
        pytest.skip("cannot create swap here: " + "; ".join(why))
    try:
        yield str(f)
    finally:
        subprocess.run(["swapoff", str(f)], check=False)


def run_workload(name: str, *args: str, hold_ms: int = 0) -> dict[str, Any]:
    cmd = [str(WORKLOADS / name), *args]
    if hold_ms:
        cmd += ["--hold-ms", str(hold_ms)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(30), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
