"""grpc.aio's poller reader wrapped so that a burst of completions costs one loop wakeup, and
no completion is ever left without one (controller/api/wakeups.py)."""

import asyncio
import collections
import socket
import subprocess
import sys
import textwrap
import threading

from tracefleet.controller.api.wakeups import coalesce_grpc_wakeups


class PollerCompletionQueue:
    """What grpc.aio's poller does (cygrpc): a completion is queued, then one byte written;
    the loop's reader reads one byte and runs every completion queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.read_sock, self.write_sock = socket.socketpair()
        self.queue: collections.deque[int] = collections.deque()
        self.lock = threading.Lock()
        self.ran: list[int] = []
        self.wakeups = 0
        self.during_run: list[int] = []  # completions that arrive while the handler runs
        loop.add_reader(self.read_sock, _partial(self._handle_events, loop))

    def complete(self, tag: int) -> None:
        with self.lock:
            self.queue.append(tag)
        self.write_sock.send(b"1")

    def _handle_events(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakeups += 1
        self.read_sock.recv(1)
        while self.during_run:  # the poller thread queues more meanwhile
            self.complete(self.during_run.pop(0))
        while True:
            with self.lock:
                if not self.queue:
                    break
                tag = self.queue.popleft()
            self.ran.append(tag)

    def pending_bytes(self) -> int:
        try:
            return len(self.read_sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0


def _partial(fn, *args):  # grpc registers a functools.partial of the bound method
    import functools

    return functools.partial(fn, *args)


async def _settle(poller: PollerCompletionQueue, want: int) -> None:
    for _ in range(200):
        await asyncio.sleep(0)
        if len(poller.ran) >= want and poller.pending_bytes() == 0:
            return


def test_a_burst_of_completions_costs_one_wakeup_and_runs_every_completion() -> None:
    async def scenario() -> tuple[int, list[int], int]:
        loop = asyncio.get_running_loop()
        coalesce_grpc_wakeups(loop)
        poller = PollerCompletionQueue(loop)
        for tag in range(100):  # a unix socket holds a few hundred 1-byte writes
            poller.complete(tag)
        await _settle(poller, 100)
        return poller.wakeups, poller.ran, poller.pending_bytes()

    wakeups, ran, left = asyncio.run(scenario())
    assert ran == list(range(100))
    assert left == 0
    assert wakeups == 1  # one byte read per wakeup: 100 without the wrapper


def test_completions_queued_while_the_handler_runs_still_get_their_wakeup() -> None:
    async def scenario() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        coalesce_grpc_wakeups(loop)
        poller = PollerCompletionQueue(loop)
        poller.during_run = [100, 101]  # queued after the bytes waiting were read
        for tag in range(3):
            poller.complete(tag)
        await _settle(poller, 5)
        poller.complete(200)  # and one later, alone
        await _settle(poller, 6)
        return poller.ran, poller.pending_bytes()

    ran, left = asyncio.run(scenario())
    assert sorted(ran) == [0, 1, 2, 100, 101, 200]
    assert left == 0


def test_a_reader_that_is_not_grpcs_is_left_as_it_was() -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        wrapped = coalesce_grpc_wakeups(loop)
        r, w = socket.socketpair()
        got: list[bytes] = []
        loop.add_reader(r, lambda: got.append(r.recv(1)))
        w.send(b"abc")
        for _ in range(20):
            await asyncio.sleep(0)
        loop.remove_reader(r)
        assert got == [b"a", b"b", b"c"]
        return len(wrapped)

    assert asyncio.run(scenario()) == 0


def test_the_installed_grpc_registers_the_reader_this_wraps() -> None:
    """With the grpcio installed here: a server and a channel on a loop wrapped first (a
    fresh process: grpc.aio starts one poller per process) serve a stream of messages, and
    grpc's reader was the one wrapped."""
    script = textwrap.dedent("""
        import asyncio, grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from tracefleet.controller.api.wakeups import coalesce_grpc_wakeups

        async def main():
            wrapped = coalesce_grpc_wakeups(asyncio.get_running_loop())
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(50):
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert r.status == health_pb2.HealthCheckResponse.SERVING
            await server.stop(None)
            print(len(wrapped), wrapped[0].calls > 0 if wrapped else False)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.split() == ["1", "True"], out.stderr[-2000:]
