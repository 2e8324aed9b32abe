"""AgentService: the agents' Connect stream, adapted onto the Controller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from tracefleet.controller._internal.auth import Authorizer
from tracefleet.controller._internal.controller import Controller
from tracefleet.controller._internal.fleet import Connection, Node
from tracefleet.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("tracefleet.controller.agents")


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        controller: Controller,
        auth: Authorizer | None = None,
        redact_patterns: tuple[str, ...] = (),
    ) -> None:
        self.ctl = controller
        self.auth = auth  # None: no identity check (in-process tests)
        self.redact_patterns = tuple(redact_patterns)  # sent in every DesiredState

    async def Connect(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "register" or not first.register.node_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message of Connect must be a Register with a node_name",
            )
            return
        if self.auth is not None:
            ok, code, message = self.auth.agent(context, first.register.node_name)
            if not ok:
                await context.abort(code, message)
                return
        conn = Connection()
        node = self.ctl.on_register(first.register, conn)
        log.info(
            "node %s connected (%s, applied generation %d)",
            node.name,
            context.peer(),
            first.register.applied_generation,
        )
        reader = asyncio.create_task(self._read(context, node, conn))
        try:
            while True:
                msg = await conn.outbox.get()
                if msg is None:
                    break
                if self.redact_patterns and msg.WhichOneof("kind") == "desired_state":
                    out = agent_pb2.ControllerMessage()
                    out.CopyFrom(msg)
                    out.desired_state.redact_patterns[:] = self.redact_patterns
                    msg = out
                await context.write(msg)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.ctl.on_disconnect(node, conn)

    async def _read(
        self, context: grpc.aio.ServicerContext[Any, Any], node: Node, conn: Connection
    ) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("kind")
                if kind == "result_batch":
                    self.ctl.on_batch(node, msg.result_batch)
                elif kind == "ack":
                    self.ctl.on_ack(node, msg.ack)
                elif kind == "register":
                    log.warning("node %s sent Register twice on one stream", node.name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # stream broken, or a bug in a handler: drop the stream
            if not isinstance(e, grpc.aio.AioRpcError | grpc.RpcError):
                log.exception("error handling a message of node %s", node.name)
        finally:
            conn.close()
