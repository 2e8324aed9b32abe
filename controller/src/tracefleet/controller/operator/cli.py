"""tracefleet: the operator CLI of the tracefleet controller."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import grpc
from google.protobuf import duration_pb2

from tracefleet.controller.common import env
from tracefleet.controller.common import selector as sel
from tracefleet.controller.common.requestlimits import MAX_PID, MAX_TOP_ROWS
from tracefleet.controller.operator import render
from tracefleet.controller.operator.durations import parse_duration
from tracefleet.model import human, wire
from tracefleet.model.argtypes import int_in
from tracefleet.model.filters import Filters, WorkloadSelector
from tracefleet.model.netaddr import (
    check_address,
    read_socket_path,
    unix_path,
)
from tracefleet.model.tlsfiles import TLSFilesError, read_tls_files
from tracefleet.model.wire import filters_to_pb
from tracefleet.v1 import control_pb2, control_pb2_grpc, types_pb2

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or input (also argparse's own code)
EXIT_UNREACHABLE = 3  # the controller could not be reached or did not answer in time
EXIT_REJECTED = 4  # the controller refused the request (unknown event set, forbidden, ...)
EXIT_NOT_CONVERGED = 5  # --wait: nodes did not apply in time, or reported errors

TLS_DIR_ENV = env.TLS_DIR
TOKEN_ENV = env.TOKEN
TLS_SERVER_NAME_ENV = env.TLS_SERVER_NAME

EXIT_CODES = """\
exit codes:
  0  ok
  2  usage error or bad input (malformed selector, duration, ...)
  3  controller unreachable (or no answer within --timeout)
  4  rejected by the controller (e.g. unknown event set, permission denied)
  5  --wait: not every node applied the change in time, or a node reported an error
"""

EPILOG = f"""\
controller address:
  --controller unix:/PATH or HOST:PORT, else ${env.CONTROLLER}, else {env.DEFAULT_CONTROLLER}
  (a user without access to the unix socket but in the read group uses PATH-read.sock)

