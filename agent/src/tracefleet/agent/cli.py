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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from tracefleet.agent import env
from tracefleet.agent.capture import workload
from tracefleet.agent.capture.engine import EventSetConfig, Filters
from tracefleet.agent.capture.eventsets import EVENT_SETS, UnknownEventSet, parse_event_sets
from tracefleet.agent.kernel.abi import Strategy
from tracefleet.agent.kernel.hostcheck import TRACEFS_NOTE, HostCheckError
from tracefleet.model import Event, human
from tracefleet.model.argtypes import int_in
from tracefleet.model.filters import PID_MAX_LIMIT
from tracefleet.model.labels import parse_labels
from tracefleet.model.names import STRATEGIES
from tracefleet.model.netaddr import check_peer_address, is_loopback, split_host_port, unix_path

if TYPE_CHECKING:  # imported where used: the CLI starts without loading libbpf
    from tracefleet.agent.capture.bpfengine import BpfEngine
    from tracefleet.agent.capture.engine import CaptureEngine
    from tracefleet.agent.capture.jsonfmt import JsonFormatter

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_HOST = 0, 1, 2, 3
STRATEGY_CHOICES = ("auto", *STRATEGIES)  # the last two are the vfs hooks

EPILOG = """\
examples:
  tracefleet-agent probe                       # what this kernel allows, and why not
  tracefleet-agent probe -o json --load        # as JSON, after loading every set for real
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

# the cost figure: tests/bench loop pinned on one CPU, openat with `file` capture, CPU ns per
# call, stats off vs on in 16-20 alternating rounds on a shared 2-vCPU VM: -20 to +70 ns on
# medians of 1800-3300 ns, i.e. within the noise there
BPF_STATS_HELP = (
    "with --metrics-listen: also turn on the kernel's BPF run-time statistics (per-program "
    "run time and run count in /metrics; default: off). Host-wide: while on, every BPF "
    "program on the host, not only tracefleet's, reads the clock before and after each run "
    "(measured: at most ~70 ns, 4%%, per traced openat)"
)


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def _comm(text: str) -> str:
    problem = Filters(comms=(text,)).problem()  # the one filter check (tracefleet.model)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _node_name(text: str) -> str:
    if not 1 <= len(text) <= 253 or not text.isprintable() or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"bad node name {text[:60]!r}: use 1..253 printable characters, e.g. the "
            f"hostname (env {env.NODE_NAME})"
        )
    return text


DEFAULT_STATE_FILE = "/var/lib/tracefleet/agent-state.json"

# the controller's default unix socket (agents run as root, which may use it)
DEFAULT_CONTROLLER = "unix:/run/tracefleet/controller.sock"


INFLIGHT_RANGE = (64, 1 << 20)


INFLIGHT_HELP = (
    "calls in flight tracked by the exec and vfs event sets; beyond N they are counted lost, "
    "never hidden (file and net keep one slot per thread, bounded by no N; default: "
    "%(default)s)"
)

# per-thread in-flight slots of the exec and vfs sets
_inflight_entries = int_in(
    "--inflight-entries",
    *INFLIGHT_RANGE,
    hint="pick at least the number of threads that may block in a traced syscall at once "
    "(each slot holds about 1-3 KiB of kernel memory)",
)


def _ring_mib(text: str) -> int:
    """argparse type for --ring-mib: the kernel sizes a BPF ring buffer in powers of two."""
    v = int_in("--ring-mib", 1, 1024, hint="a power of two: 8 is the default")(text)
    if v & (v - 1):
        raise argparse.ArgumentTypeError(
            f"--ring-mib must be a power of two (1, 2, 4, ... 1024), not {v}: the kernel "
            "sizes BPF ring buffers in powers of two"
        )
    return v


RING_MIB_HELP = (
    "ring buffer per loaded event set, MiB (power of two; default: %(default)s): larger "
    "absorbs longer bursts, at that much locked kernel memory per set"
)


def check_address(text: str, *, listen: bool = False) -> str:
    """host:port (or [v6]:port; port 0 only to listen on), or unix:/PATH for a controller;
    ValueError naming the fix."""
    return check_peer_address(text, listen=listen)


def controller_addresses(values: Sequence[str]) -> list[str]:
    """--controller values (repeated and/or comma-separated: the replicas) -> the addresses in
    order, each checked, duplicates dropped; ValueError naming the bad address."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                raise ValueError(
                    f"empty address in {value!r}: separate the replicas' addresses with "
                    "single commas, e.g. 10.0.0.5:7070,10.0.0.6:7070"
                )
            try:
                address = check_address(part)
            except ValueError as e:
                raise ValueError(f"address {part.strip()!r}: {e}") from None
            if address not in out:
                out.append(address)
    return out


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
        workload=workload.selector_from_args(args),
        follow=args.follow,
    )


