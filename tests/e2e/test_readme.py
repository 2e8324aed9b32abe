"""The README's commands run as written (issue 21), so the docs cannot drift from the code.

Every ```sh block of README.md is run as one bash script (`set -euo pipefail`, from the
checkout, as root, real BPF), the way a newcomer pastes it into a root shell. The only
changes are mechanical and listed here:
- a command the README marks `# until Ctrl-C` gets `--duration 3` appended;
- commands in NOT_RUN are left out, each with its reason (the test checks every entry is
  still used, so a skip cannot outlive its command);
- the block runs in its own network and mount namespaces with tmpfs on /run/tracefleet (the
  controller's default socket) and /var/lib/tracefleet (state, databases, exports, the agent's
  state file): tests write nowhere else on the host.
Each block runs in a private network namespace (loopback only), so the fixed ports the
README uses (7070, the agent's metrics port) cannot collide with anything on the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, REPO, WORKLOADS, require_root

README = REPO / "README.md"
UNTIL_CTRL_C = "# until Ctrl-C"
BOUNDED = "--duration 3"
NOT_RUN = {
    "make test": "the test suite itself (it runs this test)",
    "kubectl ": "needs a Kubernetes cluster",
    ".venv/bin/tracefleet-agent capture -e user:": "needs a kernel with CONFIG_USER_EVENTS and a "
    "registered event (tests/bpf/test_user_events.py runs it in the 6.12 guest)",
    ".venv/bin/tracefleet-agent run --node web-1 --labels role=prod": "needs an OTLP collector "
    "(tests/bpf/test_export_otlp.py runs the exporters against a receiver)",
    "--exporter ": "continuation of the agent command above",
    ".venv/bin/tracefleet enable exec --selector role=prod --export": "needs that agent and the "
    "Fleet section's controller (tests/e2e/test_export_rules.py)",
}
SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1


def sh_blocks(text: str) -> list[tuple[str, str]]:
    """(heading above it, body) of every ```sh block."""
    out, heading = [], "top"
    for m in re.finditer(r"^(#+ [^\n]*)$|^```sh\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            out.append((heading, m.group(2)))
    return out


def runnable(body: str, state_dir: Path) -> tuple[str, list[str]]:
    """The block as the test runs it, and the commands it leaves out."""
    lines, skipped = [], []
    for line in body.splitlines():
        cmd = line.strip()
        if any(cmd.startswith(p) for p in NOT_RUN):
            skipped.append(cmd)
            continue
        if UNTIL_CTRL_C in line:
            line = f"{line.split(UNTIL_CTRL_C, 1)[0].rstrip()} {BOUNDED}"
        lines.append(line)  # /var/lib/tracefleet is the block's own tmpfs (see below)
    return "\n".join(lines) + "\n", skipped


BLOCKS = sh_blocks(README.read_text())
# blocks with something left to run (a block of NOT_RUN commands only is not a test case)
RUN = [
    i for i, (_, body) in enumerate(BLOCKS)
    if any(ln.strip() and not ln.strip().startswith("#")
           for ln in runnable(body, Path("/"))[0].splitlines())
]  # fmt: skip


def test_every_readme_command_is_run_or_its_skip_explained(tmp_path: Path):
    """No root needed: the parse itself. Every block is found, and every NOT_RUN entry
    still matches a README command (a stale skip would hide nothing and fail here)."""
    assert len(BLOCKS) >= 4, BLOCKS
    skipped = [c for _, body in BLOCKS for c in runnable(body, tmp_path)[1]]
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in skipped), f"stale NOT_RUN entry {prefix!r}"
    assert all(UNTIL_CTRL_C not in runnable(b, tmp_path)[0] for _, b in BLOCKS)


def _ids() -> list[str]:
    return [f"{i}-{re.sub(r'[^a-z0-9]+', '-', BLOCKS[i][0].lower()).strip('-')}" for i in RUN]


@pytest.mark.e2e
@pytest.mark.bpf
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=_ids())
def test_readme_block_runs_as_written(block: int, tmp_path: Path):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists() or not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("run `make bpf workloads` first")
    heading, body = BLOCKS[block]
    script, _ = runnable(body, tmp_path)
    (tmp_path / "block.sh").write_text(script)
    # a newcomer's shell: no TRACEFLEET_* settings, and not inside an outer make (jobserver)
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("TRACEFLEET_") and k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    }  # fmt: skip
    env |= {"TMPDIR": str(tmp_path), "TRACEFLEET_IN_VM": os.environ.get("TRACEFLEET_IN_VM", "")}
    proc = subprocess.Popen(
        # private network and mounts: the default socket (/run/tracefleet) and the agent's
        # default state file (/var/lib/tracefleet) are the block's own, on tmpfs
        ["unshare", "--net", "--mount", "--", "bash", "-c",
         "ip link set lo up && mkdir -p /run/tracefleet /var/lib/tracefleet"
         " && mount -t tmpfs tmpfs /run/tracefleet && mount -t tmpfs tmpfs /var/lib/tracefleet"
         ' && exec bash -euo pipefail "$0"', str(tmp_path / "block.sh")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300 * SCALE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"README block under '{heading}' still running after {300 * SCALE}s:\n"
                    f"{script}\n--- output ---\n{out[-6000:]}")  # fmt: skip
    finally:
        # daemons a failed block left in the background (same process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    assert proc.returncode == 0, (
        f"README block under '{heading}' failed (exit {proc.returncode}):\n{script}\n"
        f"--- output ---\n{out[-6000:]}"
    )
    if "tracefleet-agent run" in script:
        assert "db-1" in out, out[-6000:]  # the status table names the README's node
