"""Ring records are as long as their data (the encoding documented in events.h), measured
from the ring on the real kernel: each record's size is exactly what the encoding gives for
what it holds, so a 3-byte path costs 197 bytes less than a 200-byte one (the fixed-size
records before were 816 bytes for `file`, 2,496 for `exec`, 696 for `vfs`). A record cut
short is counted as a decode error by the consumer, never raised."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, scaled, wait_until
from tracefleet.agent.capture.decode import TF_ARGVH_SIZE, TF_STRH_SIZE, decode_record
from tracefleet.agent.kernel.abi import TfEvent, TfExecEvent, TfVfsEvent

pytestmark = pytest.mark.bpf


class Tapped:
    """An engine for one set whose ring records are also kept raw, as the ring hands them
    over (the consumer's callback is bound when the set's ring is created, at load)."""

    def __init__(self, set_name: str, comm: str) -> None:
        from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
        from tracefleet.agent.capture.engine import EventSetConfig, Filters

        self.raws: list[bytes] = []
        # every record through on_record (the compiled decode would hand over dicts instead)
        self.eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, hold_seconds=3600,
                                           sets=(set_name,), compiled_decode=False))  # fmt: skip
        consume = self.eng.ring.on_record

        def tap(raw: bytes, *rest: Any) -> None:  # (raw, receive time, flags) or (raw,)
            self.raws.append(bytes(raw))
            consume(raw, *rest)

        self.eng.ring.on_record = tap  # type: ignore[method-assign]
        self.eng.add_sink(lambda ev: None)  # decode every record, as a real consumer does
        st = self.eng.apply({set_name: EventSetConfig(set_name, True, Filters(comms=(comm,)))})
        assert [s for s in st if s.name == set_name and s.enabled and s.attached], st
        self.eng.start()

    def records(self, want: Any, n: int, what: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Wait for n records whose decoded event satisfies want(ev)."""

        def found() -> list[tuple[bytes, dict[str, Any]]] | None:
            self.eng.drain()
            hits = [(r, ev) for r in list(self.raws) for ev in [decode_record(r, 0)[0]]
                    if want(ev)]  # fmt: skip
            return hits if len(hits) >= n else None

        return wait_until(found, scaled(30), what)

    def close(self) -> None:
        self.eng.apply({})
        self.eng.close()


@pytest.fixture
def tapped(host: None) -> Iterator[Any]:
    made: list[Tapped] = []

    def make(set_name: str, comm: str) -> Tapped:
        made.append(Tapped(set_name, comm))
        return made[-1]

    yield make
    for t in made:
        t.close()


def run_as(comm: str, script: str, *args: str) -> None:
    prog = f"import ctypes; ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n" + script
    out = subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True,
                         timeout=scaled(60))  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_file_record_is_as_long_as_its_path(tapped: Any) -> None:
    t = tapped("file", "tf_rsz_file")
    short, long_ = "/zq", "/" + "z" * 199  # neither exists: ENOENT, no kernel path
    script = "import os, sys\nfor p in sys.argv[1:]:\n    try: os.open(p, os.O_RDONLY)\n" \
             "    except FileNotFoundError: pass\n"  # fmt: skip
    run_as("tf_rsz_file", script, short, long_)

    def opened(p: str) -> Any:
        return lambda ev: ev["syscall"] == "openat" and ev["args"]["pathname"]["value"] == p

    [(raw_s, ev_s)] = t.records(opened(short), 1, "the openat of the 3-byte path")
    [(raw_l, _)] = t.records(opened(long_), 1, "the openat of the 200-byte path")
    assert ev_s["args"]["pathname"]["status"] == "ok"
    # header + iargs, then three string heads (path, the unused kernel path, no blob)
    fixed = TfEvent.str.offset + 3 * TF_STRH_SIZE
    assert len(raw_s) == fixed + 3, len(raw_s)
    assert len(raw_l) == fixed + 200, len(raw_l)
    assert len(raw_l) - len(raw_s) == 197
    assert len(raw_s) * 4 < 816  # the fixed-size record it replaces


def test_exec_record_is_as_long_as_its_filename_and_argv(tapped: Any) -> None:
    t = tapped("exec", "tf_rsz_exec")
    argv = ["true", "a" * 100, "b"]
    script = "import os, sys\nos.execv('/bin/true', sys.argv[1:])\n"
    run_as("tf_rsz_exec", script, *argv)
    [(raw, ev)] = t.records(
        lambda ev: ev["syscall"] == "execve" and ev["args"]["argv"]["value"] == argv, 1,
        "the execve of /bin/true with its argv")  # fmt: skip
    assert ev["args"]["filename"]["value"] == "/bin/true"
    want = (TfExecEvent.filename.offset + TF_STRH_SIZE + len("/bin/true") + TF_ARGVH_SIZE
            + sum(2 + len(a) for a in argv))  # fmt: skip
    assert len(raw) == want, (len(raw), want)


def test_vfs_records_are_as_long_as_their_paths(tapped: Any, tmp_path: Path) -> None:
    t = tapped("vfs", "tf_rsz_vfs")
    d = Path(os.path.realpath(tmp_path))
    short, long_ = d / "x", d / ("y" * 190)
    script = "import os, sys\nfor p in sys.argv[1:]:\n" \
             "    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))\n"  # fmt: skip
    run_as("tf_rsz_vfs", script, str(short), str(long_))
    for p in (short, long_):
        got = t.records(lambda ev, p=p: ev["args"]["path"]["value"] == str(p), 2,
                        f"the open and close of {p}")  # fmt: skip
        assert sorted(ev["syscall"] for _, ev in got) == ["vfs_close", "vfs_open"]
        for raw, ev in got:
            want = TfVfsEvent.path.offset + 2 * TF_STRH_SIZE + len(str(p).encode())
            assert len(raw) == want, (ev["syscall"], len(raw), want)


def test_truncated_records_are_counted_as_decode_errors(tapped: Any) -> None:
    t = tapped("file", "tf_rsz_trunc")
    script = "import os, sys\ntry: os.open(sys.argv[1], os.O_RDONLY)\n" \
             "except FileNotFoundError: pass\n"  # fmt: skip
    run_as("tf_rsz_trunc", script, "/tf-rsz-missing")
    [(raw, _)] = t.records(
        lambda ev: ev["args"].get("pathname", {}).get("value") == "/tf-rsz-missing", 1,
        "the openat")  # fmt: skip
    before = t.eng.errors.counts[("file", "decode")]
    # cut short: in the last string, in a string head, in the fixed part past the header
    cuts = [len(raw) - 1, len(raw) - 5, TfEvent.str.offset + 3, TfEvent.iargs.offset + 10]
    for cut in cuts:  # a real record cut short, and one with a byte too many
        t.eng.ring.on_record(raw[:cut])
    t.eng.ring.on_record(raw + b"\0")
    assert t.eng.errors.counts[("file", "decode")] - before == len(cuts) + 1