def _make_engine(args: argparse.Namespace, names: list[str]) -> BpfEngine:
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.ladder import KERNEL_STRATEGIES

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
            ring_bytes=getattr(args, "ring_mib", 8) << 20,
            mount_tracefs=True,
            attributor=getattr(args, "attributor", None),
            namespace_budget=max(0, getattr(args, "metrics_namespaces", 0)),
        )
    )
    if engine.host.tracefs_mounted_by_agent:
        note = TRACEFS_NOTE.format(path=engine.host.tracefs)
        print(f"tracefleet-agent: degraded: {note}", file=sys.stderr)
    return engine


def cmd_probe(args: argparse.Namespace) -> int:
    from tracefleet.agent.capture import userevents

    engine = _make_engine(args, list(EVENT_SETS))
    try:
        report = dict(engine.capabilities(load=args.load))
    finally:
        engine.close()
    ok, why = userevents.available()
    report["user_events"] = {
        "available": ok,
        "reason": why,
        "events": {n: e.to_json() for n, e in userevents.list_events().items()},
    }
    output = args.output or ("table" if sys.stdout.isatty() else "json")
    if output == "json":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(probe_table(report))
    return EXIT_OK if all(s["strategy"] for s in report["event_sets"].values()) else EXIT_ERROR


def probe_table(report: dict[str, Any]) -> str:
    """The probe report for a person: per set the rung chosen and each better rung refused
    with the kernel's or verifier's words, then the host's features."""
    f = report["features"]
    lines = [f"Linux {report['kernel']} {report['arch']}, libbpf {report['libbpf']}, "
             f"BPF objects in {report['bpf_dir']}", "",
             f"{'SET':<5} {'RUNG':<28} STATUS"]  # fmt: skip
    for name, s in report["event_sets"].items():
        rung = s["strategy"] or "-"
        if s["strategy"] and s["user_fallback"]:
            rung += " + user-fallback"
        if s["error"] and not s["strategy"]:
            status = "UNAVAILABLE: no rung loads here"
        elif s["loaded"]:
            status = "loaded (verified) and attach-tested"
        else:
            status = "planned from the feature probes (loads when first enabled)"
        if s["forced"]:
            status += f"; forced with --strategy {s['forced']}"
        lines.append(f"{name:<5} {rung:<28} {status}")
        for a in s["attempts"]:
            if not a["ok"]:
                lines.append(f"{'':<5}   {a['strategy']:<26} refused: {a['reason']}")
    lines += ["", "feature probes (one tiny program each, loaded and attached to one hook):"]
    for feat, p in f.get("probes", {}).items():
        mark = "yes" if p["ok"] else "NO "
        lines.append(f"  {feat:<21} {mark} {p['ms']:>6.0f} ms  {p['reason']}")
    if not f.get("probes"):
        lines.append("  none: the probe object is missing (run `make bpf`); every rung is "
                     "tried for real")  # fmt: skip
    lines += [
        "",
        "host:",
        f"  BTF {'yes' if f['btf'] else 'NO'}; tracefs {f['tracefs'] or 'NOT MOUNTED'}"
        + (" (mounted privately by the agent)" if f["tracefs_mounted_by_agent"] else "")
        + f"; lockdown {f['lockdown']}",
        f"  kfunc bpf_copy_from_user_str: {'yes' if f['kfunc_bpf_copy_from_user_str'] else 'no'}",
        f"  user-space fallback: {f['user_fallback']}",
        "  ring consumer: "
        + (
            "compiled"
            if f.get("compiled_consumer", {}).get("ok")
            else "Python (one call per record)"
        )
        + f" ({f.get('compiled_consumer', {}).get('reason', '?')})",
        "  event decode: "
        + ("compiled" if f.get("compiled_decode", {}).get("ok") else "Python (per record)")
        + f" ({f.get('compiled_decode', {}).get('reason', '?')})",
        f"  capabilities: {' '.join(f['capabilities']) or 'none'}",
    ]
    ue = report.get("user_events")
    if ue:
        names = ", ".join(sorted(ue["events"])) or "none registered"
        lines.append(
            f"  user_events: {names}" if ue["available"] else f"  user_events: no ({ue['reason']})"
        )
    lines.append("")
    return "\n".join(lines)