credentials (needed when the controller uses mTLS or a tokens file):
  --tls-dir DIR, else ${TLS_DIR_ENV}: operator certificate (ca.crt, tls.crt, tls.key)
  --token TOKEN, else ${TOKEN_ENV}: bearer token (role from the controller's tokens file)
  certificates: tracefleet certs --help

{EXIT_CODES}
examples:
  tracefleet enable file --selector role=db --ttl 10m --wait
  tracefleet enable exec --selector role=web --canary 10 --pid 4242
  tracefleet enable file --node db-1 --node db-2 --path-prefix /etc --comm postgres
  tracefleet disable file
  tracefleet status --output json
  tracefleet events --follow --event-set file --pid 4242
  tracefleet top --event-set file
"""


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def fail(code: int, message: str) -> NoReturn:
    raise CliError(code, message)


# argument parsing ----------------------------------------------------------------------------


_positive_int = int_in("the value", 1, 2**31 - 1)
_pid = int_in("a pid", 1, MAX_PID)
_cgroup_id = int_in("a cgroup id", 1, 2**64 - 1)
_rows = int_in("the limit", 1, MAX_TOP_ROWS)
_count = int_in("the count", 1, 10**9)


def _percent(text: str) -> int:
    try:
        v = int(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (use 1..100)") from None
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"canary must be 1..100, got {v}")
    return v


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use 0..1)") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _node_name(text: str) -> str:
    if not 1 <= len(text) <= 253 or not text.isprintable() or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"bad node name {text[:60]!r}: use 1..253 printable characters, no surrounding "
            "spaces (as in 'tracefleet status')"
        )
    return text


def _selector(text: str) -> str:
    try:
        return str(sel.parse(text))
    except sel.SelectorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """One line on bad usage (cause and where to look), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    # Global options work before or after the command: `tracefleet status -o json` too.
    common = _Parser(add_help=False)
    common.add_argument(
        "--controller",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"controller address (default: ${env.CONTROLLER} or {env.DEFAULT_CONTROLLER})",
    )
    common.add_argument(
        "-o", "--output", choices=render.FORMATS, default=argparse.SUPPRESS,
        help="output format (default: table)",
    )  # fmt: skip
    common.add_argument(
        "--timeout", type=_duration, default=argparse.SUPPRESS, metavar="DURATION",
        help="deadline of each call to the controller (default: 10s)",
    )  # fmt: skip
    common.add_argument(
        "--tls-dir", default=argparse.SUPPRESS, metavar="DIR",
        help=f"mTLS with the operator certificate in DIR (default: ${TLS_DIR_ENV})",
    )  # fmt: skip
    common.add_argument(
        "--tls-server-name", default=argparse.SUPPRESS, metavar="NAME",
        help="name to expect in the controller's certificate, e.g. when port-forwarding "
        f"(default: ${TLS_SERVER_NAME_ENV} or the --controller host)",
    )  # fmt: skip
    common.add_argument(
        "--token", default=argparse.SUPPRESS,
        help=f"bearer token (default: ${TOKEN_ENV}); prefer the variable: argv is visible",
    )  # fmt: skip

    p = _Parser(
        prog="tracefleet",
        description="Configure and observe syscall tracing across the fleet through the "
        "tracefleet controller.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"{epilog}\n\n{EXIT_CODES}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    en = add(
        "enable",
        "enable an event set on the nodes a selector matches",
        "examples:\n"
        "  tracefleet enable file --selector role=db --ttl 10m --wait\n"
        "  tracefleet enable file --selector 'role=db,zone=a' --canary 10\n"
        "  tracefleet enable exec --node web-1 --pid 4242 --comm nginx\n"
        "  tracefleet enable file --path-prefix /etc --path-prefix /root\n\n"
        "selectors: all (default), key=value, key!=value, key=a|b, node=NAME; comma = and.\n"
        "Repeating enable for a set replaces its previous rule; repeating it unchanged\n"
        "is a no-op (a --ttl is restarted).",
    )
    en.add_argument(
        "event_set",
        metavar="EVENT_SET",
        help="e.g. file, exec, net, vfs, or user:NAME (an application's user_event)",
    )
    en.add_argument(
        "-s", "--selector", type=_selector, default=None,
        help="nodes to enable on (default: all)",
    )  # fmt: skip
    en.add_argument(
        "--node", action="append", default=[], metavar="NAME", type=_node_name,
        help="node name (repeatable); added to --selector as node=A|B",
    )  # fmt: skip
    en.add_argument(
        "--ttl", type=_duration, default=0.0, metavar="DURATION",
        help="switch the set off again after this long, e.g. 10m (default: never)",
    )  # fmt: skip
    en.add_argument(
        "--canary", type=_percent, default=0, metavar="PERCENT",
        help="enable on a deterministic PERCENT of the selected nodes only",
    )  # fmt: skip
    en.add_argument(
        "--pid", type=_pid, action="append", default=[],
        help="capture only this process (repeatable)",
    )  # fmt: skip
    en.add_argument(
        "--comm", action="append", default=[], help="capture only this command name (repeatable)"
    )
    en.add_argument(
        "--path-prefix", action="append", default=[], metavar="PATH",
        help="capture only paths under PATH (repeatable)",
    )  # fmt: skip
    en.add_argument(
        "--cgroup-id", type=_cgroup_id, action="append", default=[], metavar="ID",
        help="capture only this cgroup (repeatable)",
    )  # fmt: skip
    en.add_argument("--namespace", default="", help="capture only pods of this namespace")
    en.add_argument("--pod", default="", metavar="GLOB", help="only pods named so (db-*)")
    en.add_argument("--container", default="", help="only containers of this name")
    en.add_argument(
        "--pod-selector", default="", metavar="LABELS",
        help="only pods with these labels (app=db,tier!=cache); --selector picks nodes",
    )  # fmt: skip
    en.add_argument(
        "--follow", action="store_true",
        help="--pid also covers its descendants, present and future (strace -f)",
    )  # fmt: skip
    en.add_argument(
        "--sample-rate", type=_share, default=0.0, metavar="SHARE",
        help="share 0..1 of raw events always forwarded to the controller (default: 0)",
    )  # fmt: skip
    en.add_argument(
        "--export", action="append", default=[], metavar="NAME",
        help="every event of the set, not a sample, to the agents' exporter NAME (configured "
        "on the agents: tracefleet-agent run --exporter NAME=...; repeatable)",
    )  # fmt: skip
    _add_wait(en)

    dis = add(
        "disable",
        "disable an event set on every node",
        "examples:\n  tracefleet disable file\n  tracefleet disable file --wait",
    )
    dis.add_argument("event_set", metavar="EVENT_SET")
    _add_wait(dis)

    st = add(
        "status",
        "nodes, their applied vs desired generation and rates, and the rules in force",
        "examples:\n  tracefleet status\n  tracefleet status --selector role=db -o json",
    )
    st.add_argument("-s", "--selector", type=_selector, default="", help="nodes to list")

    ev = add(
        "events",
        "sampled raw events (the controller asks matching agents to sample while you watch)",
        "examples:\n"
        "  tracefleet events --follow\n"
        "  tracefleet events --follow --node db-1 --event-set file --pid 4242\n"
        "  tracefleet events --count 20 -o json",
    )
    ev.add_argument("-f", "--follow", action="store_true", help="stream until interrupted")
    ev.add_argument("--wide", action="store_true",
                    help="table: an EXE column (the executable's path) after COMM")  # fmt: skip
    ev.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    ev.add_argument(
        "--event-set", action="append", default=[], help="only this event set (repeatable)"
    )
    ev.add_argument(
        "--pid", type=_pid, action="append", default=[],
        help="only this process (repeatable)",
    )  # fmt: skip
    ev.add_argument(
        "--count", type=_count, default=None,
        help="stop after N events (default without --follow: 50)",
    )  # fmt: skip
    ev.add_argument(
        "--duration", type=_duration, default=None, metavar="DURATION",
        help="stop after this long (default without --follow: 5s)",
    )  # fmt: skip
    ev.add_argument(
        "--sample-rate", type=_share, default=1.0, metavar="SHARE",
        help="share of raw events the agents sample (default: 1)",
    )  # fmt: skip

    top = add(
        "top",
        "highest event rates per node, event set and syscall over the controller's window",
        "examples:\n  tracefleet top\n  tracefleet top --event-set file --limit 5",
    )
    top.add_argument("--node", default="", help="only this node")
    top.add_argument("--event-set", default="", help="only this event set")
    top.add_argument("--limit", type=_rows, default=20, help="rows (default: 20)")

    nd = add(
        "node",
        "forget a node that is not connected (admin): its record, totals and batch cursors",
        "examples:\n  tracefleet node rm web-7\n\n"
        "The controller forgets nodes by itself after --forget-after (tracefleet-controller).",
    )
    nd.add_argument("action", choices=["rm"], help="rm: remove")
    nd.add_argument("name", type=_node_name, metavar="NODE")
    _add_certs(sub)
    return p


CERTS_EPILOG = """\
examples:
  tracefleet certs init --out pki                                  # pki/ca.crt, pki/ca.key
  tracefleet certs controller --ca-dir pki --out pki/controller \\
      --dns tracefleet-controller.tracefleet.svc --ip 127.0.0.1
  tracefleet certs agent --ca-dir pki --node web-1 --out pki/agent-web-1
  tracefleet certs operator --ca-dir pki --name alice --role read --out pki/alice

Every leaf directory holds ca.crt, tls.crt, tls.key (the TRACEFLEET_TLS_DIR layout and a
Kubernetes TLS Secret's keys). Agent certificates carry the node name (CN and DNS SAN,
OU=agent) and are accepted only for that node; operator certificates carry the role in OU
(admin or read). Keep ca.key offline.
"""


def _add_certs(sub: Any) -> None:
    c = sub.add_parser(
        "certs",
        help="make a private CA and the mTLS certificates (controller, agents, operators)",
        description="Make a private CA and the mTLS certificates of tracefleet (ECDSA P-256).",
        epilog=CERTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cs = c.add_subparsers(dest="certs_command", metavar="KIND", required=True)

    def leaf(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = cs.add_parser(
            name, help=help_, description=help_, epilog=CERTS_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("--ca-dir", default=".", metavar="DIR",
                       help="directory with ca.crt and ca.key (default: .)")  # fmt: skip
        p.add_argument("--out", default=None, metavar="DIR",
                       help="output directory (default: ./NAME)")  # fmt: skip
        p.add_argument("--days", type=_positive_int, default=90,
                       help="validity in days (default: 90)")  # fmt: skip
        return p

    i = cs.add_parser("init", help="create the CA (ca.crt, ca.key)")
    i.add_argument("--out", default=".", metavar="DIR", help="directory (default: .)")
    i.add_argument("--days", type=_positive_int, default=3650, help="validity (default: 3650)")
    i.add_argument("--force", action="store_true", help="replace an existing CA")
    ctl = leaf("controller", "the controller's server certificate")
    ctl.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    ctl.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    ag = leaf("agent", "an agent's client certificate for one node")
    ag.add_argument("--node", required=True, help="the node name the agent registers as")
    op = leaf("operator", "an operator's client certificate for the CLI")
    op.add_argument("--name", required=True, help="who (shown in the controller's log)")
    op.add_argument("--role", required=True, choices=("read", "admin"),
                    help="read: status, events, top; admin: also enable/disable")  # fmt: skip


def cmd_certs(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from tracefleet.controller.common import certs

    kind = args.certs_command
    try:
        if kind == "init":
            res = certs.init_ca(Path(args.out), days=args.days, force=args.force)
            print(f"CA {res.subject} in {res.directory}/ca.crt (key: ca.key, keep it "
                  f"offline), valid until {res.not_after:%Y-%m-%d}", file=out)  # fmt: skip
            return EXIT_OK
        ca = Path(args.ca_dir)
        if kind == "controller":
            res = certs.issue_controller(
                ca, Path(args.out or "controller"), args.dns, args.ip, args.days
            )
        elif kind == "agent":
            res = certs.issue_agent(ca, Path(args.out or f"agent-{args.node}"), args.node,
                                    args.days)  # fmt: skip
        else:
            res = certs.issue_operator(ca, Path(args.out or f"operator-{args.name}"), args.name,
                                       args.role, args.days)  # fmt: skip
    except certs.CertError as e:
        fail(EXIT_USAGE, str(e))
    except OSError as e:
        fail(EXIT_USAGE, f"cannot write certificates: {e}")
    print(f"{kind} certificate {res.subject} in {res.directory}/ (ca.crt, tls.crt, tls.key), "
          f"valid until {res.not_after:%Y-%m-%d}", file=out)  # fmt: skip
    return EXIT_OK


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait", action="store_true",
        help="wait until every connected matched node applied the change (progress on stderr)",
    )  # fmt: skip
    p.add_argument(
        "--wait-timeout", type=_duration, default=60.0, metavar="DURATION",
        help="give up waiting after this long, exit 5 (default: 60s)",
    )  # fmt: skip


# commands ------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.address: str = getattr(args, "controller", None) or os.environ.get(
            env.CONTROLLER, env.DEFAULT_CONTROLLER
        )
        try:
            check_address(self.address)
        except ValueError as e:
            fail(EXIT_USAGE, f"controller address: {e} (--controller or ${env.CONTROLLER})")
        try:
            self.address = _socket_for_caller(self.address)
        except ValueError as e:
            fail(EXIT_REJECTED, str(e))
        self.output: str = getattr(args, "output", "table")
        self.timeout: float = getattr(args, "timeout", 10.0)
        token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV, "")
        self.metadata: list[tuple[str, str]] = (
            [("authorization", f"Bearer {token}")] if token else []
        )
        # status of a large fleet is big: allow up to 256 MiB answers
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 256 << 20)]
        tls_dir = getattr(args, "tls_dir", None) or os.environ.get(TLS_DIR_ENV, "")
        self.tls_dir: str = tls_dir
        if tls_dir:
            creds = _operator_credentials(tls_dir)
            name = getattr(args, "tls_server_name", None) or os.environ.get(TLS_SERVER_NAME_ENV)
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            self.channel = grpc.secure_channel(self.address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.address, options=options)
        self.stub = control_pb2_grpc.ControlServiceStub(self.channel)
        # set once a Ctrl-C/SIGTERM ended a stream: the channel is then left to the exit
        self.signalled = threading.Event()

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata or None)
        except grpc.RpcError as e:
            raise rpc_error(e, self.address, self.timeout, self.tls_dir) from None

    def emit(self, data: Any, table_text: Callable[[], str]) -> None:
        text = table_text() if self.output == "table" else render.dump(data, self.output)
        if text:
            print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        print(f"tracefleet: {text}", file=self.err, flush=True)


