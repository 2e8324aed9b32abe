"""Soak: a controller with N simulated agents (the load generator, one process) and M real
agents (`tracefleet-agent run`, BPF) for a given time, an event set enabled on a share of
them, sampling RSS, CPU and open fds of every daemon every few seconds. Prints the series, a
summary per daemon (start, end of warm-up, end) and a flatness verdict over the samples
after warm-up; writes both to ``--out``.

    sudo .venv/bin/python tests/bench/soak.py --duration 600 --simulated 1000 --real 3

The issue's soak is 10 minutes with 1,000 simulated and 3 real agents (the defaults);
``tests/e2e/test_reliability_soak.py`` runs the same code for under a minute in CI.

Traffic: the simulated agents report every ``--interval`` seconds (``--rate`` events/s per
enabled set); `file` is enabled on role=db (half the simulated agents and every real one)
with a comm filter, and one process named ``tfsoak`` opens a file ``--opens`` times a
second, so the real agents capture, aggregate and report real events all along. The
controller keeps its database in a file (every result batch goes through the ledger's
group commit, fsync included).

Flat, after warm-up: open fds grow by at most ``FD_NOISE``; RSS's least-squares trend over
the post-warm-up samples adds at most max(``RSS_NOISE_MB``, ``RSS_NOISE_SHARE`` of the
post-warm-up start) over that span; CPU's median over the last half of those samples is at
most 1.25x (+2 points) the median over the first half. Root only (real agents).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
from tests.ports import free_port  # noqa: E402

PY = sys.executable
LOADGEN = ROOT / "tests" / "loadgen.py"  # as tests.conftest.LOADGEN; this script runs standalone
CLK_TCK = os.sysconf("SC_CLK_TCK")
FD_NOISE = 8
RSS_NOISE_MB = 4.0
RSS_NOISE_SHARE = 0.05
CPU_RATIO, CPU_POINTS = 1.25, 2.0
COMM = "tfsoak"

# the workload the real agents capture: a process named tfsoak opening a file N times/s
OPENER = f"""
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"{COMM}", 0, 0, 0)
period = 1.0 / float(sys.argv[1])
nxt = time.monotonic()
while True:
    open("/etc/hostname", "rb").close()
    nxt += period
    time.sleep(max(0.0, nxt - time.monotonic()))
