"""The suite passes wherever the checkout lives, /tmp included (issue 21).

When the checkout (or the venv, or a test path) lives under /tmp, the 7.2 guest keeps the
host's /tmp visible read-only and gives the tests a TMPDIR under /run: anything written to a
hard-coded /tmp path then fails there, and only there. Running the VM suite from a clone
under /tmp costs minutes; these checks catch the same mistake in a second, without root:
no test, workload or host script names /tmp in a string literal, and the runner's two
halves (host: "needs the host's /tmp"; guest: "then TMPDIR is under /run") agree.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INIT_SH = ROOT / "tests" / "vm" / "init.sh"

# A string literal that starts with /tmp: "/tmp", '/tmp/x', f"/tmp/{n}", C's "/tmp/...".
TMP_LITERAL = re.compile(r"""["']/tmp(?:/|["'])""")
SCANNED = ("tests/**/*.py", "tests/**/*.c", "tests/**/*.h", "tests/**/*.sh", "deploy/host/*")
# The VM runner handles the host's /tmp on purpose, and its unit test feeds it such paths;
# the load generator only puts made-up paths into its synthetic events (it opens none).
ALLOWED = {
    "tests/vm/run.py",
    "tests/vm/init.sh",
    "tests/unit/test_vm_runner.py",
    "tests/loadgen.py",
}


def _runner():
    spec = importlib.util.spec_from_file_location("tfvm_run_tmp", ROOT / "tests/vm/run.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def hard_coded_tmp(root: Path) -> list[str]:
    """`path:line: text` of every string literal naming /tmp outside the allowed files."""
    hits = []
    for pattern in SCANNED:
        for f in sorted(root.glob(pattern)):
            rel = f.relative_to(root).as_posix()
            if not f.is_file() or rel in ALLOWED or rel == "tests/unit/test_tmp_paths.py":
                continue
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if TMP_LITERAL.search(line):
                    hits.append(f"{rel}:{n}: {line.strip()}")
    return hits


def test_no_test_workload_or_host_script_hard_codes_tmp():
    hits = hard_coded_tmp(ROOT)
    assert not hits, (
        "these write or look under a hard-coded /tmp, which is read-only in the 7.2 guest when "
        "the checkout lives under /tmp: use the test's tmp_path / tempfile / $TMPDIR (C: "
        "wl_scratch_file), or WL_NOWHERE for a path that must not exist:\n" + "\n".join(hits)
    )


def test_scan_finds_a_planted_literal(tmp_path: Path):
    """Negative control: the scan is not vacuous."""
    (tmp_path / "tests" / "workloads").mkdir(parents=True)
    (tmp_path / "tests" / "workloads" / "x.c").write_text('snprintf(p, n, "/tmp/tf-%d", 1);\n')
    (tmp_path / "tests" / "t.py").write_text('marker = f"/tmp/tf-{pid}"\n# a /tmp comment\n')
    assert hard_coded_tmp(tmp_path) == [
        'tests/t.py:1: marker = f"/tmp/tf-{pid}"',
        'tests/workloads/x.c:1: snprintf(p, n, "/tmp/tf-%d", 1);',
    ]


def _guest_tmpdir(config: str, tmp_path: Path) -> str:
    """Run init.sh's scratch section with the generated config, mount/mkdir/chmod stubbed
    out, and return the TMPDIR it exports to the tests."""
    text = INIT_SH.read_text()
    start = text.index("# --- writable scratch")
    end = text.index("mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp")
    exports = [ln for ln in text.splitlines() if ln.startswith("export ") and "TMPDIR" in ln]
    assert exports, "init.sh no longer exports TMPDIR to the tests"
    cfg = tmp_path / "guest.sh"
    cfg.write_text(config)
    script = "\n".join(
        [
            'mount() { :; }; mkdir() { :; }; chmod() { :; }; die() { echo "die: $*"; exit 9; }',
            f". {cfg}",
            text[start:end],
            exports[0],
            "sh -c 'printf %s \"$TMPDIR\"'",
        ]
    )
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r
    return r.stdout


def test_checkout_under_tmp_gives_the_guest_tests_a_tmpdir_under_run(tmp_path: Path):
    vm = _runner()
    clone = Path("/tmp/tfclone")
    paths = [str(clone), str(clone / ".venv/bin/python3"), str(clone / "build")]
    assert vm.needs_host_tmp(paths)
    config = vm.guest_config(
        repo_root=clone,
        python=paths[1],
        pytest_args=["tests/bpf"],
        tmp_tmpfs=not vm.needs_host_tmp(paths),
        env={},
    )
    tmpdir = _guest_tmpdir(config, tmp_path)
    assert tmpdir.startswith("/run/"), tmpdir


def test_checkout_elsewhere_gives_the_guest_a_fresh_tmp(tmp_path: Path):
    vm = _runner()
    paths = ["/work/main", "/work/main/.venv/bin/python3", "/work/main/build"]
    assert not vm.needs_host_tmp(paths)
    config = vm.guest_config(
        repo_root=Path(paths[0]), python=paths[1], pytest_args=[], tmp_tmpfs=True, env={}
    )
    assert _guest_tmpdir(config, tmp_path) == "/tmp"