def _serve_metrics(
    args: argparse.Namespace,
    engine: CaptureEngine,
    node: str,
    client: Any = None,
    hub: Any = None,
) -> Any:
    """Start /metrics if --metrics-listen is set (not "" or "off"); None otherwise."""
    address = (args.metrics_listen or "").strip()
    if not address or address == "off":
        if args.bpf_stats:
            print("tracefleet-agent: --bpf-stats ignored: only /metrics reads the statistics "
                  "(add --metrics-listen HOST:PORT)", file=sys.stderr)  # fmt: skip
        return None
    from tracefleet.agent import metrics

    server = metrics.serve(engine, node, address, client, bpf_stats=args.bpf_stats, hub=hub)
    print(f"tracefleet-agent: metrics on http://{address}/metrics", file=sys.stderr)
    return server


def _capture_user(args: argparse.Namespace) -> int:
    """`-e user:NAME`: consume one user_event through perf rings (no BPF)."""
    from tracefleet.agent.capture import userevents

    name = args.event_set.removeprefix("user:")
    try:
        consumer = userevents.UserEventConsumer(name)
        consumer.open()
    except userevents.UserEventsError as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, userevents.BadEventName) else EXIT_HOST
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pids, comms = set(args.pid or ()), set(args.comm or ())
    print(f"tracefleet-agent: capturing user:{name} with perf", file=sys.stderr)
    try:
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(str(os.getpid()))
        if args.output != "jsonl":
            sys.stdout.write(human.header(exe=args.output == "wide") + "\n")
        deadline = time.monotonic() + args.duration if args.duration else None
        broken = False
        while not broken:
            done = stop.is_set() or bool(deadline and time.monotonic() >= deadline)
            # one last read after the stop: what is still in the rings is printed too
            for ev in consumer.poll(0 if done else 0.2):
                if (pids and ev.pid not in pids) or (comms and ev.comm not in comms):
                    continue
                line = (json.dumps(ev.to_json(), separators=(",", ":"))
                        if args.output == "jsonl"
                        else human.line(ev, exe=args.output == "wide"))  # fmt: skip
                try:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:
                    broken = True
                    break
            if done:
                break
    finally:
        consumer.close()
    c = consumer.counters
    print(f"tracefleet-agent: summary\n  user:{name}: events={c.events} dropped={c.dropped} "
          f"malformed={c.malformed}", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _add_export_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--export-file", metavar="PATH", default="",
                    help="export every event of the captured sets to PATH as JSON lines "
                    "(the -o jsonl schema, plus node), with accounting records; rotated by "
                    "size")  # fmt: skip
    sp.add_argument(
        "--export-file-max-bytes",
        metavar="SIZE",
        default="64M",
        help="rotate the export file at this size (e.g. 64M; default %(default)s)",
    )
    sp.add_argument(
        "--export-file-keep",
        metavar="N",
        type=int_in("--export-file-keep", 0, 1000),
        default=5,
        help="rotated export files kept, PATH.1..PATH.N; older are "
        "deleted and their events counted as rotated_out (default %(default)s)",
    )


def _export_hub(args: argparse.Namespace, engine: Any, node: str) -> Any:
    """The export sink for --export-file, started; None without one. ExportConfigError."""
    from tracefleet.agent import export

    if not args.export_file:
        return None
    spec = export.file_spec(args.export_file, args.export_file_max_bytes, args.export_file_keep)
    exp = export.FileExporter("file", spec, node=node,
                              accounting=export.engine_accounting(engine))  # fmt: skip
    hub = export.ExportHub([exp], default=["file"])
    hub.start()
    return hub


