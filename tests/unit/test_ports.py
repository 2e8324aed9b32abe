"""Ports for the servers tests start: two servers must never be handed the same port (one
would die on "address already in use" and fail an unrelated test)."""

import socket

from tests import ports


def test_free_port_never_returns_a_port_twice_and_each_can_be_bound():
    lo, _ = ports._ephemeral_range()
    got = [ports.free_port() for _ in range(2000)]
    assert len(set(got)) == len(got), "a port was handed out twice"
    if lo - 1024 >= 10_000:  # outside the range clients' source ports come from
        assert all(p < lo for p in got), [p for p in got if p >= lo][:5]
    for p in got[-50:]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_port_skips_a_port_something_listens_on(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports.free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        spare = ports.free_port()
        ports._handed_out -= {taken, spare}  # as if another process had bound ``taken``
        picks = iter([taken, taken, spare])
        monkeypatch.setattr(ports.random, "choice", lambda _range: next(picks))
        assert ports.free_port() == spare
