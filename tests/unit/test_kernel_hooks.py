"""The vfs fentry rung checks each kernel function's parameters in the running kernel's BTF
before loading: a missing function or a moved parameter skips that operation with its
reason, instead of a program reading the wrong argument. Reads /sys/kernel/btf/vmlinux
(world-readable; no root, no BPF)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tracefleet.agent.capture.eventsets import FILE, VFS, KernelHook
from tracefleet.agent.capture.ladder import unhookable
from tracefleet.agent.kernel.abi import Strategy

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists(),
                                reason="kernel has no BTF")  # fmt: skip


def test_every_vfs_hook_matches_this_kernel() -> None:
    assert unhookable(VFS, Strategy.FENTRY) == {}


def test_moved_parameter_and_missing_function_are_skipped_with_the_reason() -> None:
    moved = KernelHook("unlink", "vfs_unlink", ("p",), ((1, "dentry"),))
    absent = KernelHook("nothing", "tf_no_such_function", ("q",), ())
    spec = replace(VFS, kernel_hooks=(moved, absent))
    got = unhookable(spec, Strategy.FENTRY)
    assert set(got) == {moved, absent}
    assert "vfs_unlink() has another signature" in got[moved]
    assert "parameter 1 is" in got[moved] and "expected 'dentry'" in got[moved]
    assert got[absent] == "tf_no_such_function() is not in this kernel"


def test_only_the_fentry_rung_of_a_set_with_kernel_hooks_is_checked() -> None:
    assert unhookable(VFS, Strategy.TRACEPOINT) == {}
    assert unhookable(FILE, Strategy.FENTRY) == {}
