"""host:port and unix:PATH parsing, and the loopback check for the insecure-listen warning."""

from __future__ import annotations

import ipaddress

UNIX_PREFIX = "unix:"


def unix_path(address: str) -> str | None:
    """The socket path of ``unix:PATH`` (absolute), None for host:port; ValueError on a
    relative or empty path."""
    if not address.startswith(UNIX_PREFIX):
        return None
    path = address[len(UNIX_PREFIX) :].removeprefix("//")
    if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
        raise ValueError(
            f"bad address {address!r}: use unix:/ABSOLUTE/PATH (at most 107 bytes), e.g. "
            "unix:/run/tracefleet/controller.sock"
        )
    return path


def read_socket_path(path: str) -> str:
    """The read-only operator socket that goes with the admin socket ``path``."""
    stem = path.removesuffix(".sock")
    return f"{stem}-read.sock"


def check_address(address: str) -> None:
    """ValueError naming the fix unless ``address`` is host:port or unix:/PATH."""
    if unix_path(address) is None:
        try:
            split_host_port(address)
        except ValueError as e:
            raise ValueError(f"{e}, or unix:/PATH") from None


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError with a fix on bad input."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {address!r}: use host:port, e.g. 127.0.0.1:7070")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