def cmd_capture(args: argparse.Namespace) -> int:
    if args.event_set.startswith("user:"):
        return _capture_user(args)
    specs = parse_event_sets(args.event_set)
    names = [s.name for s in specs]
    try:
        filters = _filters(args)
        node = os.environ.get(env.NODE_NAME) or os.uname().nodename
        attributor = workload.attributor_from_args(args, node, bool(filters.workload))
    except (ValueError, workload.PodSourceError) as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    args.attributor = attributor
    engine = _make_engine(args, names)
    attributor.start()
    show_workload = attributor.pods is not None  # NAMESPACE/POD/CONTAINER columns
    if attributor.pods is not None and not attributor.pods.synced.wait(30):
        why = attributor.pods.last_error or "the API server is slow"
        print(f"tracefleet-agent: no pod metadata yet ({why}); events name containers "
              "until it comes", file=sys.stderr)  # fmt: skip
    try:
        hub = _export_hub(args, engine, os.uname().nodename)
    except (ValueError, OSError) as e:
        engine.close()
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        metrics_server = _serve_metrics(args, engine, os.uname().nodename, hub=hub)
    except Exception as e:
        if hub is not None:
            hub.close()
        engine.close()
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_ERROR
    from tracefleet.agent.capture.jsonfmt import python_line

    out: TextIO = sys.stdout
    stop = threading.Event()
    jsonl: JsonFormatter | None = None  # the compiled jsonl output, where it runs
    wide = args.output == "wide"

    def sink(ev: dict[str, Any]) -> None:
        # called from the one polling thread (this one): no lock
        try:
            if jsonl is not None:  # the records the compiled formatter left to Python
                jsonl.write(python_line(ev))
            elif args.output == "jsonl":
                out.write(python_line(ev).decode())
            else:  # strace-like, control characters escaped; wide: with EXE
                line = human.line(Event.from_json(ev), workload=show_workload, exe=wide)
                out.write(line + "\n")
        except BrokenPipeError:  # the reader went away (| head): stop, not an error
            stop.set()

    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if hub is not None:
            engine.add_sink(hub)
        engine.add_sink(sink)
        if args.output == "jsonl":
            out.flush()
            jsonl = engine.compiled_jsonl(out.fileno(), sink)
        statuses = engine.apply({n: EventSetConfig(n, True, filters) for n in names})
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
        if args.output in ("table", "wide"):
            out.write(human.header(workload=show_workload, exe=wide) + "\n")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set():
            engine.poll_once()
            out.flush()
            if jsonl is not None and jsonl.broken:  # the reader went away
                break
            if deadline and time.monotonic() >= deadline:
                break
        # as `run` stops: detach, then drain until the rings are empty, so records committed
        # before the stop reach the sinks instead of going unmapped uncounted
        engine.stop_and_drain()
        out.flush()
        if hub is not None:
            hub.close()  # its last accounting record follows the drained events
        _summary(engine, names, hub)
        if jsonl is not None:  # which lines C made, which Python made (and why)
            print(f"  jsonl: {json.dumps(engine.jsonl_counts())}", file=sys.stderr)
        decoded = getattr(engine, "decode_counts", lambda: None)()
        if decoded:  # which events C decoded, which it left to Python (and why)
            print(f"  decode: {json.dumps(decoded)}", file=sys.stderr)
    finally:
        if hub is not None:
            hub.close()
        if metrics_server is not None:
            metrics_server.close()
        attributor.close()
        engine.close()
    return EXIT_OK


