"""tracefleet-controller: holds the fleet's desired state and serves agents and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracefleet.controller._internal import env
from tracefleet.controller._internal.agent_api import AgentService
from tracefleet.controller._internal.control_api import ControlService
from tracefleet.controller._internal.controller import Controller
from tracefleet.controller._internal.metrics import start_metrics
from tracefleet.controller._internal.netaddr import is_loopback, split_host_port
from tracefleet.controller._internal.store import Store, StoreError
from tracefleet.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc

log = logging.getLogger("tracefleet.controller")

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second controller on the same port must fail, not share it
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]

EPILOG = f"""\
environment:
  {env.CONTROLLER_LISTEN}   default of --listen ({env.DEFAULT_LISTEN})
  {env.CONTROLLER_DB}       default of --db ({env.DEFAULT_DB})

examples:
  tracefleet-controller --listen 127.0.0.1:7070 --db /var/lib/tracefleet/controller.db
  tracefleet-controller --listen 127.0.0.1:0 --db :memory:    # any free port, no persistence
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tracefleet-controller",
        description="Serve the tracefleet fleet API: agents connect to it, the tracefleet CLI "
        "configures event sets through it. Desired state survives restarts (SQLite).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=os.environ.get(env.CONTROLLER_LISTEN, env.DEFAULT_LISTEN),
        help="host:port to serve on; port 0 picks a free one (default: %(default)s). "
        "No TLS yet: keep it on loopback or a trusted network.",
    )
    p.add_argument(
        "--db",
        default=os.environ.get(env.CONTROLLER_DB, env.DEFAULT_DB),
        help="SQLite file of the desired state, ':memory:' for none (default: %(default)s)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a node not heard from for this long is reported stale (default: %(default)s)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="window of the rates in status and top (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (not implemented yet; accepted)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def serve(args: argparse.Namespace) -> int:
    try:
        host, _ = split_host_port(args.listen)
    except ValueError as e:
        print(f"tracefleet-controller: {e}", file=sys.stderr)
        return 2
    try:
        store = Store(args.db)
    except StoreError as e:
        hint = f"pass --db PATH or set {env.CONTROLLER_DB}"
        print(f"tracefleet-controller: {e} ({hint})", file=sys.stderr)
        return 2
    controller = Controller(store, stale_after=args.stale_after, window=args.window)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(controller), server)
    control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(controller), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(services, server)
    try:
        port = server.add_insecure_port(args.listen)
    except RuntimeError as e:
        print(f"tracefleet-controller: cannot listen on {args.listen}: {e}", file=sys.stderr)
        store.close()
        return 1
    if port == 0:
        print(
            f"tracefleet-controller: cannot listen on {args.listen} (address in use or not "
            "local?); pick another --listen",
            file=sys.stderr,
        )
        store.close()
        return 1
    if not is_loopback(host):
        banner = "!" * 78
        print(
            f"{banner}\nWARNING: serving WITHOUT TLS OR AUTHENTICATION on {args.listen}.\n"
            "Anyone who can reach this port can reconfigure tracing on every node and read "
            "captured\nsyscall arguments. Listen on 127.0.0.1 or put it behind a trusted "
            f"network until TLS lands.\n{banner}",
            file=sys.stderr,
        )
    await controller.start()
    await server.start()
    for name in services[:2]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if args.metrics_listen:
        start_metrics(args.metrics_listen, controller)
    shown = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    print(
        f"tracefleet-controller: listening on {shown} (insecure), db {args.db}, "
        f"generation {controller.generation}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await controller.stop()
    await server.stop(grace=2.0)
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
