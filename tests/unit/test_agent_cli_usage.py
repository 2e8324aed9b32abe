"""Agent CLI input errors that need no kernel access."""

from __future__ import annotations

import subprocess
import sys

AGENT = [sys.executable, "-m", "tracefleet.agent"]


def test_unknown_event_set_is_a_usage_error_listing_known_sets():
    out = subprocess.run([*AGENT, "capture", "-e", "file,bogus"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "unknown event set 'bogus'" in out.stderr and "file, exec, net" in out.stderr


def test_help_teaches_with_examples_and_strategies():
    out = subprocess.run([*AGENT, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for needle in ("tracefleet-agent capture --event-set file", "exit-retry", "exit codes"):
        assert needle in out.stdout


def test_bad_label_is_rejected():
    out = subprocess.run([*AGENT, "run", "--controller", "127.0.0.1:1", "--labels", "role"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "key=value" in out.stderr
