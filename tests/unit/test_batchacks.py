"""When a node's BatchAck goes out (controller/domain/batchacks.py): merged per ack_every for
an agent batching often, per three of its own gaps for one batching rarely (an idle or paced
agent), never later than linger_max, and at once when half its agent's ack window waits."""

from tracefleet.controller.domain.batchacks import BatchAcks


def _run(acks: BatchAcks, name: str, times: list[float]) -> list[tuple[float, int]]:
    """Batches of ``name`` (seq 1, 2, ...) arriving and committed at ``times``, with the
    controller's periodic check every 0.5 s; (time, seq) of each BatchAck sent."""
    sent: list[tuple[float, int]] = []

    def send(due: str, now: float) -> None:
        got = acks.take(due, now)
        assert got is not None
        sent.append((now, got[1]))

    tick = 0.0
    for seq, now in enumerate(times, start=1):
        while tick < now:
            for due in acks.due(tick):
                send(due, tick)
            tick += 0.5
        acks.batch(name, now)
        if acks.committed(name, ("i", seq), now):
            send(name, now)
    return sent


def _seqs(sent: list[tuple[float, int]]) -> list[int]:
    return [seq for _, seq in sent]


def _acks() -> BatchAcks:
    acks = BatchAcks(ack_every=2.0, burst=8, gaps=3.0, linger_max=30.0)
    acks.register("n", ack_window=32)
    return acks


def test_an_agent_batching_every_10_s_gets_one_ack_per_three_batches():
    sent = _run(_acks(), "n", [10.0 * i for i in range(10)])
    # the first at once (none for a while), then one covering each three
    assert sent == [(0.0, 1), (30.0, 4), (60.0, 7), (90.0, 10)], sent


def test_an_agent_batching_every_half_second_gets_one_ack_per_ack_every():
    sent = _run(_acks(), "n", [0.5 * i for i in range(13)])
    assert _seqs(sent) == [1, 5, 9, 13], sent  # 2 s apart, as before the gap rule


def test_a_held_ack_goes_out_when_its_linger_passes_without_another_batch():
    acks = _acks()
    assert _seqs(_run(acks, "n", [0.0, 10.0, 20.0])) == [1]  # held: 2, 3 (linger 30 s)
    assert acks.due(29.0) == []
    assert acks.due(30.0) == ["n"]
    assert acks.take("n", 30.0) == ("i", 3)
    assert acks.due(100.0) == []  # nothing left held


def test_an_agent_batching_rarely_is_acked_at_least_every_linger_max():
    # every 20 s: three gaps would be 60 s; linger_max 30 s: the held ack goes out by the
    # periodic check 30 s after the last one
    sent = _run(_acks(), "n", [20.0 * i for i in range(7)])
    assert sent == [(0.0, 1), (30.0, 2), (60.0, 4), (90.0, 5), (120.0, 7)], sent


def test_half_the_agents_window_waiting_is_acked_at_once_whatever_the_gap():
    acks = BatchAcks(ack_every=2.0, burst=8, gaps=3.0, linger_max=30.0)
    acks.register("small", ack_window=4)  # burst: 2
    sent = _run(acks, "small", [10.0 * i for i in range(7)])
    assert _seqs(sent) == [1, 3, 5, 7], sent
    acks.register("n", ack_window=32)  # burst 8: a replayed outbox, 8 batches at once
    sent = _run(acks, "n", [100.0 + 0.001 * i for i in range(9)])
    assert _seqs(sent) == [1, 9], sent


def test_a_reconnect_starts_over_and_forgets_what_was_held():
    acks = _acks()
    _run(acks, "n", [0.0, 10.0])  # 2 held
    acks.register("n", ack_window=32)  # the registration's own ack announces the seq
    acks.announced("n", ("j", 0))
    assert acks.due(1000.0) == []
    acks.batch("n", 1000.0)
    assert acks.committed("n", ("j", 1), 1000.0)  # a new instance: acked at once