"""


@dataclass
class SoakConfig:
    duration: float = 600.0  # seconds sampled (after every agent registered and applied)
    every: float = 10.0  # seconds between samples
    warmup: float = 60.0  # seconds of the sampled time not judged
    simulated: int = 1000
    real: int = 3
    interval: float = 1.0  # simulated agents' batch interval
    rate: float = 50.0  # simulated events/s per enabled set
    opens: float = 200.0  # opens/s of the tfsoak process
    ramp: float = 20.0  # seconds over which the simulated agents connect


@dataclass
class Sample:
    t: float  # seconds since sampling started
    rss_mb: float
    cpu_s: float  # utime + stime so far
    fds: int
    cpu_pct: float = 0.0  # over the interval up to this sample, percent of one core


@dataclass
class Verdict:
    metric: str
    start: float  # first sample
    warm: float  # first sample after warm-up
    end: float
    change: float  # trend-projected growth (rss), growth (fds), late/early ratio (cpu)
    flat: bool
    detail: str


@dataclass
class SoakResult:
    config: SoakConfig
    series: dict[str, list[Sample]]
    verdicts: dict[str, list[Verdict]]
    fleet: list[dict[str, Any]] = field(default_factory=list)  # per sample: connected etc.
    header: str = ""

    @property
    def flat(self) -> bool:
        return all(v.flat for vs in self.verdicts.values() for v in vs)

    def verdict(self, daemon: str, metric: str) -> Verdict:
        return next(v for v in self.verdicts[daemon] if v.metric == metric)


def sample(pid: int, t: float) -> Sample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return Sample(
        t=t,
        rss_mb=rss_kb / 1024,
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def judge(series: list[Sample], warmup: float) -> list[Verdict]:
    """Flatness of one daemon's series after warm-up (needs at least 3 samples there)."""
    post = [s for s in series if s.t >= warmup]
    if len(post) < 3:
        raise ValueError(f"only {len(post)} samples after warm-up: sample longer or more often")
    first, last = series[0], series[-1]
    out = []
    growth = max(s.fds for s in post) - post[0].fds
    out.append(
        Verdict(
            "fds",
            first.fds,
            post[0].fds,
            last.fds,
            growth,
            growth <= FD_NOISE,
            f"max growth {growth:+d} after warm-up (noise {FD_NOISE})",
        )
    )
    xs = [s.t for s in post]
    slope = _slope(xs, [s.rss_mb for s in post])  # MiB/s
    projected = slope * (xs[-1] - xs[0])
    allowed = max(RSS_NOISE_MB, RSS_NOISE_SHARE * post[0].rss_mb)
    out.append(
        Verdict(
            "rss_mb",
            first.rss_mb,
            post[0].rss_mb,
            last.rss_mb,
            projected,
            projected <= allowed,
            f"trend {slope * 60:+.3f} MiB/min = {projected:+.1f} MiB over "
            f"{xs[-1] - xs[0]:.0f}s (allowed {allowed:.1f})",
        )
    )
    cpu = [s.cpu_pct for s in post[1:]]  # the first post sample's interval straddles warm-up
    half = max(1, len(cpu) // 2)
    early, late = statistics.median(cpu[:half]), statistics.median(cpu[-half:])
    ok = late <= early * CPU_RATIO + CPU_POINTS
    out.append(
        Verdict(
            "cpu_pct",
            series[1].cpu_pct if len(series) > 1 else 0.0,
            post[0].cpu_pct,
            last.cpu_pct,
            late / early if early else 0.0,
            ok,
            f"median {early:.1f}% (first half) -> {late:.1f}% (last half)",
        )
    )
    return out


@contextlib.contextmanager
def _daemons(procs: dict[str, subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for name in reversed(list(procs)):
            p = procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _stub(address: str) -> Any:
    import grpc

    from tracefleet.v1 import control_pb2_grpc

    return control_pb2_grpc.ControlServiceStub(grpc.insecure_channel(address))


def _fleet(stub: Any) -> dict[str, Any]:
    from tracefleet.v1 import control_pb2

    st = stub.GetStatus(control_pb2.GetStatusRequest(), timeout=30)
    real = [n for n in st.nodes if n.name.startswith("soak-real-")]
    return {
        "nodes": len(st.nodes),
        "connected": sum(1 for n in st.nodes if n.state == 1),
        "generation": st.generation,
        "applied": sum(1 for n in st.nodes if n.applied_generation == st.generation),
        "events": sum(t.delivered for n in st.nodes for t in n.totals),
        "real_events": sum(t.delivered for n in real for t in n.totals),
        "discarded": sum(t.discarded for n in st.nodes for t in n.totals),
        "duplicate_batches": sum(n.batches_duplicate for n in st.nodes),
        "batches": sum(n.batches_applied for n in st.nodes),
    }


def _wait(pred: Any, timeout: float, what: str, procs: dict[str, Any], every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def run_soak(cfg: SoakConfig, tmp: Path, progress: Any = None) -> SoakResult:
    """Start the daemons, wait for every agent, enable file on role=db, sample for
    cfg.duration seconds, stop everything; raises if a daemon dies."""
    say = progress or (lambda _msg: None)
    started = time.gmtime()
    tmp.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, cmd: list[str]) -> None:
        with open(tmp / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    with _daemons(procs):
        spawn("controller", [
            PY, "-m", "tracefleet.controller.server", "--listen", address, "--insecure-listen",
            "--db", str(tmp / "controller.db"), "--stale-after", "30",
        ])  # fmt: skip
        _wait(lambda: "listening on" in (tmp / "controller.log").read_text(), 60,
              "the controller to listen", procs, 0.2)  # fmt: skip
        spawn("simulated", [
            PY, str(LOADGEN), "--controller", address,
            "--agents", str(cfg.simulated), "--name", "soak-sim", "--roles", "db,web",
            "--interval", str(cfg.interval), "--rate", str(cfg.rate),
            "--ramp", str(cfg.ramp), "--backoff-max", "5",
        ])  # fmt: skip
        for i in range(cfg.real):
            spawn(f"real-{i}", [
                PY, "-m", "tracefleet.agent", "run", "--controller", address,
                "--node", f"soak-real-{i}", "--labels", "role=db",
                "--metrics-listen", "off",
            ])  # fmt: skip
        opener = subprocess.Popen([PY, "-c", OPENER, str(cfg.opens)])
        try:
            stub = _stub(address)
            want = cfg.simulated + cfg.real
            say(f"waiting for {want} agents to register")
            _wait(lambda: _fleet(stub)["connected"] >= want, 120 + cfg.ramp,
                  f"{want} agents connected", procs, 2.0)  # fmt: skip
            r = subprocess.run(
                [PY, "-m", "tracefleet.controller.operator.cli", "--controller", address, "enable",
                 "file", "--selector", "role=db", "--comm", COMM],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if r.returncode:
                raise RuntimeError(f"enable failed: {r.stderr}")
            _wait(lambda: (f := _fleet(stub))["applied"] >= want and f["real_events"] > 0,
                  120, "every agent applied file and real events arrive", procs, 1.0)  # fmt: skip
            say(f"sampling {len(procs)} daemons every {cfg.every:g}s for {cfg.duration:g}s")
            series: dict[str, list[Sample]] = {name: [] for name in procs}
            fleet: list[dict[str, Any]] = []
            t0 = time.monotonic()
            n = 0
            while True:
                t = time.monotonic() - t0
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode} during the soak")
                    s = sample(p.pid, t)
                    if series[name]:
                        prev = series[name][-1]
                        s.cpu_pct = 100.0 * (s.cpu_s - prev.cpu_s) / max(1e-9, s.t - prev.t)
                    series[name].append(s)
                fleet.append({"t": t, **_fleet(stub)})
                say(
                    f"t={t:5.0f}s "
                    + " ".join(
                        f"{k}={v[-1].rss_mb:.0f}MiB/{v[-1].fds}fd" for k, v in series.items()
                    )
                    + f" connected={fleet[-1]['connected']}"
                )
                if t >= cfg.duration:
                    break
                n += 1
                time.sleep(max(0.0, t0 + n * cfg.every - time.monotonic()))
        finally:
            opener.kill()
            opener.wait()
    verdicts = {name: judge(s, cfg.warmup) for name, s in series.items()}
    return SoakResult(cfg, series, verdicts, fleet, header=_header(cfg, started))


def _header(cfg: SoakConfig, started: time.struct_time) -> str:
    load = os.getloadavg()
    return (
        f"soak started {time.strftime('%Y-%m-%d %H:%M:%S UTC', started)} on "
        f"{os.uname().release}, {os.cpu_count()} CPUs, loadavg at the end {load[0]:.2f}: "
        f"controller + "
        f"{cfg.simulated} simulated agents (one process, {cfg.interval:g}s batches, "
        f"{cfg.rate:g} events/s per enabled set) + {cfg.real} real agents; file enabled on "
        f"role=db (comm {COMM}, {cfg.opens:g} opens/s); {cfg.duration:g}s sampled every "
        f"{cfg.every:g}s, warm-up {cfg.warmup:g}s"
    )


def render(res: SoakResult) -> str:
    names = list(res.series)
    lines = [res.header, ""]
    head = f"{'t(s)':>6}" + "".join(f" | {n[:10]:>10} rss  cpu% fds" for n in names)
    head += " | connected events(ctl)"
    lines += [head, "-" * len(head)]
    for i, f in enumerate(res.fleet):
        row = f"{f['t']:6.0f}"
        for n in names:
            s = res.series[n][i]
            row += f" | {s.rss_mb:14.1f} {s.cpu_pct:5.1f} {s.fds:3d}"
        row += f" | {f['connected']:9d} {f['events']}"
        lines.append(row)
    lines += ["", f"{'daemon':<11} {'metric':<8} {'start':>9} {'warm':>9} {'end':>9}  verdict"]
    for n, vs in res.verdicts.items():
        for v in vs:
            lines.append(
                f"{n:<11} {v.metric:<8} {v.start:9.1f} {v.warm:9.1f} {v.end:9.1f}  "
                f"{'FLAT' if v.flat else 'GROWING'}: {v.detail}"
            )
    last = res.fleet[-1]
    lines += [
        "",
        f"fleet at the end: {last['connected']}/{last['nodes']} connected, "
        f"{last['applied']} on generation {last['generation']}, {last['batches']} batches "
        f"applied, {last['events']} events counted ({last['real_events']} from the real "
        f"agents), {last['discarded']} discarded, {last['duplicate_batches']} duplicate "
        f"batches ignored",
        f"verdict: {'FLAT' if res.flat else 'NOT FLAT'} after warm-up",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    p.add_argument("--duration", type=float, default=d.duration)
    p.add_argument("--every", type=float, default=d.every)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--simulated", type=int, default=d.simulated)
    p.add_argument("--real", type=int, default=d.real)
    p.add_argument("--interval", type=float, default=d.interval)
    p.add_argument("--rate", type=float, default=d.rate)
    p.add_argument("--opens", type=float, default=d.opens)
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "bench" / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0 and args.real:
        print("soak.py: real agents need root (BPF); run with sudo or --real 0", file=sys.stderr)
        return 2
    ctypes.CDLL(None)  # fail early on a libc-less platform rather than in the opener
    cfg = SoakConfig(
        duration=args.duration, every=args.every, warmup=args.warmup,
        simulated=args.simulated, real=args.real, interval=args.interval, rate=args.rate,
        opens=args.opens,
    )  # fmt: skip
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tmp = Path(tempfile.mkdtemp(prefix=f"tracefleet-soak-{stamp}-"))  # honours TMPDIR
    res = run_soak(cfg, tmp, progress=lambda m: print(f"soak: {m}", file=sys.stderr, flush=True))
    text = render(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"soak-{stamp}.txt").write_text(text + "\n")
    data = {
        "config": asdict(cfg),
        "series": {k: [asdict(s) for s in v] for k, v in res.series.items()},
        "verdicts": {k: [asdict(x) for x in v] for k, v in res.verdicts.items()},
        "fleet": res.fleet,
        "flat": res.flat,
    }
    (args.out / f"soak-{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"soak: wrote {args.out}/soak-{stamp}.txt and .json (logs in {tmp})", file=sys.stderr)
    return 0 if res.flat else 1


if __name__ == "__main__":
    sys.exit(main())
