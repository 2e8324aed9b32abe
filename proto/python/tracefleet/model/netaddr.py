"""Addresses of the agent and the controller: ``host:port`` (``[v6]:port``) and
``unix:/PATH``; errors name the fix. The loopback check for the insecure-use warnings."""

from __future__ import annotations

import ipaddress

UNIX_PREFIX = "unix:"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with its NUL


def unix_path(address: str) -> str | None:
    """The socket path of ``unix:PATH`` (absolute), None for host:port; ValueError on a
    relative or empty path."""
    if not address.startswith(UNIX_PREFIX):
        return None
    path = address[len(UNIX_PREFIX) :].removeprefix("//")
    if not path.startswith("/") or "\0" in path or len(path.encode()) > UNIX_PATH_MAX:
        raise ValueError(
            f"bad address {address!r}: use unix:/ABSOLUTE/PATH (at most {UNIX_PATH_MAX} "
            "bytes), e.g. unix:/run/tracefleet/controller.sock"
        )
    return path


def read_socket_path(path: str) -> str:
    """The read-only operator socket that goes with the admin socket ``path``."""
    stem = path.removesuffix(".sock")
    return f"{stem}-read.sock"


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); ValueError with a fix."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {address!r}: use host:port, e.g. 127.0.0.1:7070")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_address(address: str) -> None:
    """ValueError naming the fix unless ``address`` is host:port or unix:/PATH."""
    if unix_path(address) is None:
        try:
            split_host_port(address)
        except ValueError as e:
            raise ValueError(f"{e}, or unix:/PATH") from None


def check_peer_address(text: str, *, listen: bool = False) -> str:
    """An address to connect to (host:port with a host and a port 1..65535, or unix:/PATH)
    or, with ``listen``, a TCP address to listen on (port 0 allowed); the address stripped,
    or ValueError naming the fix."""
    address = text.strip()
    if not listen and unix_path(address) is not None:
        return address
    host, port = split_host_port(address)
    if not host or (port == 0 and not listen):
        raise ValueError(f"bad address {text!r}: use host:port, e.g. 127.0.0.1:7070")
    return address


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
