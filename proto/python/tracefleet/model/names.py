"""Names of argument outcomes and capture strategies, as the agent reports them and the
controller, the CLI and the metrics read them (one list, so the two ends cannot disagree).
"""

from __future__ import annotations

from typing import Final

# Status of one captured argument (``Arg.status``), also the ``outcome`` of the per-set
# (strategy, outcome) counts. Meanings: README, "What a status guarantees".
OUTCOMES: Final[tuple[str, ...]] = (
    "ok",
    "recovered",  # read again after the call (or from the kernel's own copies)
    "mismatch",  # re-read after an open, and not the name of the opened file
    "reread",  # a struct re-read after the call: nothing can check it
    "lost",
    "truncated",
    "torn",  # a kernel name changed while it was read
)
# outcomes that mean the first read faulted (the controller's faults per second)
FAULT_OUTCOMES: Final[frozenset[str]] = frozenset({"recovered", "mismatch", "reread", "lost"})

# Capture strategies, in the agent's numbering order (abi.Strategy: the value - 1 indexes
# this tuple); the first five are the syscall sets' ladder rungs, the last two the vfs hooks.
STRATEGIES: Final[tuple[str, ...]] = (
    "sleepable",
    "fentry-sleepable",
    "exit-retry",
    "user-fallback",
    "nofault",
    "fentry",
    "tracepoint",
)
# where an argument came from when no capture strategy read it
STRATEGY_REGISTER: Final = "register"  # a syscall register (integer arguments)
STRATEGY_KERNEL: Final = "kernel"  # the kernel's own objects (vfs inode, device, ...)
STRATEGY_USER_SPACE: Final = "user-space"  # looked up by the agent (vfs device of a path)
STRATEGY_SYNTHETIC: Final = "synthetic"  # the load generator's made-up events
# every strategy an argument or a set can name, in the order of tracefleet.v1.Strategy
ALL_STRATEGIES: Final[tuple[str, ...]] = (
    *STRATEGIES,
    STRATEGY_REGISTER,
    STRATEGY_KERNEL,
    STRATEGY_USER_SPACE,
    STRATEGY_SYNTHETIC,
)
STRATEGY_NONE: Final = "none"  # a set's strategy while it is not loaded
