"""Attribution and a workload filter against a REAL container runtime: containerd + runc
(Debian packages) started by the test with their own root, state and socket, running a
container from a busybox rootfs in the kubelet's cgroupfs layout
(``/kubepods/besteffort/pod<uid>/<container id>``). There is no kubelet: the Pod object
comes from tests/fake_kube_api.py, a stand-in with the API server's shape, naming the
container id the runtime really runs. Skipped (listed in expected_skips.json) where
containerd, ctr, runc or a static busybox is not installed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bpf.test_workload import MISSING, NODE, Capture, Env, _rmdir, identity
from tests.conftest import scaled, wait_until
from tests.fake_kube_api import AGENT_API_TOKEN, FakeAPIServer
from tracefleet.agent.capture.engine import Filters
from tracefleet.agent.capture.workload import WorkloadSelector, cgroup2_root

pytestmark = pytest.mark.bpf

TOOLS = ("containerd", "ctr", "runc", "busybox")


@pytest.fixture
def containerd(host: None, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"containerd runtime not installed ({', '.join(missing)} missing)")
    d = tmp_path / "ctrd"
    rootfs = d / "rootfs" / "bin"
    rootfs.mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", rootfs / "busybox")
    for applet in ("sh", "cat", "sleep"):
        (rootfs / applet).symlink_to("busybox")
    sock = d / "containerd.sock"
    log = (d / "containerd.log").open("w")
    proc = subprocess.Popen(["containerd", "--root", str(d / "root"), "--state",
                             str(d / "state"), "--address", str(sock)], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"containerd exited: {(d / 'containerd.log').read_text()[-2000:]}")
        return sock.exists() and subprocess.run(["ctr", "-a", str(sock), "version"],
                                                capture_output=True).returncode == 0  # fmt: skip

    try:
        wait_until(ready, scaled(30), "containerd answering on its socket")
        yield sock, d / "rootfs"
    finally:
        proc.terminate()
        proc.wait(timeout=scaled(30))
        log.close()


def test_real_containerd_container_is_attributed_and_filtered(containerd, tmp_path: Path) -> None:
    sock, rootfs = containerd
    base = cgroup2_root()
    fake = FakeAPIServer(tmp_path / "api")
    creds = tmp_path / "sa"
    creds.mkdir()
    (creds / "token").write_text(AGENT_API_TOKEN)
    (creds / "ca.crt").write_bytes(fake.ca.read_bytes())
    env = Env(Path(base), fake, creds)
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    tag = f"ctrd-{secrets.token_hex(3)}"
    cgroup = f"/kubepods/besteffort/pod{uid}/{cid}"
    fake.put_pod(uid, "db-0", "prod", NODE, {"postgres": cid}, {"app": "db"})
    cap = Capture(env, Filters(workload=WorkloadSelector(namespace="prod", pod="db-*")))
    loop = f"while true; do cat {MISSING}/{tag} 2>/dev/null; sleep 0.2; done"
    # ctr's --rootfs is a switch: the rootfs directory takes the image's place
    run = subprocess.Popen(["ctr", "-a", str(sock), "run", "--rm", "--cgroup", cgroup,
                            "--rootfs", str(rootfs), cid, "/bin/sh", "-c", loop],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)  # fmt: skip
    try:
        ev = wait_until(lambda: cap.of(f"{MISSING}/{tag}"), scaled(60),
                        "an event from the containerd container")[0]  # fmt: skip
        assert identity(ev) == {"attribution": "pod", "container_id": cid, "pod": "db-0",
                                "namespace": "prod", "pod_uid": uid, "container": "postgres",
                                "node": NODE}  # fmt: skip
        assert ev["comm"] == "cat"
        # the runtime really put it there: the kernel's cgroup id of the event is the
        # container's cgroup directory
        assert ev["cgroup_id"] == os.stat(f"{base}{cgroup}").st_ino
    finally:
        subprocess.run(["ctr", "-a", str(sock), "task", "kill", "-s", "KILL", cid],
                       capture_output=True)  # fmt: skip
        try:
            run.wait(timeout=scaled(30))
        finally:
            cap.close()
            fake.stop()
            # runc made the path in every hierarchy (v1 ones too on a hybrid host); the
            # parents only if empty (a real node's kubepods is never empty)
            for mnt in _cgroup_mounts():
                for rel in (cgroup, f"/kubepods/besteffort/pod{uid}"):
                    if os.path.isdir(f"{mnt}{rel}"):
                        _rmdir(Path(f"{mnt}{rel}"))
                for rel in ("/kubepods/besteffort", "/kubepods"):
                    with contextlib.suppress(OSError):
                        os.rmdir(f"{mnt}{rel}")


def _cgroup_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split(" - ") for line in f]
    return [
        left.split(" ")[4] for left, right in rows if right.split(" ")[0] in ("cgroup", "cgroup2")
    ]
