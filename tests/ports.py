"""Loopback ports for the servers the tests and benchmarks start (controllers, etcd members,
metrics endpoints)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports handed out by this process: a port is picked, its probe socket closed, and the server
# binds it later, so nothing but this set stops the next pick from returning it again (with
# bind(("127.0.0.1", 0)) one draw of six ports in ~870 held a duplicate here, and an etcd
# member died on "address already in use").
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback TCP port nobody listens on, never returned before by this process.

    Picked below the kernel's ephemeral range when it leaves room (10,000 ports or more):
    an outgoing connection's source port comes from that range, so no client (an etcd
    member dialling its peers, an agent) can take the port before its server binds it."""
    lo, _hi = _ephemeral_range()
    if lo - 1024 >= 10_000:
        candidates = range(lo - 10_000, lo)
        for _ in range(1000):
            port = random.choice(candidates)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    for _ in range(1000):  # a range that leaves no room below it: the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found in 2,000 tries")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
