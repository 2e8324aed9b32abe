"""tracefleet-agent: probe the kernel, capture locally, or run under a controller."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, TextIO

from tracefleet.agent._internal import env
from tracefleet.agent._internal.abi import Strategy
from tracefleet.agent.engine import EventSetConfig, Filters
from tracefleet.agent.eventsets import EVENT_SETS, UnknownEventSet, parse_event_sets
from tracefleet.agent.hostcheck import TRACEFS_NOTE, HostCheckError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_HOST = 0, 1, 2, 3
STRATEGY_CHOICES = (
    "auto",
    "sleepable",
    "fentry-sleepable",
    "exit-retry",
    "user-fallback",
    "nofault",
    "fentry",  # vfs hooks
    "tracepoint",
)

EPILOG = """\
examples:
  tracefleet-agent probe                       # what this kernel allows, as JSON
  tracefleet-agent capture --event-set file    # live file events until Ctrl-C
  tracefleet-agent capture -e file,exec,net --duration 10 --output table
  tracefleet-agent capture -e file --pid 1234 --path-prefix /etc
  tracefleet-agent capture -e file --strategy exit-retry   # force one rung of the ladder
  tracefleet-agent capture -e vfs --path-prefix /var/lib/postgresql   # any file system
  tracefleet-agent run --controller 10.0.0.5:7070 --node $(hostname) --labels role=db

event sets:
{sets}

capture strategies (best first; `auto` takes the best the kernel accepts):
  sleepable         sleepable program on the syscall tracepoint, bpf_copy_from_user (Linux 7.2+)
  fentry-sleepable  fentry.s on the syscall function (kernels that allow BPF trampolines)
  exit-retry        nofault read at entry, read again at exit once the kernel faulted it in
  user-fallback     nofault read, then process_vm_readv from the agent (racy, marked so)
  nofault           nofault read only: fails on pages not resident (what bpftrace does)

