"""The kernel edge of ``tracefleet.model.filters.Filters``: its ``struct tf_filter``
(events.h), the one slot of ``tf_control`` an event set's programs test first.

What is not in the slot: the cgroup ids (``cgroup_ids`` and the workload selector's
containers) go to the ``tf_cgroups`` hash map, the followed processes to ``tf_follow``; the
engine keeps both current (bpfengine.py ``_sync_cgroups``, ``_sync_follow``).
"""

from __future__ import annotations

from tracefleet.agent.kernel.abi import (
    TF_COMM_LEN,
    TF_FILTER_COMMS,
    TF_FILTER_PIDS,
    TF_PREFIX_MAX,
    TfFilter,
)
from tracefleet.model.filters import (
    MAX_COMM_BYTES,
    MAX_COMMS,
    MAX_PATH_PREFIXES,
    MAX_PIDS,
    MAX_PREFIX_BYTES,
    Filters,
)

# the model's limits are the kernel's capacity: a mismatch would truncate, or refuse what fits
if (MAX_PIDS, MAX_COMMS, MAX_COMM_BYTES + 1, MAX_PREFIX_BYTES, MAX_PATH_PREFIXES) != (
    TF_FILTER_PIDS, TF_FILTER_COMMS, TF_COMM_LEN, TF_PREFIX_MAX, 1
):  # fmt: skip
    raise ImportError("tracefleet.model.filters limits differ from events.h (abi.py)")


def to_kernel(f: Filters) -> TfFilter:
    """``f`` as the kernel's filter slot; FilterError (naming the field and the fix) if it
    does not fit."""
    f.check()
    k = TfFilter()
    k.npids = len(f.pids)
    for i, p in enumerate(f.pids):
        k.pids[i] = p
    k.ncomms = len(f.comms)
    for i, c in enumerate(f.comms):
        k.comms[i].value = c.encode()
    # a selector matching no pod yet still filters: nothing passes until one appears
    k.cgroup_filter = int(bool(f.cgroup_ids or f.workload))
    k.follow = int(f.follow)
    if f.path_prefixes:
        raw = f.path_prefixes[0].encode()
        k.prefix = raw
        k.prefix_len = len(raw)
    return k
