"""Address parsing lives in ``tracefleet.model.netaddr`` (shared with the agent)."""

from tracefleet.model.netaddr import (
    UNIX_PREFIX,
    check_address,
    is_loopback,
    read_socket_path,
    split_host_port,
    unix_path,
)

__all__ = [
    "UNIX_PREFIX",
    "check_address",
    "is_loopback",
    "read_socket_path",
    "split_host_port",
    "unix_path",
]
