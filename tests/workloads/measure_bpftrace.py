#!/usr/bin/env python3
"""Baseline: how much of each workload's memory a non-sleepable BPF read captures.

Runs bpftrace (bpf_probe_read_user_str / bpf_probe_read_user at sys_enter) against
the workloads in build/workloads/ and compares what it read with each call's
"expect". Root only. Not part of the test suite; used to fill in README.md.

    sudo python3 tests/workloads/measure_bpftrace.py [-n 20] [--bin build/workloads]
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = r"""
tracepoint:syscalls:sys_enter_openat /@want[comm]/ {
  printf("TF %d openat pathname S %s\n", pid, str(args->filename));
}
tracepoint:syscalls:sys_enter_openat2 /@want[comm]/ {
  printf("TF %d openat2 pathname S %s\n", pid, str(args->filename));
  printf("TF %d openat2 how B %r\n", pid, buf(args->how, 24));
}
tracepoint:syscalls:sys_enter_connect /@want[comm]/ {
  printf("TF %d connect uservaddr B %r\n", pid, buf(args->uservaddr, args->addrlen));
}
tracepoint:syscalls:sys_enter_execve /@want[comm]/ {
  printf("TF %d execve filename S %s\n", pid, str(args->filename));
  printf("TF %d execve argv[0] S %s\n", pid, str(args->argv[0]));
  printf("TF %d execve argv[1] S %s\n", pid, str(args->argv[1]));
  printf("TF %d execve argv[2] S %s\n", pid, str(args->argv[2]));
}
BEGIN { @want["cold_rodata"] = 1; @want["cold_filemap"] = 1; @want["cold_cross"] = 1;
        @want["cold_anon_swap"] = 1; @want["warm"] = 1; printf("TF-READY\n"); }
END { clear(@want); }
"""

CASES = (
    [
        ("cold_rodata", [m])
        for m in ("openat", "einval", "openat2", "connect", "connect6", "connect_unix", "exec")
    ]
    + [
        ("cold_filemap", []),
        ("cold_cross", []),
        ("cold_anon_swap", []),
    ]
    + [
        ("warm", [m])
        for m in ("openat", "einval", "openat2", "connect", "connect6", "connect_unix", "exec")
    ]
)


def decode_buf(text):
    """bpftrace %r: printable bytes as-is, others as \\xNN."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += text[i].encode()
            i += 1
    return out.hex()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20, help="runs per case")
    ap.add_argument("--bin", default="build/workloads")
    ap.add_argument("--only", help="comma-separated workload names to run")
    ap.add_argument("--dump", action="store_true", help="print raw bpftrace lines")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="echo 3 > /proc/sys/vm/drop_caches before every run",
    )
    a = ap.parse_args()

    env = dict(os.environ, BPFTRACE_STRLEN="200")
    # Output to a file, not a pipe: an unread pipe fills up and bpftrace drops events.
    outf = tempfile.NamedTemporaryFile("w+", prefix="tf-bpftrace-", suffix=".log")  # noqa: SIM115
    bt = subprocess.Popen(
        ["bpftrace", "-e", SCRIPT], stdout=outf, stderr=subprocess.STDOUT, env=env
    )
    deadline = time.monotonic() + 60
    while True:
        if "TF-READY" in Path(outf.name).read_text():
            break
        if bt.poll() is not None or time.monotonic() > deadline:
            sys.exit("bpftrace did not start:\n" + Path(outf.name).read_text())
        time.sleep(0.1)

    expected = []  # (case, pid, syscall, arg, encoding, expect)
    skipped = set()
    cases = CASES
    if a.only:
        cases = [c for c in CASES if c[0] in a.only.split(",")]
    for name, args in cases:
        for _ in range(a.n):
            if a.drop_caches:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            p = subprocess.run(
                [os.path.join(a.bin, name), *args], capture_output=True, text=True, check=True
            )
            d = json.loads(p.stdout.strip().splitlines()[0])
            label = " ".join([name, *args])
            if "skip" in d:
                skipped.add((label, d["skip"]))
                break
            for c in d["calls"]:
                expected.append(
                    (
                        label,
                        d["pid"],
                        c["syscall"],
                        c["arg"],
                        c["encoding"],
                        c["expect"],
                        any(v is False for v in c["pte_present"]),
                    )
                )
    time.sleep(1.0)
    bt.send_signal(signal.SIGINT)
    try:
        bt.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print("bpftrace ignored SIGINT for 30 s; killing it", file=sys.stderr)
        bt.kill()
        bt.wait()
    out = Path(outf.name).read_text()

    seen = {}
    for line in out.splitlines():
        if not line.startswith("TF"):
            print("bpftrace:", line, file=sys.stderr)
        if a.dump:
            print(line, file=sys.stderr)
        m = re.match(r"TF (\d+) (\S+) (\S+) ([SB]) ?(.*)$", line)
        if m:
            pid, sc, arg, kind, val = m.groups()
            seen[(int(pid), sc, arg)] = val if kind == "S" else decode_buf(val)

    stats = collections.defaultdict(lambda: [0, 0, 0, 0])  # ok, total, missing, cold
    for label, pid, sc, arg, _enc, exp, cold in expected:
        s = stats[(label, sc, arg)]
        s[1] += 1
        s[3] += cold
        got = seen.get((pid, sc, arg))
        if got is None:
            s[2] += 1
        elif got == exp:
            s[0] += 1
    print(f"{'case':28} {'call':22} {'captured':>12} {'cold@enter':>11} {'no-event':>9}")
    for (label, sc, arg), (ok, tot, miss, cold) in stats.items():
        print(
            f"{label:28} {sc + ' ' + arg:22} {ok:5}/{tot:<5}{100 * ok / tot:4.0f}% "
            f"{cold:5}/{tot:<5} {miss:5}"
        )
    for label, why in sorted(skipped):
        print(f"{label:28} skipped: {why}")


if __name__ == "__main__":
    main()
