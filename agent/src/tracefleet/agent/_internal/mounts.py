"""Mount points by device, to turn a mount-relative path (a hook that only had a dentry)
into a full one when the file system is mounted at exactly one place."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

# the host's mount table when the agent shares the host's PID namespace (DaemonSet hostPID),
# else the agent's own
MOUNTINFO = (Path("/proc/1/mountinfo"), Path("/proc/self/mountinfo"))
_REFRESH_SECONDS = 2.0


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's internal dev_t (MKDEV: major << 20 | minor), as the BPF records carry."""
    return (major << 20) | minor


def dev_label(dev: int) -> str:
    return f"{dev >> 20}:{dev & 0xFFFFF}"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> dict[int, list[tuple[str, str, str]]]:
    """dev -> [(root within the file system, mount point, fstype)] per mount in ``text``."""
    out: dict[int, list[tuple[str, str, str]]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or ":" not in f[2]:
            continue
        major, minor = f[2].split(":", 1)
        try:
            dev = kernel_dev(int(major), int(minor))
        except ValueError:
            continue
        fstype = f[f.index("-") + 1] if "-" in f[5:] and f.index("-") + 1 < len(f) else ""
        out.setdefault(dev, []).append((_unescape(f[3]), _unescape(f[4]), fstype))
    return out


class MountTable:
    """Cached view of the mount table; re-read at most every couple of seconds, and when a
    device is not found (a file system mounted since)."""

    def __init__(self, sources: tuple[Path, ...] = MOUNTINFO):
        self._sources = sources
        self._lock = threading.Lock()
        self._by_dev: dict[int, list[tuple[str, str, str]]] = {}
        self._read_at = 0.0

    def _refresh(self) -> None:
        for src in self._sources:
            try:
                self._by_dev = parse_mountinfo(src.read_text())
                break
            except OSError:
                continue
        self._read_at = time.monotonic()

    def _mounts(self, dev: int) -> list[tuple[str, str, str]]:
        with self._lock:
            age = time.monotonic() - self._read_at
            if age > _REFRESH_SECONDS or (dev not in self._by_dev and age > 0.1):
                self._refresh()
            return list(self._by_dev.get(dev, []))

    def mount_point(self, dev: int) -> str | None:
        """Where the file system ``dev`` is mounted with its root, if at exactly one place."""
        whole = [mp for root, mp, _ in self._mounts(dev) if root == "/"]
        return whole[0] if len(whole) == 1 else None

    def fstype(self, dev: int) -> str:
        types = {t for _, _, t in self._mounts(dev)}
        return types.pop() if len(types) == 1 else ""


def dev_of_dir(pid: int, path: str) -> int:
    """Kernel dev_t of the directory holding ``path`` as process ``pid`` sees it (its root
    and mount namespace, through /proc/pid/root), or 0 if it cannot be found now."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    for candidate in (f"/proc/{pid}/root{parent}", parent):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return kernel_dev(os.major(st.st_dev), os.minor(st.st_dev))
    return 0
