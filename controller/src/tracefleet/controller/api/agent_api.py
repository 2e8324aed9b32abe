"""AgentService: the agents' Connect stream, adapted onto the Controller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from tracefleet.controller.api.auth import Authorizer
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.domain.fleet import Connection, Node
from tracefleet.controller.domain.ledger import MAX_INSTANCE_ID, batch_problem
from tracefleet.controller.domain.wire import WIRE
from tracefleet.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("tracefleet.controller.agents")


# Generations are stored as SQLite INTEGER (signed 64-bit), and the controller moves past a
# generation an agent reports from the future: keep far below the limit. Node names and
# labels end up in logs, status tables and metric labels, so they are bounded too.
MAX_GENERATION = 2**62
MAX_NAME = 253  # a Kubernetes node name
MAX_LABELS = 64


def register_problem(reg: agent_pb2.Register) -> str:
    """Why a Register cannot be accepted, or "" if it can."""
    if len(reg.node_name) > MAX_NAME or any(c in reg.node_name for c in "\0\n\r"):
        return f"node_name must be 1..{MAX_NAME} printable characters"
    if reg.applied_generation > MAX_GENERATION:
        return f"applied_generation {reg.applied_generation} is out of range"
    if len(reg.instance_id) > MAX_INSTANCE_ID:
        return f"instance_id must be at most {MAX_INSTANCE_ID} characters"
    if len(reg.labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels"
    for k, v in reg.labels.items():
        if not k or len(k) > MAX_NAME or len(v) > MAX_NAME:
            return f"label {k[:40]!r}: keys 1..{MAX_NAME} and values up to {MAX_NAME} characters"
    return ""


def add_agent_service(servicer: agent_pb2_grpc.AgentServiceServicer, server: Any) -> None:
    """Serve AgentService like agent_pb2_grpc.add_AgentServiceServicer_to_server, with a
    response serializer that writes the controller's pre-serialized messages as they are."""
    handlers = {
        "Connect": grpc.stream_stream_rpc_method_handler(
            servicer.Connect,
            request_deserializer=agent_pb2.AgentMessage.FromString,
            response_serializer=WIRE.serialize,
        )
    }
    name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        controller: Controller,
        auth: Authorizer | None = None,
        redact_patterns: tuple[str, ...] = (),
    ) -> None:
        self.ctl = controller
        self.auth = auth  # None: no identity check (in-process tests)
        # sent in every DesiredState (the controller builds them once per generation)
        controller.redact_patterns = tuple(redact_patterns)

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
        problem = register_problem(first.register) or self.ctl.limits.register(first.register)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            return
        if self.auth is not None:
            ok, code, message = await self.auth.agent(context, first.register.node_name)
            if not ok:
                await context.abort(code, message)
                return
            labels, message = await self.auth.node_labels(context, first.register.node_name)
            if message:
                await context.abort(grpc.StatusCode.UNAVAILABLE, message)
                return
            if labels is not None:  # Kubernetes: the Node's labels, not the agent's claim
                first.register.labels.clear()
                first.register.labels.update(labels)
                problem = self.ctl.limits.labels(labels, first.register.node_name)
                if problem:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    return
        name = first.register.node_name
        if name not in self.ctl.fleet.nodes and len(self.ctl.fleet.nodes) >= self.ctl.max_nodes:
            message = (f"this controller knows {len(self.ctl.fleet.nodes)} nodes, its limit "
                       f"(--max-nodes); node {name[:60]!r} refused: remove stale ones with "
                       "'tracefleet node rm' or raise the limit")  # fmt: skip
            self.ctl.limits.refuse("agent_too_many_nodes", message)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            return
        conn = Connection()
        node = await self.ctl.register(first.register, conn)
        log.info(
            "node %s connected (%s, applied generation %d)",
            node.name,
            context.peer(),
            first.register.applied_generation,
        )
        reader = asyncio.create_task(self._read(context, node, conn))
        try:
            while True:
                msgs = await conn.wait()
                closing = msgs[-1] is None  # close() comes last: nothing is sent after it
                for msg in msgs[:-1] if closing else msgs:
                    await context.write(msg)
                if closing:
                    break
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
                    problem = batch_problem(msg.result_batch) or self.ctl.limits.batch(
                        msg.result_batch, node.name
                    )
                    if problem:
                        log.warning("node %s sent a result batch that cannot be applied (%s): "
                                    "dropping its stream", node.name, problem)  # fmt: skip
                        break
                    self.ctl.on_batch(node, msg.result_batch)
                elif kind == "ack":
                    if msg.ack.generation > MAX_GENERATION:
                        log.warning("node %s acked generation %d, out of range: dropping "
                                    "its stream", node.name, msg.ack.generation)  # fmt: skip
                        break
                    self.ctl.on_ack(node, msg.ack)
                elif kind == "node_report":
                    self.ctl.on_report(node, msg.node_report)
                elif kind == "register":
                    log.warning("node %s sent Register twice on one stream", node.name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # stream broken, or a bug in a handler: drop the stream
            if not isinstance(e, grpc.aio.AioRpcError | grpc.RpcError):
                log.exception("error handling a message of node %s", node.name)
        finally:
            conn.close()
