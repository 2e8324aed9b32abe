"""An in-process controller on a free loopback port, served from a background thread."""

from __future__ import annotations

import asyncio
import threading

import grpc

from tests.conftest import wait_until as _wait_until
from tracefleet.controller.api.agent_api import AgentService, add_agent_service
from tracefleet.controller.api.control_api import ControlService
from tracefleet.controller.domain.controller import DEFAULT_MAX_BATCH_RATE, Controller, Timings
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import control_pb2_grpc


class InProcessController:
    def __init__(
        self,
        db: str = ":memory:",
        port: int = 0,
        stale_after: float = 10.0,
        max_batch_rate: float = DEFAULT_MAX_BATCH_RATE,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store = Store(db)
        self.controller = Controller(
            self.store,
            stale_after=stale_after,
            timings=Timings(sample_renew=0.5),
            max_batch_rate=max_batch_rate,
        )
        self.port = self._run(self._start(port))
        self.address = f"127.0.0.1:{self.port}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def _services(self) -> tuple[AgentService, ControlService]:
        return AgentService(self.controller), ControlService(self.controller)

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        return server.add_insecure_port(f"127.0.0.1:{port}")

    async def _start(self, port: int) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        agent, control = self._services()
        add_agent_service(agent, self.server)
        control_pb2_grpc.add_ControlServiceServicer_to_server(control, self.server)
        bound = self._bind(self.server, port)
        await self.controller.start()
        await self.server.start()
        return bound

    def call(self, fn, *args):
        """Run fn(*args) on the controller's loop (its state is not thread-safe)."""

        async def wrapper():
            return fn(*args)

        return self._run(wrapper())

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def _stop():
            await self.controller.stop()
            await self.server.stop(grace=0)

        self._run(_stop())
        self.store.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = ""):
    """tests.conftest.wait_until with this module's faster polling for in-process tests."""
    return _wait_until(predicate, timeout, what or str(predicate), every=interval)
