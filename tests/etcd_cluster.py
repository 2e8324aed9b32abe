"""A fresh etcd cluster on loopback (Debian's etcd-server, /usr/bin/etcd): the replicated
controller's store, for the e2e tests (tests/e2e/test_fleet_etcd.py) and the benchmark's
replicated mode (tests/bench/replicated.py)."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import wait_until
from tests.ports import free_port


@dataclass(frozen=True)
class EtcdCluster:
    urls: list[str]  # each member's client URL
    pids: list[int]


@contextlib.contextmanager
def etcd_cluster(
    tmp: Path, members: int = 3, timeout: float = 30.0, prefix: list[str] | None = None
) -> Iterator[EtcdCluster]:
    """A new ``members``-member cluster, data and logs under ``tmp``; every member answers
    and a write has its quorum before this yields; stopped on exit. ``prefix``: a command
    the members run under (e.g. taskset)."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed (Debian package etcd-server): run make deps")
    tmp.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, BIND_TRIES + 1):
        procs: list[subprocess.Popen[bytes]] = []
        try:
            urls = _start(etcd, tmp, members, prefix, procs)
            try:
                healthy = functools.partial(_healthy, tmp, procs, urls)
                wait_until(healthy, timeout, f"a {members}-member etcd cluster")
            except _PortTaken as e:
                if attempt == BIND_TRIES:
                    raise RuntimeError(str(e)) from None
                continue  # the members are stopped below; new ports, new data dirs
            yield EtcdCluster(urls, [p.pid for p in procs])
            return
        finally:
            _stop(procs)


BIND_TRIES = 3  # a port another process binds between our pick and etcd's listen: pick again


class _PortTaken(Exception):
    pass


def _start(
    etcd: str, tmp: Path, members: int, prefix: list[str] | None,
    procs: list[subprocess.Popen[bytes]],
) -> list[str]:  # fmt: skip
    """Starts the members (appended to ``procs`` as they start) on new ports, in data dirs
    emptied first; returns their client URLs."""
    ports = [(free_port(), free_port()) for _ in range(members)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    for i, (client, peer) in enumerate(ports):
        shutil.rmtree(tmp / f"etcd{i}", ignore_errors=True)
        with open(tmp / f"etcd{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        *(prefix or []), etcd, "--name", f"m{i}",
                        "--data-dir", str(tmp / f"etcd{i}"),
                        "--listen-client-urls", f"http://127.0.0.1:{client}",
                        "--advertise-client-urls", f"http://127.0.0.1:{client}",
                        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-cluster", cluster, "--initial-cluster-state", "new",
                        "--initial-cluster-token", f"tf-{tmp.name}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
    return [f"http://127.0.0.1:{client}" for client, _ in ports]


def _healthy(tmp: Path, procs: list[subprocess.Popen[bytes]], urls: list[str]) -> bool:
    for i, p in enumerate(procs):
        if p.poll() is not None:
            log = tmp / f"etcd{i}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            msg = f"etcd member m{i} exited ({p.returncode}); {log} ends with: " + " | ".join(tail)
            if any("address already in use" in line for line in tail):
                raise _PortTaken(msg)
            raise RuntimeError(msg)
    for url in urls:  # every member answers, and a write has its quorum
        key = base64.b64encode(f"/health/{url}".encode()).decode()
        for path, body in (("/v3/kv/put", {"key": key, "value": key}),
                           ("/v3/kv/range", {"key": key})):  # fmt: skip
            # plain requests: EtcdClient would log a member still starting as an
            # outage of the cluster and start probing it
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    resp.read()
            except (OSError, ValueError):
                return False
    return True


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # SIGKILL: the data is thrown away, and a SIGTERMed member hands its leadership over and
    # waits for its peers first (~7 s for three here, longer without a quorum)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
