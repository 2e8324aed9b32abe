"""tracefleet-controller: holds the fleet's desired state and serves agents and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import grp
import logging
import math
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracefleet.controller.api import auth as authz
from tracefleet.controller.api import kubetoken as kt
from tracefleet.controller.api import tls as tlsmod
from tracefleet.controller.api.agent_api import AgentService, add_agent_service
from tracefleet.controller.api.control_api import ControlService
from tracefleet.controller.api.metrics import start_metrics
from tracefleet.controller.api.wakeups import coalesce_grpc_wakeups
from tracefleet.controller.common import env
from tracefleet.controller.common.certs import ROLE_ADMIN, ROLE_READ
from tracefleet.controller.domain import policy as pol
from tracefleet.controller.domain.controller import DEFAULT_MAX_BATCH_RATE, Controller
from tracefleet.controller.domain.redaction import TextRedactor
from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.etcdclient import EtcdClient
from tracefleet.controller.storage.etcdstore import EtcdStore
from tracefleet.controller.storage.store import Store, StoreError
from tracefleet.model.netaddr import (
    check_address,
    is_loopback,
    read_socket_path,
    split_host_port,
    unix_path,
)
from tracefleet.v1 import agent_pb2, control_pb2, control_pb2_grpc

log = logging.getLogger("tracefleet.controller")

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second controller on the same port must fail, not share it
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # no bandwidth-delay probing: it answered each small message (a DesiredState, an Ack)
    # with a PING each way, half the controller's sendmsg/recvmsg calls during a change at
    # 200 agents. Flow control keeps its initial window instead of growing it with the
    # measured bandwidth: ample for result batches sent once a second; an outbox replayed
    # over a long round trip takes longer.
    ("grpc.http2.bdp_probe", 0),
]

EPILOG = f"""\
environment:
  {env.CONTROLLER_LISTEN}   default of --listen ({env.DEFAULT_LISTEN})
  {env.CONTROLLER_DB}       default of --db ({env.DEFAULT_DB})
  {env.ETCD}, {env.ETCD_PREFIX}  default of --etcd, --etcd-prefix (replicas)
  {tlsmod.TLS_DIR_ENV}         default of --tls-dir
  {authz.TOKENS_FILE_ENV}     default of --tokens-file
  {pol.POLICY_FILE_ENV}     default of --policy
  {env.AGENT_IDENTITY}  default of --agent-identity ({kt.MODE_CERTIFICATE})
  {env.AGENT_TOKEN_AUDIENCE}  default of --agent-token-audience ({kt.DEFAULT_AUDIENCE})
  {env.AGENT_SERVICE_ACCOUNT}  default of --agent-service-account
  {env.KUBERNETES_SERVICE_HOST}, {env.KUBERNETES_SERVICE_PORT}  default of --kube-api

access without TLS (the default, --listen unix:PATH): PATH (mode 0660, group
  --admin-group) serves agents and admin operators; PATH-read.sock (mode 0660, group
  --read-group) serves read-only operators. The kernel checks the caller against those file
  permissions; everyone else gets EACCES. TCP without TLS needs --insecure-listen.

examples:
  tracefleet-controller       # unix:{env.DEFAULT_SOCKET}, group {env.DEFAULT_ADMIN_GROUP}
  tracefleet-controller --listen unix:/tmp/tf/ctl.sock --db :memory:    # no persistence
  tracefleet-controller --listen 127.0.0.1:0 --insecure-listen --db :memory:  # open TCP
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


