"""tracefleet-controller: holds the fleet's desired state and serves agents and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracefleet.controller._internal import auth as authz
from tracefleet.controller._internal import env
from tracefleet.controller._internal import kubetoken as kt
from tracefleet.controller._internal import policy as pol
from tracefleet.controller._internal import tls as tlsmod
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
  {tlsmod.TLS_DIR_ENV}         default of --tls-dir
  {authz.TOKENS_FILE_ENV}     default of --tokens-file
  {pol.POLICY_FILE_ENV}     default of --policy
  {env.AGENT_IDENTITY}  default of --agent-identity ({kt.MODE_CERTIFICATE})
  {env.AGENT_TOKEN_AUDIENCE}  default of --agent-token-audience ({kt.DEFAULT_AUDIENCE})
  {env.AGENT_SERVICE_ACCOUNT}  default of --agent-service-account
  {env.KUBERNETES_SERVICE_HOST}, {env.KUBERNETES_SERVICE_PORT}  default of --kube-api

examples:
  tracefleet-controller --listen 127.0.0.1:7070 --db /var/lib/tracefleet/controller.db
  tracefleet-controller --listen 127.0.0.1:0 --db :memory:    # any free port, no persistence
  tracefleet-controller --listen 0.0.0.0:7070 --tls-dir /etc/tracefleet/tls --policy policy.yaml
  # in a Kubernetes pod, agents sharing one certificate (deploy/kubernetes does this):
  tracefleet-controller --listen 0.0.0.0:7070 --tls-dir /etc/tracefleet/tls \\
      --agent-identity k8s-token
"""


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _address_or_off(text: str) -> str:
    """host:port, or '' / 'off' for none (argparse type)."""
    if text.strip() in ("", "off"):
        return ""
    try:
        split_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


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
        "A non-loopback address needs --tls-dir (or --insecure).",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get(tlsmod.TLS_DIR_ENV, ""),
        metavar="DIR",
        help="mTLS: DIR/ca.crt (CA of agents and operators), tls.crt, tls.key (this server); "
        "files are reloaded when they change. Make them with 'tracefleet certs'.",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS on a non-loopback address (anyone who reaches the port "
        "controls tracing)",
    )
    p.add_argument(
        "--tokens-file",
        default=os.environ.get(authz.TOKENS_FILE_ENV, ""),
        metavar="FILE",
        help="operator bearer tokens, YAML/JSON: {sha256(token): {name, role: admin|read}}",
    )
    p.add_argument(
        "--policy",
        default=os.environ.get(pol.POLICY_FILE_ENV, ""),
        metavar="FILE",
        help="policy: which event sets may be enabled where, argv redaction patterns "
        "(deploy/README.md)",
    )
    p.add_argument(
        "--agent-identity",
        choices=kt.MODES,
        default=os.environ.get(env.AGENT_IDENTITY, kt.MODE_CERTIFICATE),
        help="how an agent proves the node it registers as: 'certificate' (its client "
        "certificate names the node: 'tracefleet certs agent --node N') or 'k8s-token' (a "
        "projected ServiceAccount token whose TokenReview names the node; for a DaemonSet "
        "sharing one agent certificate) (default: %(default)s)",
    )
    p.add_argument(
        "--agent-token-audience",
        default=os.environ.get(env.AGENT_TOKEN_AUDIENCE, kt.DEFAULT_AUDIENCE),
        metavar="AUDIENCE",
        help="k8s-token: audience of the agents' projected tokens (default: %(default)s)",
    )
    p.add_argument(
        "--agent-service-account",
        default=os.environ.get(env.AGENT_SERVICE_ACCOUNT, ""),
        metavar="NAMESPACE/NAME",
        help="k8s-token: the agents' ServiceAccount (default: "
        f"<this pod's namespace>/{kt.DEFAULT_AGENT_SERVICE_ACCOUNT})",
    )
    p.add_argument(
        "--kube-api",
        default="",
        metavar="URL",
        help="k8s-token: API server for TokenReview (default: "
        f"https://${env.KUBERNETES_SERVICE_HOST}:${env.KUBERNETES_SERVICE_PORT})",
    )
    p.add_argument(
        "--kube-credentials",
        default=kt.SERVICEACCOUNT_DIR,
        metavar="DIR",
        help="k8s-token: DIR/ca.crt (the API server's CA), DIR/token (this controller's "
        "ServiceAccount token, re-read per review), DIR/namespace (default: %(default)s)",
    )
    p.add_argument(
        "--db",
        default=os.environ.get(env.CONTROLLER_DB, env.DEFAULT_DB),
        help="SQLite file of the desired state, ':memory:' for none (default: %(default)s)",
    )
    p.add_argument(
        "--stale-after",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="a node not heard from for this long is reported stale (default: %(default)s)",
    )
    p.add_argument(
        "--window",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="window of the rates in status and top (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default="",
        type=_address_or_off,
        metavar="HOST:PORT",
        help="serve Prometheus metrics (/metrics) on host:port (default: off)",
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
    try:
        security = _security(args, host)
    except (
        tlsmod.TLSConfigError,
        authz.TokensError,
        pol.PolicyError,
        kt.KubeConfigError,
        ValueError,
    ) as e:
        print(f"tracefleet-controller: {e}", file=sys.stderr)
        store.close()
        return 2
    server_tls, authorizer, policy = security
    controller = Controller(store, stale_after=args.stale_after, window=args.window)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentService(controller, authorizer, policy.redact), server
    )
    control_pb2_grpc.add_ControlServiceServicer_to_server(
        ControlService(controller, authorizer, policy), server
    )
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
        port = (
            server.add_secure_port(args.listen, server_tls.credentials())
            if server_tls is not None
            else server.add_insecure_port(args.listen)
        )
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
    if server_tls is None and not is_loopback(host):
        banner = "!" * 78
        print(
            f"{banner}\nWARNING: --insecure: serving WITHOUT TLS OR AUTHENTICATION on "
            f"{args.listen}.\n"
            "Anyone who can reach this port can reconfigure tracing on every node and read "
            "captured\nsyscall arguments, and any client can claim any node name. Use "
            f"--tls-dir (see 'tracefleet certs').\n{banner}",
            file=sys.stderr,
        )
    elif server_tls is None:
        print(
            "tracefleet-controller: WARNING: no TLS (loopback only; agents are not "
            "authenticated" + ("" if authorizer.token_mode else ", operators neither") + ")",
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
        f"tracefleet-controller: listening on {shown} "
        f"({'mTLS' if server_tls is not None else 'insecure'}), agent identity "
        f"{args.agent_identity}, db {args.db}, "
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


def _security(
    args: argparse.Namespace, host: str
) -> tuple[tlsmod.ServerTLS | None, authz.Authorizer, pol.Policy]:
    """TLS, operator auth and policy from the flags; raises with a one-line cause."""
    server_tls = None
    if args.tls_dir:
        server_tls = tlsmod.ServerTLS(args.tls_dir)
        # grpc reports rejected handshakes only on stderr: count them from there
        tlsmod.HandshakeLogWatcher().start()
    elif not is_loopback(host) and not args.insecure:
        raise ValueError(
            f"refusing to serve {args.listen} without TLS: pass --tls-dir DIR (or set "
            f"{tlsmod.TLS_DIR_ENV}; make the files with 'tracefleet certs'), or --insecure "
            "on a trusted network"
        )
    tokens = authz.load_tokens(args.tokens_file) if args.tokens_file else None
    authorizer = authz.Authorizer(
        tls=server_tls is not None, tokens=tokens, agent_tokens=_agent_tokens(args)
    )
    policy = pol.load_policy(args.policy) if args.policy else pol.Policy()
    if args.policy:
        log.info(
            "policy %s: %s allow entries, %d redaction pattern(s)",
            args.policy,
            "no" if policy.allow is None else len(policy.allow),
            len(policy.redact),
        )
    return server_tls, authorizer, policy


def _agent_tokens(args: argparse.Namespace) -> kt.AgentTokenVerifier | None:
    """The TokenReview verifier of --agent-identity=k8s-token, None in certificate mode;
    raises KubeConfigError naming the fix."""
    if args.agent_identity not in kt.MODES:  # argparse does not check defaults from the env
        raise kt.KubeConfigError(
            f"{env.AGENT_IDENTITY}={args.agent_identity!r}: use one of {', '.join(kt.MODES)}"
        )
    if args.agent_identity != kt.MODE_K8S_TOKEN:
        return None
    api = kt.in_cluster(args.kube_api, args.kube_credentials)
    account = args.agent_service_account
    if not account:
        namespace = kt.own_namespace(args.kube_credentials)
        if not namespace:
            raise kt.KubeConfigError(
                f"cannot tell the agents' ServiceAccount: no {args.kube_credentials}/namespace; "
                f"pass --agent-service-account NAMESPACE/NAME (or set {env.AGENT_SERVICE_ACCOUNT})"
            )
        account = f"{namespace}/{kt.DEFAULT_AGENT_SERVICE_ACCOUNT}"
    username = kt.service_account_username(account)
    if not args.agent_token_audience.strip():
        raise kt.KubeConfigError("--agent-token-audience must not be empty")
    reviewer = kt.TokenReviewer(api, args.agent_token_audience.strip())
    log.info(
        "agent identity: ServiceAccount tokens of %s for audience %r, reviewed by %s",
        username,
        reviewer.audience,
        api.url,
    )
    return kt.AgentTokenVerifier(reviewer, username=username)


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