def _summary(engine: Any, names: list[str], hub: Any = None) -> None:
    agg = engine.collect()
    print("tracefleet-agent: summary", file=sys.stderr)
    for n in names:
        sa = agg.sets.get(n)
        k = engine.kernel_counters(n)
        outcomes = {f"{s}/{o}": c for (s, o), c in (sa.outcomes.items() if sa else [])}
        errors = {c: v for (s, c), v in sorted(engine.errors.snapshot().items()) if s == n}
        rejected = {c: v for (s, c), v in sorted(engine.fallback_rejected.items()) if s == n}
        # passed = written + dropped + lost + prefix-filtered + in flight (syscall sets)
        acc = engine.accounting(n) if EVENT_SETS[n].calls_accounted else None
        ident = (
            f" passed={acc['passed']} lost={acc['lost']} in_flight={acc['in_flight']}"
            f" unaccounted={acc['unaccounted']} kernel_missed={acc['missed']}"
            if acc
            else ""
        )
        print(
            f"  {n}: events={sa.delivered if sa else 0} dropped={k['dropped']} "
            f"filtered={k['filtered']}{ident} exe_unresolved={k['exe_unresolved']} "
            f"args={json.dumps(outcomes)} "
            f"record_errors={json.dumps(errors)} fallback_rejected={json.dumps(rejected)}",
            file=sys.stderr,
        )
    exe_unknown = engine.exe_unknown()
    if exe_unknown:
        print(f"  exe_unknown={json.dumps(dict(sorted(exe_unknown.items())))}", file=sys.stderr)
    other = {f"{s}/{c}": v for (s, c), v in engine.errors.snapshot().items() if s not in names}
    if other:
        print(f"  other: record_errors={json.dumps(other)}", file=sys.stderr)
    for exp in hub.exporters.values() if hub is not None else ():
        print(f"  export {exp.name}: {json.dumps(exp.snapshot())}", file=sys.stderr)