def _count(text: str) -> int:
    """A whole number 1..10^7 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 10**7:
        raise argparse.ArgumentTypeError(f"must be 1..10000000, not {text!r}")
    return value


def _rate(text: str) -> float:
    """A finite rate >= 0 per second, 0 meaning no limit (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number per second: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a number per second >= 0 (0: no limit), not {text!r}"
        )
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
        help="unix:/PATH, or host:port (port 0 picks a free one) (default: %(default)s). "
        "host:port needs --tls-dir, or --insecure-listen.",
    )
    p.add_argument(
        "--admin-group",
        default=env.DEFAULT_ADMIN_GROUP,
        metavar="GROUP",
        help="unix socket: group that may use the admin/agent socket, besides root "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--read-group",
        default=env.DEFAULT_READ_GROUP,
        metavar="GROUP",
        help="unix socket: group that may use the read-only socket PATH-read.sock "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get(tlsmod.TLS_DIR_ENV, ""),
        metavar="DIR",
        help="mTLS: DIR/ca.crt (CA of agents and operators), tls.crt, tls.key (this server); "
        "files are reloaded when they change. Make them with 'tracefleet certs'.",
    )
    p.add_argument(
        "--insecure-listen",
        "--insecure",
        dest="insecure",
        action="store_true",
        help="serve TCP without TLS: anyone who reaches the port (any local user, on "
        "loopback) controls tracing and reads captured arguments",
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
        "--etcd",
        default=os.environ.get(env.ETCD, ""),
        metavar="URL[,URL...]",
        help="keep the desired state and the node registry in etcd (http://HOST:2379,...), "
        "shared by every controller replica given the same --etcd-prefix, and the ledger of "
        f"result batches (exactly once across replicas) (env {env.ETCD})",
    )
    p.add_argument(
        "--etcd-prefix",
        default=os.environ.get(env.ETCD_PREFIX, "/tracefleet"),
        help=f"key prefix in etcd (env {env.ETCD_PREFIX}; default: %(default)s)",
    )
    p.add_argument(
        "--stale-after",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="a node not heard from for this long is reported stale (default: %(default)s)",
    )
    p.add_argument(
        "--forget-after",
        type=_seconds,
        default=7 * 86400.0,
        metavar="SECONDS",
        help="forget a node (record, totals) not heard from for this long; "
        "'tracefleet node rm' does it at once (default: %(default)s = 7 days)",
    )
    p.add_argument(
        "--max-nodes",
        type=_count,
        default=10_000,
        metavar="N",
        help="refuse to register more nodes than this (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch-rate",
        type=_rate,
        default=DEFAULT_MAX_BATCH_RATE,
        metavar="PER_SECOND",
        help="result batches a second the whole fleet may send: agents are told to space "
        "theirs (BatchAck.pace) once the fleet is larger; counts stay exact, only coarser "
        "in time; 0: every agent at its own interval (default: %(default)s)",
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


@dataclass(frozen=True)
class UnixSocket:
    path: str
    group: str  # may be missing on this host: then only root can connect
    role: str  # admin (agents too) or read


def _unix_sockets(args: argparse.Namespace, path: str) -> list[UnixSocket]:
    return [
        UnixSocket(path, args.admin_group, ROLE_ADMIN),
        UnixSocket(read_socket_path(path), args.read_group, ROLE_READ),
    ]


def _claim_socket(path: str) -> None:
    """Make ``path`` free to bind: refuse if a live server answers there (grpc would unlink
    and steal it), remove a stale socket file; OSError/ValueError naming the fix."""
    if len(path.encode()) > 107:  # sun_path: a longer one is cut or refused by the kernel
        raise ValueError(
            f"{path} is {len(path.encode())} bytes, more than a unix socket's 107 (the "
            "read-only socket beside --listen adds 5): pick a shorter --listen unix:/PATH"
        )
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket: remove it or pick another --listen")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # left by a controller that died
            return
    raise ValueError(f"another process serves {path}: stop it or pick another --listen unix:/PATH")


def _secure_socket(sock: UnixSocket) -> str:
    """chown root:GROUP and chmod 0660 (0600 without the group); the warning to log, if any."""
    try:
        gid = grp.getgrnam(sock.group).gr_gid
    except KeyError:
        os.chmod(sock.path, 0o600)
        return (
            f"group {sock.group!r} does not exist: only root can use {sock.path} ({sock.role}); "
            f"create it (groupadd --system {sock.group}) and add users, or pass "
            f"--{sock.role}-group"
        )
    os.chown(sock.path, os.geteuid(), gid)
    os.chmod(sock.path, 0o660)
    return ""


async def serve(args: argparse.Namespace) -> int:
    coalesce_grpc_wakeups(asyncio.get_running_loop())  # before gRPC's poller registers
    try:
        path = unix_path(args.listen)
        check_address(args.listen)
        host = "" if path is not None else split_host_port(args.listen)[0]
    except ValueError as e:
        print(f"tracefleet-controller: {e}", file=sys.stderr)
        return 2
    try:
        store = Store(args.db)
        if args.etcd:
            try:
                client = EtcdClient(args.etcd.split(","))
            except ValueError as e:
                store.close()
                raise StoreError(str(e)) from None
            store = EtcdStore(client, args.etcd_prefix, store)  # type: ignore[assignment]
    except StoreError as e:
        hint = f"pass --db PATH or set {env.CONTROLLER_DB}"
        print(f"tracefleet-controller: {e} ({hint})", file=sys.stderr)
        return 2
    try:
        if path is not None and args.tls_dir:
            raise ValueError(
                "--tls-dir is for TCP: a unix socket is guarded by its file permissions; "
                "pass --listen HOST:PORT with --tls-dir"
            )
        if path is not None and args.insecure:
            raise ValueError("--insecure-listen is for TCP; a unix socket is never open")
        security = _security(args, host, unix=path is not None)
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
    controller = Controller(
        store,
        stale_after=args.stale_after,
        window=args.window,
        max_nodes=args.max_nodes,
        forget_after=args.forget_after,
        max_batch_rate=args.max_batch_rate,
    )
    controller.redactor = TextRedactor(policy.redact)
    health_servicer = health.aio.HealthServicer()
    services = [
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]

    def make_server(auth: authz.Authorizer, agents: bool) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        if agents:
            add_agent_service(AgentService(controller, auth, policy.redact), server)
        control_pb2_grpc.add_ControlServiceServicer_to_server(
            ControlService(controller, auth, policy), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(services if agents else services[1:], server)
        return server

    servers: list[grpc.aio.Server] = []
    warnings: list[str] = []
    try:
        if path is not None:
            for sock in _unix_sockets(args, path):
                _claim_socket(sock.path)
                server = make_server(authorizer.with_role(sock.role), sock.role == ROLE_ADMIN)
                old = os.umask(0o177)  # no window in which the socket is open to others
                try:
                    server.add_insecure_port(f"unix:{sock.path}")
                finally:
                    os.umask(old)
                warnings.append(_secure_socket(sock))
                servers.append(server)
            shown, port = f"unix:{path}", 0
        else:
            server = make_server(authorizer, True)
            port = (
                server.add_secure_port(args.listen, server_tls.credentials())
                if server_tls is not None
                else server.add_insecure_port(args.listen)
            )
            servers.append(server)
            shown = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    except (RuntimeError, OSError, ValueError) as e:
        print(f"tracefleet-controller: cannot listen on {args.listen}: {e}", file=sys.stderr)
        store.close()
        return 1
    if path is None and port == 0:
        print(
            f"tracefleet-controller: cannot listen on {args.listen} (address in use or not "
            "local?); pick another --listen",
            file=sys.stderr,
        )
        store.close()
        return 1
    for w in filter(None, warnings):
        log.warning("%s", w)
    if path is None and server_tls is None:
        banner = "!" * 78
        print(
            f"{banner}\nWARNING: --insecure-listen: serving WITHOUT TLS OR AUTHENTICATION on "
            f"{shown}"
            f"{' (loopback: every local user)' if is_loopback(host) else ''}.\n"
            "Anyone who can reach this port can reconfigure tracing on every node and read "
            "captured\nsyscall arguments, and any client can claim any node name"
            f"{'' if authorizer.token_mode else ' (operators: everyone is admin)'}. Use the "
            f"default unix socket, or\n--tls-dir (see 'tracefleet certs').\n{banner}",
            file=sys.stderr,
        )
    await controller.start()
    if isinstance(store, EtcdStore):  # changes by other replicas reach this one's agents
        loop = asyncio.get_running_loop()

        def on_change(gen: int, rules: list[Rule]) -> None:
            loop.call_soon_threadsafe(controller.take_shared, gen, rules)

        store.watch(on_change)
    for server in servers:
        await server.start()
    for name in services[:2]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if args.metrics_listen:
        start_metrics(args.metrics_listen, controller)
    mode = "mTLS" if server_tls is not None else "insecure"
    if path is not None:
        mode = f"unix socket; read-only: unix:{read_socket_path(path)}"
    print(
        f"tracefleet-controller: listening on {shown} ({mode}), agent identity "
        f"{args.agent_identity}, db {args.db}, "
        f"generation {controller.generation}",
        file=sys.stderr,
        flush=True,
    )
    # What start-up made (modules, gRPC, the store's first read) lives as long as the process:
    # out of the collector's reach, a full collection walks only what came after, such as
    # the agents' state (at 200 agents its pause went from 49 to 12 ms, during a change)
    gc.collect()
    gc.freeze()
    # and the collector runs less often: a change allocates on every agent's stream, and the
    # default thresholds (700, 10, 10) collected 15 times a change at 1,000 agents, ~20% of
    # the controller's CPU for it (35-40 ms a change). Reference counting frees nearly
    # everything; the cycles left (a stream's error, a cancelled task) wait a little longer.
    gc.set_threshold(50_000, 20, 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await controller.stop()
    await asyncio.gather(*(server.stop(grace=2.0) for server in servers))
    if path is not None:
        for sock in _unix_sockets(args, path):
            with contextlib.suppress(OSError):
                os.unlink(sock.path)
    store.close()
    return 0


def _security(
    args: argparse.Namespace, host: str, *, unix: bool = False
) -> tuple[tlsmod.ServerTLS | None, authz.Authorizer, pol.Policy]:
    """TLS, operator auth and policy from the flags; raises with a one-line cause."""
    server_tls = None
    if args.tls_dir:
        server_tls = tlsmod.ServerTLS(args.tls_dir)
        # grpc reports rejected handshakes only on stderr: count them from there
        tlsmod.HandshakeLogWatcher().start()
    elif not unix and not args.insecure:
        local = " (every local user can reach a loopback port)" if is_loopback(host) else ""
        raise ValueError(
            f"refusing to serve {args.listen} without TLS{local}: "
            f"pass --tls-dir DIR (or set {tlsmod.TLS_DIR_ENV}; make the files with "
            "'tracefleet certs'), use the default unix socket (--listen unix:/PATH), or "
            "--insecure-listen on a trusted network"
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