def _socket_for_caller(address: str) -> str:
    """unix:PATH, or its read-only socket when only that one is open to this user;
    ValueError naming the groups when neither is."""
    path = unix_path(address)
    if path is None or os.access(path, os.W_OK) or not os.path.exists(path):
        return address  # not there: the call reports "cannot reach"
    read = read_socket_path(path)
    if os.access(read, os.W_OK):
        return f"unix:{read}"
    raise ValueError(
        f"permission denied on {path}: run as root, or join the controller's admin group "
        f"({env.DEFAULT_ADMIN_GROUP} by default) or, read-only, its read group "
        f"({env.DEFAULT_READ_GROUP}) on {read}"
    )


def _operator_credentials(tls_dir: str) -> grpc.ChannelCredentials:
    try:
        ca, cert, key = read_tls_files(tls_dir, "'tracefleet certs operator', or unset --tls-dir")
    except TLSFilesError as e:
        fail(EXIT_USAGE, str(e))
    return grpc.ssl_channel_credentials(ca, key, cert)


def _tls_rejection(address: str, tls_dir: str) -> str:
    """Why the controller probably rejected our TLS handshake, or "" if the port does not
    even accept connections. With TLS 1.3 the client only sees the socket close."""
    import socket

    try:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            pass
    except (OSError, ValueError):
        return ""
    why = "it rejected this client's certificate"
    try:
        import datetime as dt
        from pathlib import Path

        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(tls_dir, "tls.crt").read_bytes())
        ca = x509.load_pem_x509_certificate(Path(tls_dir, "ca.crt").read_bytes())
        if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
            why = f"{tls_dir}/tls.crt expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        else:
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:
                why = f"{tls_dir}/tls.crt is not signed by the CA in {tls_dir}/ca.crt"
    except Exception:  # unreadable files: the generic cause
        pass
    return why