def _tls_options(args: argparse.Namespace) -> Any:
    """ClientOptions with mTLS from --tls-dir; None (after printing why) if refused."""
    from tracefleet.agent.control.client import ClientOptions
    from tracefleet.agent.control.tls import AgentTLS, AgentTLSError

    if not hasattr(args, "controllers"):  # cmd_run sets it; a direct caller may not have
        args.controllers = controller_addresses(args.controller or [DEFAULT_CONTROLLER])
    tcp = [a for a in args.controllers if unix_path(a) is None]
    if not args.tls_dir and not tcp:
        return ClientOptions()  # guarded by the socket's file permissions
    if not args.tls_dir:
        for address in tcp:
            if not is_loopback(split_host_port(address)[0]) and not args.insecure:
                print(f"tracefleet-agent: refusing to talk to {address} without TLS: pass "
                      f"--tls-dir DIR (or set {env.TLS_DIR}), or --insecure on a trusted "
                      "network", file=sys.stderr)  # fmt: skip
                return None
        print(f"tracefleet-agent: WARNING: connecting to {', '.join(tcp)} WITHOUT TLS "
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
    from tracefleet.agent.control.satoken import AgentTokenError, read_token

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


def _state_file(args: argparse.Namespace) -> str:
    return "" if args.state_file.strip() in ("", "off") else args.state_file


def export_parse(text: str) -> tuple[str, Any]:
    from tracefleet.agent.export import parse_exporter

    return parse_exporter(text)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from tracefleet.agent.control.client import ControlClient

    values = args.controller
    if values is None:  # not on the command line: the environment, else the local socket
        values = [os.environ.get(env.CONTROLLER, DEFAULT_CONTROLLER)]
    if not any(v.strip() for v in values):
        print(f"tracefleet-agent: no controller: pass --controller or set {env.CONTROLLER}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        args.controllers = controller_addresses(values)
    except ValueError as e:
        print(f"tracefleet-agent: controller: {e} (--controller or ${env.CONTROLLER})",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        # the controller refuses a bad label at registration: say so now, not on every retry
        labels = parse_labels(args.labels or "")
    except ValueError as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    options = _client_options(args)
    if options is None:
        return EXIT_USAGE
    options.state_file = _state_file(args)
    try:
        exporters = dict(export_parse(e) for e in args.exporter)
        if len(exporters) < len(args.exporter):
            raise ValueError("an exporter name is given twice: give each --exporter its own name")
    except ValueError as e:
        print(f"tracefleet-agent: {e} (--exporter)", file=sys.stderr)
        return EXIT_USAGE
    otlp_metrics = None
    if args.otlp_metrics:
        from tracefleet.agent.export.otlpmetrics import parse_endpoint

        try:
            otlp_metrics = parse_endpoint(args.otlp_metrics)
            if not 0.1 <= args.otlp_metrics_interval <= 3600:
                raise ValueError(f"--otlp-metrics-interval {args.otlp_metrics_interval:g} is "
                                 "out of range: use 0.1 to 3600 seconds")  # fmt: skip
        except ValueError as e:
            print(f"tracefleet-agent: {e}", file=sys.stderr)
            return EXIT_USAGE
    # registration, and fail-static state re-applied while the controller is away
    logging.getLogger("tracefleet.agent.controlclient").setLevel(logging.INFO)
    from tracefleet.agent.capture.userevents import UserEventsEngine

    try:  # pod metadata when in a pod (or --kube-api); rules' workload selectors need it
        args.attributor = workload.attributor_from_args(args, args.node, need_pods=False)
    except workload.PodSourceError as e:
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    # user:NAME sets (application user_events) beside the BPF sets
    engine = UserEventsEngine(_make_engine(args, list(EVENT_SETS)))
    args.attributor.start()
    if exporters:
        from tracefleet.agent import export

        acct = export.engine_accounting(engine)
        from tracefleet.agent.export.otlp import OtlpExporter

        options.export_hub = export.ExportHub(
            [export.FileExporter(n, s, node=args.node, accounting=acct)
             if isinstance(s, export.FileExportSpec)
             else OtlpExporter(n, s[1], s[0], node=args.node, accounting=acct)
             for n, s in exporters.items()]
        )  # fmt: skip
        options.export_hub.start()
    # run_agent() without its wrapper: the metrics endpoint reads the client's state
    client = ControlClient(engine, args.controllers, args.node, labels, options)
    try:
        metrics_server = _serve_metrics(args, engine, args.node, client, options.export_hub)
    except Exception as e:
        engine.close()
        print(f"tracefleet-agent: {e}", file=sys.stderr)
        return EXIT_ERROR

    pusher = None
    if otlp_metrics is not None:
        from tracefleet.agent.export.otlpmetrics import OtlpMetricsExporter
        from tracefleet.agent.metrics import AgentCollector

        collector = AgentCollector(engine, args.node, client, options.export_hub)
        pusher = OtlpMetricsExporter(collector, otlp_metrics[1], otlp_metrics[0],
                                     interval=args.otlp_metrics_interval)  # fmt: skip
        pusher.start()

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
        # what is still in the rings reaches the exporters, then their last accounting
        # record is written while the engine can still be read
        try:
            engine.stop_and_drain()
        finally:
            if options.export_hub is not None:  # after the consumer stopped: nothing is added
                options.export_hub.close()
            if pusher is not None:  # the final counts, the exporters' included
                pusher.close()
            if metrics_server is not None:
                metrics_server.close()
            args.attributor.close()
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
    sp.add_argument("-o", "--output", choices=("table", "json"), default=None,
                    help="default: table on a terminal, else JSON")  # fmt: skip
    sp.add_argument("--load", action="store_true",
                    help="also load every event set for real (seconds: the verifier runs on "
                    "every program) and report what loaded")  # fmt: skip
    sp.set_defaults(func=cmd_probe)

    sc = sub.add_parser(
        "capture",
        help="capture events locally (no controller)",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sc.add_argument("-e", "--event-set", required=True,
                    help="comma-separated: " + ",".join(EVENT_SETS)
                    + "; or user:NAME for one registered user_event")  # fmt: skip
    sc.add_argument(
        "-d", "--duration", type=_seconds, default=0, help="seconds (default: until ^C)"
    )
    sc.add_argument("-o", "--output", choices=("jsonl", "table", "wide"), default="jsonl",
                    help="jsonl (default), table (strace-like), wide (table with the "
                    "executable's path)")  # fmt: skip
    sc.add_argument("--pid", type=int_in("a pid", 1, PID_MAX_LIMIT), action="append",
                    help="only this process (repeatable)")  # fmt: skip
    sc.add_argument("--comm", type=_comm, action="append",
                    help="only this command name (repeatable)")  # fmt: skip
    sc.add_argument("--cgroup-id", type=int_in("a cgroup id", 1, 2**64 - 1), action="append",
                    help="only this cgroup id")  # fmt: skip
    sc.add_argument("--path-prefix", help="only paths starting with this (file, exec)")
    workload.add_filter_flags(sc)
    workload.add_source_flags(sc)
    sc.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                    help="force one rung instead of the best available "
                         "(vfs: fentry or tracepoint)")  # fmt: skip
    sc.add_argument("--no-user-fallback", action="store_true",
                    help="never read traced processes' memory from user space")  # fmt: skip
    sc.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                    type=_address_or_off,
                    help="serve Prometheus metrics while capturing (default: off)")  # fmt: skip
    sc.add_argument("--bpf-stats", action="store_true", help=BPF_STATS_HELP)
    sc.add_argument("--inflight-entries", type=_inflight_entries, default=4096, metavar="N",
                    help=INFLIGHT_HELP)  # fmt: skip
    sc.add_argument("--ring-mib", type=_ring_mib, default=8, metavar="N", help=RING_MIB_HELP)
    _add_export_flags(sc)
    sc.add_argument("--ready-file", help=argparse.SUPPRESS)
    sc.set_defaults(func=cmd_capture)

    sr = sub.add_parser("run", help="run under a controller (the DaemonSet mode)")
    sr.add_argument("--controller", action="append", metavar="ADDR[,ADDR...]",
                    help=f"unix:/PATH or host:port of the controller (env {env.CONTROLLER}; "
                    f"default: {DEFAULT_CONTROLLER}). Replicas sharing etcd: give every "
                    "replica's address, comma-separated or with --controller again; the agent "
                    "dials first the one its node name hashes to (a fleet spreads over the "
                    "replicas) and, when its stream fails or it does not answer the "
                    "registration within 20s, moves to the next (round robin, jittered backoff "
                    "up to 30s), registers there and resends the result batches not "
                    "acknowledged yet")  # fmt: skip
    sr.add_argument("--node", default=os.environ.get(env.NODE_NAME) or os.uname().nodename,
                    type=_node_name,
                    help=f"node name (env {env.NODE_NAME}; default: hostname)")  # fmt: skip
    sr.add_argument("--labels", default=os.environ.get(env.NODE_LABELS, ""),
                    help=f"k=v,k=v labels (env {env.NODE_LABELS})")  # fmt: skip
    sr.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto")
    sr.add_argument("--metrics-listen", metavar="HOST:PORT", type=_address_or_off,
                    default=os.environ.get(env.METRICS_LISTEN, "0.0.0.0:9091"),
                    help=f"serve Prometheus metrics here; 'off' for none "
                    f"(env {env.METRICS_LISTEN}; default: %(default)s)")  # fmt: skip
    sr.add_argument("--bpf-stats", action="store_true", help=BPF_STATS_HELP)
    sr.add_argument("--hold-seconds", type=_seconds, default=30.0,
                    help="detach an event set after it stays disabled this long")  # fmt: skip
    sr.add_argument("--inflight-entries", type=_inflight_entries, default=4096, metavar="N",
                    help=INFLIGHT_HELP)  # fmt: skip
    sr.add_argument("--ring-mib", type=_ring_mib, default=8, metavar="N", help=RING_MIB_HELP)
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
    sr.add_argument("--state-file", metavar="FILE",
                    default=os.environ.get(env.STATE_FILE, DEFAULT_STATE_FILE),
                    help="fail-static: the last applied desired state (with TTL deadlines) is "
                    "saved here and re-applied at start while the controller is away; 'off' "
                    f"for none (env {env.STATE_FILE}; default: %(default)s)")  # fmt: skip
    sr.add_argument("--exporter", action="append", default=[],
                    metavar="NAME=file:/PATH[,max_bytes=64M][,keep=5]|otlp-grpc:HOST:PORT|"
                    "otlp-http:URL",
                    help="an exporter that rules name (tracefleet enable SET --export NAME) "
                    "to get every event of their set; repeatable")  # fmt: skip
    sr.add_argument("--otlp-metrics", default="", metavar="grpc:HOST:PORT|http://H:P/v1/metrics",
                    help="also push the /metrics aggregates (same names and labels) over OTLP "
                    "metrics, for collectors without Prometheus")  # fmt: skip
    sr.add_argument(
        "--otlp-metrics-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between OTLP metrics exports (default: %(default)s)",
    )
    sr.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback controller without TLS")  # fmt: skip
    workload.add_source_flags(sr)
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
    from tracefleet.agent.capture import fastring

    try:
        fastring.requested()  # a bad TRACEFLEET_FASTRING stops the start, naming itself
        return int(args.func(args))
    except (UnknownEventSet, fastring.SettingError) as e:
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
