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
# what an engine reports that is not a kernel strategy
STRATEGY_NONE: Final = "none"  # the set is not loaded
STRATEGY_SYNTHETIC: Final = "synthetic"  # the load generator's made-up events