exit codes: 0 ok, 1 runtime error, 2 bad usage, 3 host cannot run BPF capture (cause printed)
"""


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


INFLIGHT_RANGE = (64, 1 << 20)


def _inflight_entries(text: str) -> int:
    """Per-thread in-flight slots per event set (argparse type)."""
    lo, hi = INFLIGHT_RANGE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{value} is outside {lo}..{hi}: pick at least the number of threads that may "
            "block in a traced syscall at once (each slot holds about 1-3 KiB of kernel memory)"
        )
    return value


def check_address(text: str, *, listen: bool = False) -> str:
    """host:port (or [v6]:port; port 0 only to listen on); ValueError naming the fix."""
    host, sep, port = text.strip().rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: use host:port, e.g. 127.0.0.1:7070")
    return text.strip()


def _address_or_off(text: str) -> str:
    if text.strip() in ("", "off"):
        return text.strip()
    try:
        return check_address(text, listen=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _epilog() -> str:
    sets = "\n".join(f"  {s.name:<6} {s.summary}" for s in EVENT_SETS.values())
    return EPILOG.format(sets=sets)


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        pids=tuple(args.pid or ()),
        comms=tuple(args.comm or ()),
        cgroup_ids=tuple(args.cgroup_id or ()),
        path_prefixes=(args.path_prefix,) if args.path_prefix else (),
    )


def _make_engine(args: argparse.Namespace, names: list[str]) -> Any:
    from tracefleet.agent.capture import BpfEngine, EngineOptions
    from tracefleet.agent.ladder import KERNEL_STRATEGIES

    forced = {}
    if getattr(args, "strategy", "auto") != "auto":
        # a rung applies to the sets whose ladder has it (vfs: hooks; others: capture)
        strat = Strategy.from_label(args.strategy)
        forced = {n: strat for n in names
                  if strat in (EVENT_SETS[n].ladder or KERNEL_STRATEGIES)}  # fmt: skip
    engine = BpfEngine(
        EngineOptions(
            strategies=forced,
            user_fallback=not getattr(args, "no_user_fallback", False),
            hold_seconds=getattr(args, "hold_seconds", 30.0),
            inflight_entries=getattr(args, "inflight_entries", 4096),
            mount_tracefs=True,
        )
    )
    if engine.host.tracefs_mounted_by_agent:
        note = TRACEFS_NOTE.format(path=engine.host.tracefs)
        print(f"tracefleet-agent: degraded: {note}", file=sys.stderr)
    return engine


def cmd_probe(args: argparse.Namespace) -> int:
    engine = _make_engine(args, list(EVENT_SETS))
    try:
        report = dict(engine.capabilities())
    finally:
        engine.close()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK if all(s["strategy"] for s in report["event_sets"].values()) else EXIT_ERROR


def _fmt_arg(a: dict[str, Any]) -> str:
    v = a["value"]
    if isinstance(v, dict):
        v = ",".join(f"{k}={x}" for k, x in v.items())
    elif isinstance(v, list):
        v = " ".join(v)
    mark = "" if a["status"] == "ok" else f"[{a['status']}:{a['strategy']}]"
    return f"{v}{mark}" if v is not None else f"<{a['status']}:{a.get('error', '')}>"


def _table_row(ev: dict[str, Any]) -> str:
    captured = [
        f"{k}={_fmt_arg(a)}" for k, a in ev["args"].items() if a.get("strategy") != "register"
    ]
    return (
        f"{ev['pid']:>7} {ev['comm']:<16} {ev['event_set']:<5} {ev['syscall']:<11} "
        f"{ev['ret']:>5}  {' '.join(captured)}"
    )


def _serve_metrics(args: argparse.Namespace, engine: Any, node: str, client: Any = None) -> Any:
    """Start /metrics if --metrics-listen is set (not "" or "off"); None otherwise."""
    address = (args.metrics_listen or "").strip()
    if not address or address == "off":
        return None
    from tracefleet.agent._internal import metrics

    server = metrics.serve(engine, node, address, client)
    print(f"tracefleet-agent: metrics on http://{address}/metrics", file=sys.stderr)
    return server


def cmd_capture(args: argparse.Namespace) -> int:
    specs = parse_event_sets(args.event_set)
    names = [s.name for s in specs]
    engine = _make_engine(args, names)
    try:
        metrics_server = _serve_metrics(args, engine, os.uname().nodename)
    except Exception as e:
        engine.close()
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_ERROR
    out: TextIO = sys.stdout
    stop = threading.Event()
    lock = threading.Lock()

    def sink(ev: dict[str, Any]) -> None:
        with lock:
            if args.output == "jsonl":
                out.write(json.dumps(ev, separators=(",", ":")) + "\n")
            else:
                out.write(_table_row(ev) + "\n")

    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        engine.add_sink(sink)
        statuses = engine.apply({n: EventSetConfig(n, True, _filters(args)) for n in names})
        failed = False
        for st in statuses:
            if st.name in names:
                if st.error or not st.enabled:
                    print(f"tracefleet-agent: {st.name}: {st.error}", file=sys.stderr)
                    failed = True
                else:
                    print(f"tracefleet-agent: capturing {st.name} with {st.strategy}",
                          file=sys.stderr)  # fmt: skip
        if failed and not any(s.enabled for s in statuses):
            return EXIT_ERROR
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(str(os.getpid()))
        if args.output == "table":
            out.write(f"{'PID':>7} {'COMM':<16} {'SET':<5} {'SYSCALL':<11} {'RET':>5}  ARGS\n")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set():
            engine.poll_once()
            out.flush()
            if deadline and time.monotonic() >= deadline:
                break
        engine.drain()
        out.flush()
        _summary(engine, names)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        engine.close()
    return EXIT_OK


def _summary(engine: Any, names: list[str]) -> None:
    agg = engine.collect()
    print("tracefleet-agent: summary", file=sys.stderr)
    for n in names:
        sa = agg.sets.get(n)
        k = engine.kernel_counters(n)
        outcomes = {f"{s}/{o}": c for (s, o), c in (sa.outcomes.items() if sa else [])}
        # passed = written + dropped + lost + prefix-filtered + in flight (syscall sets)
        acc = engine.accounting(n) if n != "vfs" else None
        ident = (
            f" passed={acc['passed']} lost={acc['lost']} in_flight={acc['in_flight']}"
            f" unaccounted={acc['unaccounted']}"
            if acc
            else ""
        )
        print(
            f"  {n}: events={sa.delivered if sa else 0} dropped={k['dropped']} "
            f"filtered={k['filtered']}{ident} args={json.dumps(outcomes)}",
            file=sys.stderr,
        )


def _tls_options(args: argparse.Namespace) -> Any:
    """ClientOptions with mTLS from --tls-dir; None (after printing why) if refused."""
    import ipaddress

    from tracefleet.agent._internal.tls import AgentTLS, AgentTLSError
    from tracefleet.agent.controlclient import ClientOptions

    if not args.tls_dir:
        host = args.controller.rpartition(":")[0].strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not args.insecure:
            print(f"tracefleet-agent: refusing to talk to {args.controller} without TLS: pass "
                  f"--tls-dir DIR (or set {env.TLS_DIR}), or --insecure on a trusted network",
                  file=sys.stderr)  # fmt: skip
            return None
        print(f"tracefleet-agent: WARNING: connecting to {args.controller} WITHOUT TLS "
              "(captured arguments travel in clear text)", file=sys.stderr)  # fmt: skip
        return ClientOptions()
    try:
        return ClientOptions(tls=AgentTLS(args.tls_dir, args.tls_server_name))
    except AgentTLSError as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return None


def _client_options(args: argparse.Namespace) -> Any:
    """ClientOptions with mTLS and the ServiceAccount token; None (after printing why) if
    refused."""
    from tracefleet.agent._internal.satoken import AgentTokenError, read_token

    options = _tls_options(args)
    if options is None or not args.token_file:
        return options
    try:
        read_token(args.token_file)  # fail early; re-read for every connection
    except AgentTokenError as e:
        print(f"tracefleet-agent: {e} (--token-file / {env.TOKEN_FILE})", file=sys.stderr)
        return None
    options.token_file = args.token_file
    return options


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from tracefleet.agent.controlclient import ControlClient

    if not args.controller:
        print(f"tracefleet-agent: no controller: pass --controller or set {env.CONTROLLER}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        check_address(args.controller)
    except ValueError as e:
        print(f"tracefleet-agent: controller: {e} (--controller or ${env.CONTROLLER})",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    labels = {}
    for item in filter(None, (args.labels or "").split(",")):
        if "=" not in item or not item.split("=", 1)[0].strip():
            print(f"tracefleet-agent: bad label {item!r}: use key=value[,key=value]",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        k, v = item.split("=", 1)
        labels[k.strip()] = v.strip()
    options = _client_options(args)
    if options is None:
        return EXIT_USAGE
    engine = _make_engine(args, list(EVENT_SETS))
    # run_agent() without its wrapper: the metrics endpoint reads the client's state
    client = ControlClient(engine, args.controller, args.node, labels, options)
    try:
        metrics_server = _serve_metrics(args, engine, args.node, client)
    except Exception as e:
        engine.close()
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_ERROR

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await client.run(stop)

    engine.start()
    try:
        asyncio.run(main())
    finally:
        if metrics_server is not None:
            metrics_server.close()
        engine.close()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tracefleet-agent",
        description="tracefleet's per-host agent: captures syscall arguments from user memory "
        "with BPF, even from pages that are not resident.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log libbpf and agent details")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sp = sub.add_parser("probe", help="report kernel features and the strategy per event set")
    sp.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto")
    sp.set_defaults(func=cmd_probe)

    sc = sub.add_parser(
        "capture",
        help="capture events locally (no controller)",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sc.add_argument("-e", "--event-set", required=True,
                    help="comma-separated: " + ",".join(EVENT_SETS))  # fmt: skip
    sc.add_argument(
        "-d", "--duration", type=_seconds, default=0, help="seconds (default: until ^C)"
    )
    sc.add_argument("-o", "--output", choices=("jsonl", "table"), default="jsonl")
    sc.add_argument("--pid", type=int, action="append", help="only this process (repeatable)")
    sc.add_argument("--comm", action="append", help="only this command name (repeatable)")
    sc.add_argument("--cgroup-id", type=int, action="append", help="only this cgroup id")
    sc.add_argument("--path-prefix", help="only paths starting with this (file, exec)")
    sc.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                    help="force one rung instead of the best available "
                         "(vfs: fentry or tracepoint)")  # fmt: skip
    sc.add_argument("--no-user-fallback", action="store_true",
                    help="never read traced processes' memory from user space")  # fmt: skip
    sc.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                    type=_address_or_off,
                    help="serve Prometheus metrics while capturing (default: off)")  # fmt: skip
    sc.add_argument("--inflight-entries", type=_inflight_entries, default=4096, metavar="N",
                    help="calls in flight tracked per event set; beyond N they are counted "
                    "lost, never hidden (default: %(default)s)")  # fmt: skip
    sc.add_argument("--ready-file", help=argparse.SUPPRESS)
    sc.set_defaults(func=cmd_capture)

    sr = sub.add_parser("run", help="run under a controller (the DaemonSet mode)")
    sr.add_argument("--controller", default=os.environ.get(env.CONTROLLER),
                    help=f"host:port of the controller (env {env.CONTROLLER})")  # fmt: skip
    sr.add_argument("--node", default=os.environ.get(env.NODE_NAME) or os.uname().nodename,
                    help=f"node name (env {env.NODE_NAME}; default: hostname)")  # fmt: skip
    sr.add_argument("--labels", default=os.environ.get(env.NODE_LABELS, ""),
                    help=f"k=v,k=v labels (env {env.NODE_LABELS})")  # fmt: skip
    sr.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto")
    sr.add_argument("--metrics-listen", metavar="HOST:PORT", type=_address_or_off,
                    default=os.environ.get(env.METRICS_LISTEN, "0.0.0.0:9091"),
                    help=f"serve Prometheus metrics here; 'off' for none "
                    f"(env {env.METRICS_LISTEN}; default: %(default)s)")  # fmt: skip
    sr.add_argument("--hold-seconds", type=_seconds, default=30.0,
                    help="detach an event set after it stays disabled this long")  # fmt: skip
    sr.add_argument("--inflight-entries", type=_inflight_entries, default=4096, metavar="N",
                    help="calls in flight tracked per event set; beyond N they are counted "
                    "lost, never hidden (default: %(default)s)")  # fmt: skip
    sr.add_argument("--tls-dir", default=os.environ.get(env.TLS_DIR, ""), metavar="DIR",
                    help=f"mTLS to the controller with DIR/ca.crt, tls.crt, tls.key, re-read "
                    f"on every reconnect (env {env.TLS_DIR})")  # fmt: skip
    sr.add_argument("--tls-server-name", default="", metavar="NAME",
                    help="expect this name in the controller's certificate (default: the host "
                    "of --controller)")  # fmt: skip
    sr.add_argument("--token-file", default=os.environ.get(env.TOKEN_FILE, ""), metavar="FILE",
                    help="Kubernetes: projected ServiceAccount token sent to the controller "
                    "(re-read on every reconnect) so that it can tell this agent's node "
                    f"(env {env.TOKEN_FILE})")  # fmt: skip
    sr.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback controller without TLS")  # fmt: skip
    sr.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("tracefleet.agent.libbpf").setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except UnknownEventSet as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    except HostCheckError as e:
        print(f"tracefleet-agent: {e.cause}.\n  fix: {e.fix}\n  degradation: {e.degradation}",
              file=sys.stderr)  # fmt: skip
        return EXIT_HOST
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