def rpc_error(e: grpc.RpcError, address: str, timeout: float, tls_dir: str = "") -> CliError:
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else str(e)) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        low = details.lower()
        if tls_dir and unix_path(address) is None and "refused" not in low:
            why = _tls_rejection(address, tls_dir)
            if why:
                return CliError(
                    EXIT_REJECTED,
                    f"TLS handshake with the controller at {address} failed: {why}; issue "
                    "a new one with 'tracefleet certs operator' from the controller's CA",
                )
        if any(w in low for w in ("handshake", "ssl", "certificate", "tsi_", "alpn")):
            return CliError(
                EXIT_REJECTED,
                f"TLS handshake with the controller at {address} failed ({details[:200]}); "
                f"check that --tls-dir / ${TLS_DIR_ENV} holds a certificate of the "
                "controller's CA that has not expired, and --tls-server-name",
            )
        if "permission denied" in low:
            return CliError(
                EXIT_REJECTED,
                f"permission denied on {address}: run as root or join the controller's "
                f"group ({env.DEFAULT_ADMIN_GROUP}, or {env.DEFAULT_READ_GROUP} for read-only)",
            )
        why = "connection refused" if "refused" in low else details[:160]
        return CliError(
            EXIT_UNREACHABLE,
            f"cannot reach the controller at {address} ({why}); "
            f"start tracefleet-controller there or pass --controller unix:/PATH or HOST:PORT "
            f"(or set {env.CONTROLLER})",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(
            EXIT_UNREACHABLE,
            f"the controller at {address} did not answer within {timeout:g}s; check that it "
            f"is running and responsive, or raise --timeout",
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(EXIT_REJECTED, f"rejected by the controller: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return CliError(EXIT_REJECTED, f"permission denied: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(
            EXIT_REJECTED,
            f"not authenticated: {details} (--token / ${TOKEN_ENV}, --tls-dir / ${TLS_DIR_ENV})",
        )
    return CliError(EXIT_REJECTED, f"the controller failed the request: {code.name}: {details}")


def cmd_configure(ctx: Ctx, enabled: bool) -> int:
    a = ctx.args
    selector = ""
    filters = types_pb2.Filters()
    req = control_pb2.ConfigureEventSetRequest(event_set=a.event_set, enabled=enabled)
    if enabled:
        selector = a.selector or ""
        if a.node:
            try:
                nodes = str(sel.parse("node=" + "|".join(a.node)))
            except sel.SelectorError as e:
                fail(EXIT_USAGE, f"bad --node: {e}")
            selector = nodes if selector in ("", "all") else f"{selector},{nodes}"
        filters = filters_to_pb(Filters(
            pids=tuple(a.pid), comms=tuple(a.comm), cgroup_ids=tuple(a.cgroup_id),
            path_prefixes=tuple(a.path_prefix),
            workload=WorkloadSelector(namespace=a.namespace, pod=a.pod, container=a.container,
                                      labels=a.pod_selector),
            follow=a.follow,
        ))  # fmt: skip
        req.selector = selector
        req.filters.CopyFrom(filters)
        req.canary_percent = a.canary
        req.sample_rate = a.sample_rate
        req.export.extend(a.export)
        if a.ttl:
            ttl = duration_pb2.Duration()
            ttl.FromNanoseconds(int(a.ttl * 1e9))
            req.ttl.CopyFrom(ttl)
    resp = ctx.call(ctx.stub.ConfigureEventSet, req)
    result = render.to_data(resp)
    result["event_set"] = a.event_set
    result["enabled"] = enabled
    code = EXIT_OK
    if a.wait:
        waited, code = wait_applied(ctx, resp.generation, list(resp.matched_nodes), a)
        result["wait"] = waited

    def text() -> str:
        verb = "enabled" if enabled else "disabled"
        nodes = list(resp.matched_nodes)
        head = f"{a.event_set}: {verb} on {len(nodes)} node(s), generation {resp.generation}" + (
            "" if resp.changed else " (unchanged)"
        )
        if enabled and a.canary:
            head += f", canary {a.canary}% of {resp.selected_count} selected"
        if resp.HasField("expires_at"):
            head += f", expires {render.timestamp_text(resp.expires_at)}"
        shown = ", ".join(nodes[:20]) + (
            f", ... ({len(nodes) - 20} more)" if len(nodes) > 20 else ""
        )
        return head + (f"\n  nodes: {shown}" if nodes else "")

    ctx.emit(result, text)
    if enabled and not resp.matched_nodes:
        ctx.progress(
            "warning: no known node matches; the rule applies to matching nodes when they "
            "connect (check labels with 'tracefleet status')"
        )
    return code


def wait_applied(
    ctx: Ctx, generation: int, nodes: Sequence[str], a: argparse.Namespace
) -> tuple[dict[str, Any], int]:
    """Follow WatchAcks until every connected node of ``nodes`` applied ``generation`` (the
    controller pushes each acknowledgement; nothing is polled)."""
    req = control_pb2.WatchAcksRequest(generation=generation, nodes=nodes)
    if not nodes:  # nothing matched: nothing to wait for (empty would watch every node)
        return {"generation": generation, "applied": [], "pending": [], "not_connected": [],
                "errors": []}, EXIT_OK  # fmt: skip
    states: dict[str, Any] = {}
    last = ""
    timed_out = False
    try:
        stream = ctx.stub.WatchAcks(req, timeout=a.wait_timeout, metadata=ctx.metadata or None)
        for resp in stream:
            for n in resp.nodes:
                states[n.name] = n
            line = (
                f"generation {generation}: {resp.applied_count}/"
                f"{resp.applied_count + resp.pending_count} connected node(s) applied"
                + (
                    f", {resp.not_connected_count + resp.unknown_count} not connected"
                    if resp.not_connected_count + resp.unknown_count
                    else ""
                )
            )
            if line != last:
                ctx.progress(line)
                last = line
            if resp.pending_count == 0:
                stream.cancel()
                break
    except grpc.RpcError as e:
        if not isinstance(e, grpc.Call) or e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise rpc_error(e, ctx.address, ctx.timeout, ctx.tls_dir) from None
        timed_out = True
    by_state: dict[int, list[str]] = {}
    for name, n in states.items():
        by_state.setdefault(n.state, []).append(name)
    errors = [
        f"{name}: {s.name}: {human.escape(s.error)}"
        for name, n in sorted(states.items())
        if n.state == control_pb2.ACK_STATE_APPLIED
        for s in n.statuses
        if s.error and s.name == a.event_set
    ]
    pending = sorted(by_state.get(control_pb2.ACK_STATE_PENDING, []))
    unreachable = sorted(
        by_state.get(control_pb2.ACK_STATE_NOT_CONNECTED, [])
        + by_state.get(control_pb2.ACK_STATE_UNKNOWN, [])
    )
    summary = {
        "generation": generation,
        "applied": sorted(by_state.get(control_pb2.ACK_STATE_APPLIED, [])),
        "pending": pending,
        "not_connected": unreachable,
        "errors": errors,
    }
    if timed_out or pending:
        ctx.progress(
            f"timed out after {a.wait_timeout:g}s; still pending: {', '.join(pending[:10])}"
            + (" ..." if len(pending) > 10 else "")
            + " (see 'tracefleet status')"
        )
        return summary, EXIT_NOT_CONVERGED
    for err in errors:
        ctx.progress(f"error: {err}")
    if unreachable:
        ctx.progress(f"not connected (they apply it when they reconnect): {', '.join(unreachable)}")
    return summary, EXIT_NOT_CONVERGED if errors else EXIT_OK


STATUS_HEADERS = [
    "NODE", "STATE", "LABELS", "KERNEL", "GEN", "PENDING", "LAST SEEN", "EV/S", "FAULT/S",
    "DROP/S", "ENABLED SETS",
]  # fmt: skip


CALLS_HEADERS = [
    "NODE", "SET", "PASSED", "DELIVERED", "DROPPED", "DISCARDED", "LOST", "LOST FULL/STALE/DEL",
    "PREFIX-FILTERED", "UNDECODABLE", "PENDING", "KERNEL SKIPPED ENTRY/EXIT",
]  # fmt: skip


def _calls_row(node: str, t: control_pb2.SetTotals) -> list[object]:
    accounted = (t.delivered + t.dropped + t.discarded + t.lost + t.prefix_filtered
                 + t.decode_errors)  # fmt: skip
    return [
        node, t.event_set, t.passed, t.delivered, t.dropped, t.discarded, t.lost,
        f"{t.lost_inflight_full}/{t.lost_inflight_stale}/{t.lost_deleted}", t.prefix_filtered,
        t.decode_errors, t.passed - accounted if t.passed else "-",  # a set listed for its skips
        f"{t.kernel_missed_entry}/{t.kernel_missed_exit}",
    ]  # fmt: skip


USER_EVENT_HEADERS = ["NODE", "USER EVENT", "REGISTERED", "ENABLED", "USED BY", "DELIVERED",
                      "DROPPED", "DISCARDED"]  # fmt: skip


def user_events_text(nodes: Sequence[control_pb2.NodeStatus]) -> list[str]:
    """The user_events table of `status`: per node, what its agent found registered
    (REGISTERED: yes/no, "?" where it did not say: an older agent, or a capped list), whether
    a user:NAME rule has it attached there (ENABLED: yes, "waiting" while the rule is on
    and the event cannot be attached: see errors), the tracers using it and the totals."""
    rows: list[list[object]] = []
    notes: list[str] = []
    for n in nodes:
        ue = n.user_events if n.HasField("user_events") else None
        listed = {e.name: e for e in ue.events} if ue is not None else {}
        status = {s.name[5:]: s for s in n.statuses if s.name.startswith("user:")}
        totals = {t.event_set[5:]: t for t in n.totals if t.event_set.startswith("user:")}
        before = len(rows)
        for name in sorted({*listed, *status, *totals}):
            if ue is None or (ue.available and name not in listed and ue.total > len(listed)):
                registered = "?"
            elif not ue.available:
                registered = "no (kernel)"
            else:
                registered = "yes" if name in listed else "no"
            s = status.get(name)
            enabled = "no" if s is None else "yes" if s.enabled else "waiting" if s.error else "no"
            e = listed.get(name)
            t = totals.get(name) or control_pb2.SetTotals()
            rows.append([n.name, f"user:{name}", registered, enabled,
                         ",".join(e.used_by) if e is not None and e.used_by else "-",
                         t.delivered, t.dropped, t.discarded])  # fmt: skip
        if ue is not None and ue.total > len(ue.events):
            notes.append(f"  {n.name}: {len(ue.events)} of {ue.total} registered user_events "
                         "listed (the report is capped; attached ones first)")  # fmt: skip
        # a kernel without user_events is said only where a user set is in use
        if ue is not None and ue.reason and (ue.available or len(rows) > before):
            notes.append(f"  {n.name}: {human.escape(ue.reason)}")  # the agent's text
    if not rows and not notes:
        return []
    out = ["", "user_events (REGISTERED: now, as the node's agent reads tracefs; the kernel "
           "does not say how many processes registered one):"]  # fmt: skip
    if rows:
        out.append(render.table(USER_EVENT_HEADERS, rows))
    return out + notes


def cmd_status(ctx: Ctx) -> int:
    st = ctx.call(ctx.stub.GetStatus, control_pb2.GetStatusRequest(selector=ctx.args.selector))
    now = time.time()

    def text() -> str:
        rows = []
        for n in st.nodes:
            enabled = [s for s in n.statuses if s.enabled]
            sets = ",".join(
                f"{s.name}({s.strategy or '?'}{'' if not s.error else ' ERR'})" for s in enabled
            )
            rows.append(
                [
                    n.name,
                    render.to_data(n)["state"],
                    ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
                    n.kernel_version or "-",
                    f"{n.applied_generation}/{n.desired_generation}",
                    "yes" if n.pending else "no",
                    render.ago(n.last_seen, now),
                    render.rate(n.events_per_second),
                    render.rate(n.faults_per_second),
                    render.rate(n.drops_per_second),
                    sets or "-",
                ]
            )
        out = [
            f"generation {st.generation}, {len(st.nodes)} node(s), known event sets: "
            f"{', '.join(st.known_event_sets)}",
            "",
            render.table(STATUS_HEADERS, rows),
        ]
        if st.changes_refused:  # the controller's own text (no agent's)
            out[1:1] = [f"changes refused: {st.changes_refused}; agents keep their last state"]
        errors = [
            f"  {n.name}: {s.name}: {human.escape(s.error)}"  # the agent's text
            for n in st.nodes
            for s in n.statuses
            if s.error
        ]
        if errors:
            out += ["", "errors:", *errors]
        short = [
            f"  {n.name}: {n.batches_discarded} batch(es), "
            f"{sum(t.discarded for t in n.totals)} event(s)"
            for n in st.nodes
            if n.batches_discarded or any(t.discarded for t in n.totals)
        ]
        if short:
            out += ["", "discarded by agents (outbox over its memory budget, never delivered):",
                    *short]  # fmt: skip
        out += user_events_text(st.nodes)
        # syscall sets: where every call that passed the filters went
        calls = [_calls_row(n.name, t) for n in st.nodes for t in n.totals
                 if t.passed or t.kernel_missed_entry or t.kernel_missed_exit]  # fmt: skip
        if calls:
            out += ["", "calls that passed the filters (totals; PENDING: in flight or not "
                    "reported yet, 0 once quiet; KERNEL SKIPPED: runs of the set's programs the "
                    "kernel skipped, another BPF program was running on that CPU: a skipped "
                    "entry's call is not in PASSED, a skipped exit's ends in LOST):",
                    render.table(CALLS_HEADERS, calls)]  # fmt: skip
        if st.rules:
            rule_rows = []
            for r in st.rules:
                state = "expired" if r.expired else ("on" if r.enabled else "off")
                flt = render.to_data(r.filters)
                flt_text = " ".join(f"{k}={','.join(map(str, v))}" for k, v in flt.items() if v)
                rule_rows.append(
                    [
                        r.event_set,
                        state,
                        r.selector if r.enabled else "-",
                        f"{r.canary_percent}%" if r.canary_percent not in (0, 100) else "-",
                        render.timestamp_text(r.expires_at) if r.HasField("expires_at") else "-",
                        flt_text or "-",
                        len(r.matched_nodes),
                        r.generation,
                    ]
                )
            out += [
                "",
                render.table(
                    ["SET", "RULE", "SELECTOR", "CANARY", "EXPIRES", "FILTERS", "NODES", "GEN"],
                    rule_rows,
                ),
            ]
        return "\n".join(out)

    ctx.emit(render.to_data(st), text)
    return EXIT_OK


def cmd_events(ctx: Ctx) -> int:
    a = ctx.args
    count = a.count if (a.count or a.follow) else 50
    duration = a.duration if (a.duration or a.follow) else 5.0
    req = control_pb2.StreamEventsRequest(
        nodes=a.node, event_sets=a.event_set, pids=a.pid, sample_rate=a.sample_rate
    )
    try:
        stream = ctx.stub.StreamEvents(req, timeout=duration or None, metadata=ctx.metadata or None)
    except grpc.RpcError as e:
        raise rpc_error(e, ctx.address, ctx.timeout, ctx.tls_dir) from None
    node_width = max([12, *(len(n) for n in a.node)])
    interrupted = _SignalCancel(stream, ctx.err, ctx.signalled)
    # NAMESPACE/POD/CONTAINER columns when the agents attribute events: decided on the first
    # event (the header waits for it)
    workload: bool | None = None
    seen = 0
    try:
        for resp in stream:
            if resp.missed:
                ctx.progress(f"missed {resp.missed} event(s): reading too slowly")
            event = wire.event_from_pb(resp.event)
            if ctx.output == "table" and workload is None:
                workload = bool(event.attribution)
                print(human.header(node_width, workload, a.wide), file=ctx.out, flush=True)
            if ctx.output == "table":  # strace-like, control characters escaped
                print(human.line(event, node_width, bool(workload), a.wide), file=ctx.out,
                      flush=True)  # fmt: skip
            elif ctx.output == "json":  # the agent's jsonl shape, exact (not escaped)
                print(json.dumps(event.to_json()), file=ctx.out, flush=True)
            else:
                print("---\n" + render.dump(event.to_json(), "yaml"), file=ctx.out, flush=True)
            seen += 1
            if count and seen >= count:
                stream.cancel()
                break
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise rpc_error(e, ctx.address, ctx.timeout, ctx.tls_dir) from None
    finally:
        interrupted.restore()
    if ctx.output == "table" and workload is None:
        print(human.header(node_width, exe=a.wide), file=ctx.out, flush=True)
    if seen == 0:
        ctx.progress(
            "no events: is the event set enabled on the matching nodes? "
            "(tracefleet status; tracefleet enable SET)"
        )
    return EXIT_OK


class _SignalCancel:
    """Ctrl-C or SIGTERM ends a stream by cancelling it from another thread, and the process
    ends within GRACE_S of the signal whatever grpc does: a KeyboardInterrupt raised inside
    grpc's iterator can leave the channel unable to close (grpc/grpc#19973), and CI saw the
    CLI still running 30 s after a SIGTERM that had cancelled the stream. The thread exists
    before any signal: a handler that starts a thread can deadlock on threading's own locks."""

    GRACE_S = 5.0

    def __init__(self, stream: Any, err: TextIO, fired: threading.Event):
        self.fired = fired
        self._stream = stream
        self._err = err
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
            threading.Thread(target=self._watch, name="tf-cancel", daemon=True).start()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.fired.is_set():  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.fired.set()

    def _watch(self) -> None:
        self.fired.wait()
        self._stream.cancel()
        time.sleep(self.GRACE_S)  # the process normally ends long before this
        try:
            print(f"tracefleet: the stream did not close within {self.GRACE_S:g} s of the "
                  "signal; exiting without closing it", file=self._err, flush=True)  # fmt: skip
            sys.stdout.flush()
        finally:
            os._exit(130)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def cmd_top(ctx: Ctx) -> int:
    a = ctx.args
    resp = ctx.call(
        ctx.stub.GetTop,
        control_pb2.GetTopRequest(node=a.node, event_set=a.event_set, limit=a.limit),
    )

    def text() -> str:
        window = resp.window.ToTimedelta().total_seconds()
        sets = render.table(
            ["SET", "NODES", "EV/S", "DROP/S", "FAULT/S", "DELIVERY P50", "DELIVERY P99"],
            [
                [
                    s.event_set,
                    s.nodes,
                    render.rate(s.events_per_second),
                    render.rate(s.drops_per_second),
                    render.rate(s.faults_per_second),
                    render.seconds_text(s.latency_p50_seconds),
                    render.seconds_text(s.latency_p99_seconds),
                ]
                for s in resp.sets
            ],
        )
        rows = render.table(
            ["NODE", "SET", "SYSCALL", "EV/S"],
            [[r.node, r.event_set, r.syscall, render.rate(r.events_per_second)] for r in resp.rows],
        )
        if not resp.sets:
            return f"no events in the last {window:g}s (is an event set enabled?)"
        return f"last {window:g}s, fleet-wide:\n{sets}\n\n{rows}"

    ctx.emit(render.to_data(resp), text)
    return EXIT_OK


def cmd_node(ctx: Ctx) -> int:
    resp = ctx.call(ctx.stub.RemoveNode, control_pb2.RemoveNodeRequest(name=ctx.args.name))
    ctx.emit(render.to_data(resp), lambda: f"node {resp.name} removed")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Ctx], int]] = {
    "node": cmd_node,
    "enable": lambda c: cmd_configure(c, True),
    "disable": lambda c: cmd_configure(c, False),
    "status": cmd_status,
    "events": cmd_events,
    "top": cmd_top,
}


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    if args.command == "certs":
        try:
            return cmd_certs(args, out)
        except CliError as e:
            print(f"tracefleet: {e}", file=err)
            return e.code
    try:
        ctx = Ctx(args, out, err)
    except CliError as e:
        print(f"tracefleet: {e}", file=err)
        return e.code
    interrupted = False
    try:
        return COMMANDS[args.command](ctx)
    except CliError as e:
        print(f"tracefleet: {e}", file=err)
        return e.code
    except KeyboardInterrupt:
        interrupted = True
        return 130
    except BrokenPipeError:
        return EXIT_OK
    finally:
        # not after an interrupt or a signal inside a call: channel.close() can then wait
        # forever (grpc/grpc#19973); the process ends here anyway
        if not interrupted and not ctx.signalled.is_set():
            ctx.channel.close()


if __name__ == "__main__":
    sys.exit(main())
