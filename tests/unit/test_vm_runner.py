"""Unit tests for the pure parts of tests/vm/run.py (no root, no qemu)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import shlex
import struct
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "vm" / "run.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tfvm_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tfvm_run"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


vm = _load()

NONCE = "0123456789abcdef"
JUNIT = b"""<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite
 name="pytest" errors="1" failures="1" skipped="2" tests="5" time="1.0">
<testcase classname="tests.bpf.test_capture" name="test_openat" time="0.5" />
<testcase classname="tests.bpf.test_capture" name="test_exit_retry[cold]" time="0.1">
  <failure message="AssertionError: lost 3 events&#10;assert 97 == 100">trace</failure>
</testcase>
<testcase classname="tests.e2e.test_agent" name="test_fentry" time="0.0">
  <skipped type="pytest.skip" message="fentry refused: EPERM">tests/e2e/test_agent.py:9:
  fentry refused: EPERM</skipped>
</testcase>
<testcase classname="tests.e2e.test_agent" name="test_known_bug" time="0.0">
  <skipped type="pytest.xfail" message="issue 12" />
</testcase>
<testcase classname="tests.e2e.test_agent" name="test_setup" time="0.0">
  <error message="failed on setup with &quot;OSError: boom&quot;">...</error>
</testcase>
</testsuite></testsuites>"""


def m(text: str) -> str:
    return f"@@TFVM {NONCE} {text}@@"


def junit_block(data: bytes, width: int = 76) -> list[str]:
    b64 = base64.b64encode(data).decode()
    digest = hashlib.sha256(data).hexdigest()
    lines = [m(f"BEGIN junit bytes={len(data)} sha256={digest}")]
    lines += [b64[i : i + width] for i in range(0, len(b64), width)]
    lines.append(m("END junit"))
    return lines


# --- console parsing ---------------------------------------------------------------------


def test_parse_console_happy_path() -> None:
    lines = [
        "[    0.000000] Linux version 7.2.13+deb14-amd64",
        m("STAGE init uptime=5.10"),
        m("INFO kernel=7.2.13+deb14-amd64"),
        m("STAGE pytest-start uptime=8.25"),
        "tests/bpf/test_capture.py::test_openat PASSED",
        m("STAGE pytest-end uptime=20.5"),
        *junit_block(JUNIT),
        m("STATUS 1"),
        "[   21.000000] reboot: Power down",
    ]
    rep = vm.parse_console(lines, NONCE)
    assert rep.status == 1
    assert rep.junit == JUNIT
    assert rep.junit_error is None
    assert rep.info == {"kernel": "7.2.13+deb14-amd64"}
    assert rep.stages == {"init": 5.10, "pytest-start": 8.25, "pytest-end": 20.5}
    assert rep.errors == []


def test_parse_console_tolerates_cr_and_kernel_messages_in_block() -> None:
    block = junit_block(JUNIT)
    garbled = [block[0] + "\r"]
    for i, line in enumerate(block[1:-1]):
        if i == 1:
            # a kernel message spliced into the middle of a base64 line
            cut = len(line) // 2
            garbled += [line[:cut] + "[   12.345678] virtio_fs: something happened", line[cut:]]
        elif i == 2:
            garbled += ["[   13.000000] random: crng init done\r", line + "\r"]
        else:
            garbled.append(line + "\r")
    garbled.append(block[-1])
    rep = vm.parse_console([*garbled, m("STATUS 0")], NONCE)
    assert rep.junit == JUNIT, rep.junit_error
    assert rep.status == 0


def test_parse_console_detects_corruption() -> None:
    block = junit_block(JUNIT)
    block[2] = block[2][:-4] + "AAAA"  # same length, wrong bytes
    rep = vm.parse_console([*block, m("STATUS 0")], NONCE)
    assert rep.junit is None
    assert "sha256" in (rep.junit_error or "")
    assert rep.status == 0


def test_parse_console_garbage_line_in_block_fails_checksum_not_crash() -> None:
    block = junit_block(JUNIT)
    block.insert(3, "Oops: general protection fault ### not base64 ###")
    del block[4]  # and a line went missing
    rep = vm.parse_console(block, NONCE)
    assert rep.junit is None and rep.junit_error
    assert rep.status is None


def test_parse_console_cut_off_block() -> None:
    rep = vm.parse_console(junit_block(JUNIT)[:-1], NONCE)
    assert rep.junit is None
    assert "cut off" in (rep.junit_error or "")


def test_parse_console_ignores_other_nonces_and_unmarked_text() -> None:
    lines = [
        "@@TFVM ffffffffffffffff STATUS 0@@",  # a stale or echoed marker from another run
        "echo '@@TFVM $NONCE STATUS 0@@'",
        "STATUS 0",
        "@@TFVM " + NONCE + " STATUS 7",  # no closing @@
    ]
    rep = vm.parse_console(lines, NONCE)
    assert rep.status is None


def test_parse_console_marker_inside_noisy_line() -> None:
    rep = vm.parse_console(["garbage\x00\x1b[0m" + m("STATUS 5") + " trailing"], NONCE)
    assert rep.status == 5


def test_parse_console_errors_warnings_nojunit() -> None:
    lines = [m("WARN could not mount: tracefs"), m("NOJUNIT"), m("ERROR python missing")]
    rep = vm.parse_console(lines, NONCE)
    assert rep.warnings == ["could not mount: tracefs"]
    assert rep.errors == ["python missing"]
    assert rep.junit is None and rep.junit_error
    assert rep.status is None


def test_parse_console_malformed_status() -> None:
    rep = vm.parse_console([m("STATUS notanumber")], NONCE)
    assert rep.status is None
    assert rep.errors


def test_marker_then_b64_on_same_line_before_end() -> None:
    block = junit_block(JUNIT)
    merged = [*block[:-2], block[-2] + block[-1]]  # last base64 fragment glued to END
    rep = vm.parse_console(merged, NONCE)
    assert rep.junit == JUNIT


def test_init_script_markers_match_parser() -> None:
    """init.sh prints `@@TFVM $NONCE KIND ...@@`; keep the two sides in step."""
    text = (RUN_PY.parent / "init.sh").read_text()
    assert 'marker() { echo "@@TFVM $NONCE $*@@"; }' in text
    for kind in ("BEGIN junit", "END junit", "NOJUNIT", "STATUS", "ERROR", "STAGE pytest-start"):
        assert f'marker "{kind}' in text or f"marker '{kind}" in text, kind


# --- junit -------------------------------------------------------------------------------


def test_parse_junit_outcomes_and_messages() -> None:
    res = {r.nodeid: r for r in vm.parse_junit(JUNIT)}
    assert res["tests.bpf.test_capture::test_openat"].outcome == "passed"
    failed = res["tests.bpf.test_capture::test_exit_retry[cold]"]
    assert (failed.outcome, failed.message) == ("failed", "AssertionError: lost 3 events")
    skipped = res["tests.e2e.test_agent::test_fentry"]
    assert (skipped.outcome, skipped.message) == ("skipped", "fentry refused: EPERM")
    assert res["tests.e2e.test_agent::test_known_bug"].message == "xfail: issue 12"
    assert res["tests.e2e.test_agent::test_setup"].outcome == "error"


def test_parse_junit_single_testsuite_root_and_skip_text_only() -> None:
    data = b"""<testsuite><testcase classname="" name="t" time="x">
    <skipped>only text reason</skipped></testcase></testsuite>"""
    (r,) = vm.parse_junit(data)
    assert (r.nodeid, r.outcome, r.message, r.seconds) == ("t", "skipped", "only text reason", 0)


def test_format_summary() -> None:
    lines = vm.format_summary(vm.parse_junit(JUNIT))
    assert lines[0] == "PASS  tests.bpf.test_capture::test_openat"
    assert "SKIP  tests.e2e.test_agent::test_fentry  -- fentry refused: EPERM" in lines
    assert lines[-1] == "1 passed, 1 failed, 1 errors, 2 skipped"


def test_parse_progress_from_verbose_lines() -> None:
    lines = [
        "collected 4 items",
        "",
        "tests/bpf/test_a.py::test_one[x-1] PASSED                  [ 25%]",
        "tests/bpf/test_a.py::test_two SKIPPED (no fentry here)    [ 50%]",
        "tests/bpf/test_a.py::test_three FAILED                    [ 75%]",
        "tests/bpf/test_a.py::test_four XFAIL (known)              [ 90%]",
        "tests/bpf/test_a.py::test_four ERROR                      [ 90%]",  # teardown error
        "FAILED tests/bpf/test_a.py::test_three - AssertionError",
    ]
    results, running = vm.parse_progress(lines, "tests/e2e/test_b.py::test_slow ")
    got = {r.nodeid: (r.outcome, r.message) for r in results}
    assert got == {
        "tests/bpf/test_a.py::test_one[x-1]": ("passed", ""),
        "tests/bpf/test_a.py::test_two": ("skipped", "no fentry here"),
        "tests/bpf/test_a.py::test_three": ("failed", ""),
        "tests/bpf/test_a.py::test_four": ("error", ""),
    }
    assert running == "tests/e2e/test_b.py::test_slow"


def test_parse_progress_running_test_with_output_and_finished() -> None:
    _, running = vm.parse_progress(["t.py::test_x some output it printed"], "")
    assert running == "t.py::test_x"
    _, running = vm.parse_progress(["t.py::test_x PASSED [100%]"], "")
    assert running is None


# --- kernel resolution -------------------------------------------------------------------

DEB = "linux-binary-7.2.13+deb14-amd64_7.2.13-1_amd64.deb"


def test_deb_upstream_version() -> None:
    assert vm.deb_upstream_version(DEB) == "7.2.13"
    assert vm.deb_upstream_version("linux-image-6.1.0-9-amd64_6.1.27-1_amd64.deb") == "6.1.27"
    assert vm.deb_upstream_version("pkg_1:7.2~rc3-1_amd64.deb") == "7.2"
    assert vm.deb_upstream_version("vmlinuz") is None


@pytest.mark.parametrize(
    ("want", "have", "ok"),
    [("7.2", "7.2.13", True), ("7.2", "7.2", True), ("7.2.13", "7.2.13", True),
     ("7.2", "7.20.1", False), ("7.2", "7.1.9", False), ("7.2.1", "7.2.13", False)],
)  # fmt: skip
def test_version_matches(want: str, have: str, ok: bool) -> None:
    assert vm.version_matches(want, have) is ok


def test_resolve_kernel_version_picks_newest_match(tmp_path: Path) -> None:
    for name in (DEB, "linux-binary-7.2.9+deb14-amd64_7.2.9-1_amd64.deb",
                 "linux-binary-7.20.1_7.20.1-1_amd64.deb", "notes.txt"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    k = vm.resolve_kernel("7.2", tmp_path)
    assert (k.kind, k.path.name, k.label) == ("deb", DEB, "7.2")
    assert vm.resolve_kernel("7.20", tmp_path).path.name.startswith("linux-binary-7.20.1")


def test_resolve_kernel_missing_version_lists_available(tmp_path: Path) -> None:
    (tmp_path / DEB).write_bytes(b"")
    with pytest.raises(vm.RunnerError) as e:
        vm.resolve_kernel("6.6", tmp_path)
    assert e.value.status == vm.EXIT_UNAVAILABLE
    assert "7.2.13" in str(e.value)
    with pytest.raises(vm.RunnerError):
        vm.resolve_kernel("7.2", tmp_path / "nope")


def _bzimage(release: str) -> bytes:
    img = bytearray(0x4000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x1000)
    ver = f"{release} (debian-kernel@lists.debian.org) #1 SMP".encode()
    img[0x1200 : 0x1200 + len(ver)] = ver
    return bytes(img)


def test_resolve_kernel_paths(tmp_path: Path) -> None:
    deb = tmp_path / DEB
    deb.write_bytes(b"")
    k = vm.resolve_kernel(str(deb), tmp_path / "elsewhere")
    assert (k.kind, k.label) == ("deb", "7.2.13")
    img = tmp_path / "vmlinuz"
    img.write_bytes(_bzimage("7.2.13+deb14-amd64"))
    k = vm.resolve_kernel(str(img), tmp_path)
    assert (k.kind, k.path, k.label) == ("vmlinuz", img, "7.2.13+deb14-amd64")
    assert vm.bzimage_release(img) == "7.2.13+deb14-amd64"
    junk = tmp_path / "bzImage custom"
    junk.write_bytes(b"not a kernel")
    assert vm.bzimage_release(junk) is None
    assert vm.resolve_kernel(str(junk), tmp_path).label == "bzImage_custom"
    with pytest.raises(vm.RunnerError):
        vm.resolve_kernel(str(tmp_path / "missing-vmlinuz"), tmp_path)


def test_find_vmlinuz(tmp_path: Path) -> None:
    mod = tmp_path / "usr/lib/modules/7.2.13+deb14-amd64"
    mod.mkdir(parents=True)
    (mod / "vmlinuz").write_bytes(b"x")
    assert vm.find_vmlinuz(tmp_path) == (mod / "vmlinuz", "7.2.13+deb14-amd64")
    with pytest.raises(vm.RunnerError):
        vm.find_vmlinuz(tmp_path / "empty")


def test_real_shared_kernel_resolves_if_present() -> None:
    kdir = vm.default_kernels_dir()
    if not any(kdir.glob("*7.2*.deb")):
        pytest.skip(f"no 7.2 kernel package in {kdir}")
    assert vm.resolve_kernel("7.2", kdir).kind == "deb"


def test_resolve_kernel_version_finds_bzimage_build_dir(tmp_path: Path) -> None:
    # The 6.12 user_events kernel ships as linux-6.12.117-user-events/bzImage, not a .deb.
    (tmp_path / DEB).write_bytes(b"")
    for name in ("linux-6.12.117-user-events", "linux-6.12.9", "linux-6.120.1", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bzImage").write_bytes(_bzimage(name.removeprefix("linux-")))
    (tmp_path / "linux-6.13-empty").mkdir()  # no bzImage inside: ignored
    k = vm.resolve_kernel("6.12", tmp_path)
    assert (k.kind, k.path.parent.name, k.label) == (
        "vmlinuz",
        "linux-6.12.117-user-events",
        "6.12",
    )
    assert vm.resolve_kernel("7.2", tmp_path).kind == "deb"
    with pytest.raises(vm.RunnerError) as e:
        vm.resolve_kernel("6.13", tmp_path)
    assert "linux-6.12.117-user-events/bzImage" in str(e.value)


def test_real_shared_612_kernel_resolves_if_present() -> None:
    kdir = vm.default_kernels_dir()
    if not any(kdir.glob("linux-6.12*/bzImage")):
        pytest.skip(f"no 6.12 bzImage build in {kdir}")
    assert vm.resolve_kernel("6.12", kdir).kind == "vmlinuz"


# --- arguments, mounts, guest config -----------------------------------------------------


def test_split_passthrough() -> None:
    assert vm.split_passthrough(["--kernel", "7.2", "--", "-k", "x", "--"]) == (
        ["--kernel", "7.2"],
        ["-k", "x", "--"],
    )
    assert vm.split_passthrough(["--kernel", "7.2"]) == (["--kernel", "7.2"], [])


def test_pytest_argv_defaults_and_explicit_paths(tmp_path: Path) -> None:
    (tmp_path / "tests/bpf").mkdir(parents=True)
    (tmp_path / "tests/bpf/test_a.py").write_text("")
    base = vm.pytest_argv(["-k", "openat"], None, tmp_path)
    assert base[-2:] == ["tests/bpf", "tests/e2e"] and "-rs" in base and "-k" in base
    named = vm.pytest_argv(["tests/bpf/test_a.py::test_x"], None, tmp_path)
    assert "tests/e2e" not in named
    chosen = vm.pytest_argv([], ["/abs/test_smoke.py"], tmp_path)
    assert chosen[-1] == "/abs/test_smoke.py" and "tests/bpf" not in chosen


def test_mentions_hypothesis(tmp_path: Path) -> None:
    (tmp_path / "tests/bpf").mkdir(parents=True)
    (tmp_path / "tests/bpf/test_a.py").write_text("import os\n")
    paths = vm.path_args(vm.pytest_argv([], None, tmp_path), tmp_path)
    assert not vm.mentions_hypothesis(paths, tmp_path)
    (tmp_path / "tests/conftest.py").write_text("from hypothesis import settings\n")
    assert vm.mentions_hypothesis(paths, tmp_path)


def test_a_long_k_expression_is_not_taken_for_a_path(tmp_path: Path) -> None:
    # make test's 7.2 stage passes a -k expression longer than NAME_MAX (255): stat() on it
    # raised ENAMETOOLONG and the stage failed before its guest booted.
    (tmp_path / "tests/bpf").mkdir(parents=True)
    (tmp_path / "tests/bpf/test_a.py").write_text("")
    expr = " and ".join(f"not t{i}" for i in range(60))
    argv = vm.pytest_argv(["-k", expr], ["tests/bpf/test_a.py"], tmp_path)
    assert vm.path_args(argv, tmp_path) == [tmp_path / "tests/bpf/test_a.py"]
    # a -k value that happens to name a file is still an expression, not a test path
    assert vm.path_args(["-k", "tests/bpf/test_a.py"], tmp_path) == []
    assert not vm.has_test_path(["-k", expr], tmp_path)


MOUNTINFO = textwrap.dedent(
    """\
    22 27 0:21 / /proc rw,relatime - proc proc rw
    23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
    24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
    28 27 0:25 / /mnt/stuff ro,nosuid - tmpfs none ro
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
    50 27 254:1 / /work rw,relatime - ext4 /dev/vdb rw
    51 27 254:2 / /home/my\\040dir rw shared:1 - xfs /dev/vdc rw
    52 27 0:40 / /tmp rw - tmpfs tmpfs rw
    53 27 0:41 / /run rw - tmpfs tmpfs rw
    54 27 0:42 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
    55 50 254:1 / /work rw,relatime - ext4 /dev/vdb rw
    """
)


def test_view_submounts() -> None:
    assert vm.view_submounts(MOUNTINFO) == ["/work", "/home/my dir", "/tmp"]


def test_needs_host_tmp() -> None:
    assert vm.needs_host_tmp(["/work/main", "/tmp/vmtest"])
    assert not vm.needs_host_tmp(["/work/main", "/tmpfoo/x", "/root/.pyenv/bin/python3"])


def test_guest_config_quotes_everything(tmp_path: Path) -> None:
    cfg = vm.guest_config(
        repo_root=Path("/work/main"),
        python="/work/main/.venv/bin/python",
        pytest_args=["-k", "a and not b's", "tests/bpf"],
        tmp_tmpfs=True,
        env={"TRACEFLEET_X": "v w", "Y": "$(reboot)"},
    )
    assert "TFVM_TMP_TMPFS=1" in cfg
    assert "export Y='$(reboot)'" in cfg
    line = next(ln for ln in cfg.splitlines() if "-m pytest" in ln)
    assert shlex.split(line.split('--junitxml="$1"', 1)[1]) == ["-k", "a and not b's", "tests/bpf"]


def test_passthrough_env() -> None:
    env = vm.passthrough_env(
        {"TRACEFLEET_DEBUG": "1", "TRACEFLEET_IN_VM": "0", "PATH": "/x"}, ["A=b=c"]
    )
    assert env == {"TRACEFLEET_DEBUG": "1", "A": "b=c"}
    with pytest.raises(vm.RunnerError):
        vm.passthrough_env({}, ["no-equals"])


@pytest.mark.parametrize(("text", "out"), [("1G", "1G"), ("1536M", "1536M"), ("2048", "2048M"),
                                           ("2g", "2G"), ("1GiB", "1G")])  # fmt: skip
def test_parse_memory(text: str, out: str) -> None:
    assert vm.parse_memory(text) == out


@pytest.mark.parametrize("text", ["", "0", "1T", "lots", "-1G"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(vm.argparse.ArgumentTypeError):
        vm.parse_memory(text)


def test_kernel_cmdline_and_qemu_argv() -> None:
    cmd = vm.kernel_cmdline(Path("/r/tests/vm/init.sh"), NONCE, Path("/r/build/vm/x/g.sh"), "")
    assert "rootfstype=virtiofs root=rootfs ro init=/bin/sh panic=-1" in cmd
    assert cmd.endswith(f"-- /r/tests/vm/init.sh {NONCE} /r/build/vm/x/g.sh")
    with pytest.raises(vm.RunnerError):
        vm.kernel_cmdline(Path("/a b/init.sh"), NONCE, Path("/c"), "")
    argv = vm.qemu_argv(
        kernel=Path("/k"), socket=Path("/s"), cmdline=cmd, memory="1G", cpus=2, accel="tcg"
    )
    joined = " ".join(argv)
    assert "-machine q35,accel=tcg -cpu max -smp 2 -m 1G" in joined
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in joined
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_view_script_is_read_only_and_private() -> None:
    script = vm.view_script(Path("/tmp/v"), ["/work"], "/usr/lib/qemu/virtiofsd", Path("/s"))
    assert "mount --bind -o ro / /tmp/v" in script
    assert "mount --bind -o ro /work /tmp/v/work" in script
    assert "-o sandbox=chroot" in script and "-o source=/tmp/v" in script
    assert "rw" not in script.replace("--rlimit", "")


def test_under_any() -> None:
    assert vm.under_any("/run/x", ("/run",))
    assert vm.under_any("/run", ("/run/",))
    assert not vm.under_any("/runner/x", ("/run",))
    assert not vm.under_any("/work/main", ("/proc", "/sys"))


def test_only_an_int3_oops_of_kernel_text_patching_earns_a_rerun() -> None:
    from tests.vm import run

    assert run.emulation_int3(["Oops: int3: 0000 [#1] SMP NOPTI", "Kernel panic - not syncing"])
    assert not run.emulation_int3(["BUG: kernel NULL pointer dereference, address: 0"])
    assert not run.emulation_int3(["general protection fault", "Oops: int3: 0000 [#2]"])
    assert not run.emulation_int3([])


def _outcome(status: int, results: list[object]) -> object:
    return vm.Outcome(
        status, vm.GuestReport(), results, 1.0, 2.0, 3.0, "7.2", Path("c"), Path("j"), True
    )


def test_after_an_oops_only_what_did_not_finish_runs_again(tmp_path: Path) -> None:
    # The 7.2 stage's guest oopsed (int3, the emulator) 700 s into the suite: the rerun
    # repeated every test and a late oops left too little time. The rerun skips what the
    # first guest finished; checked with a real pytest on a project laid out like ours.
    tests = tmp_path / "tests"
    (tests / "bpf").mkdir(parents=True)
    (tests / "pytest.ini").write_text("[pytest]\n")
    (tests / "bpf" / "test_a.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('x', ['p-1', 'q'])\n"
        "def test_one(x):\n    pass\n\ndef test_two():\n    pass\n"
    )
    R = vm.TestResult
    done = [R("tests/bpf/test_a.py::test_one[p-1]", "passed"), R("weird line", "passed")]
    args = vm.done_deselects(done, tmp_path)
    assert args == ["--deselect", "bpf/test_a.py::test_one[p-1]"]
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "tests/bpf", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert "1 deselected" in out and "test_one[q] PASSED" in out and "test_two PASSED" in out
    assert "test_one[p-1] PASSED" not in out


def test_merged_outcome_keeps_the_first_guests_failures() -> None:
    R = vm.TestResult
    failed_before = _outcome(70, [R("tests/bpf/t.py::a", "failed")])
    passed_after = _outcome(0, [R("tests/bpf/t.py::b", "passed")])
    merged = vm.merge_outcomes(failed_before, passed_after)
    assert merged.status == 1 and [r.nodeid for r in merged.results] == [
        "tests/bpf/t.py::a",
        "tests/bpf/t.py::b",
    ]
    ok_before = _outcome(70, [R("tests/bpf/t.py::a", "passed")])
    assert vm.merge_outcomes(ok_before, passed_after).status == 0
    # nothing left to run (pytest's 5): the first guest's passes stand
    assert vm.merge_outcomes(ok_before, _outcome(5, [])).status == 0
    # the second guest crashing too is that run's failure
    assert vm.merge_outcomes(ok_before, _outcome(70, [])).status == 70


def test_two_emulator_oopses_in_one_stage_still_finish_the_suite() -> None:
    # ci11's 7.2 stage: int3 oops at 44 s, and the rerun's guest could oops as well (CI saw
    # them at 2 s, 44 s and 500 s). Each rerun runs only what did not finish, within the limit.
    R = vm.TestResult
    oops = vm.GuestReport()
    oops.kernel_problems = ["Oops: int3: 0000 [#1] SMP NOPTI", "Kernel panic"]

    def crashed(done: list[str]) -> Any:
        o = _outcome(vm.EXIT_GUEST_FAILED, [R(n, "passed") for n in done])
        o.report = oops
        return o

    runs: list[tuple[float, list[str]]] = []
    script = [crashed(["tests/bpf/t.py::b"]), _outcome(0, [R("tests/bpf/t.py::c", "passed")])]

    def fake_run(args: argparse.Namespace, extra: list[str]) -> Any:
        runs.append((args.timeout, extra))
        return script[len(runs) - 1]

    args = vm.build_parser().parse_args(["--kernel", "7.2", "--timeout", "100"])
    out = vm.rerun_after_emulator_oops(args, [], crashed(["tests/bpf/t.py::a"]), fake_run)
    assert out.status == 0
    assert [r.nodeid for r in out.results] == [f"tests/bpf/t.py::{n}" for n in "abc"]
    # the second rerun skips both tests already finished, in what the limit leaves
    assert [e.count("--deselect") for _, e in runs] == [1, 2]
    assert [t for t, _ in runs] == [97.0, 94.0]
    # a crash of another kind is ours: never run again
    runs.clear()
    other = _outcome(vm.EXIT_GUEST_FAILED, [])
    assert vm.rerun_after_emulator_oops(args, [], other, fake_run) is other and not runs
