"""Mount points by device, to turn a mount-relative path (a hook that only had a dentry)
into a full one when the file system is mounted at exactly one place."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

# the host's mount table when the agent shares the host's PID namespace (DaemonSet hostPID),
# else the agent's own
MOUNTINFO = (Path("/proc/1/mountinfo"), Path("/proc/self/mountinfo"))


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


class _Table:
    """One mount namespace's table and the open mountinfo file that tells when it changes."""

    def __init__(self, fd: int, mounts: dict[int, list[tuple[str, str, str]]]):
        self.fd = fd
        self.mounts = mounts
        self.poller = select.poll()
        self.poller.register(fd, select.POLLPRI | select.POLLERR)

    def changed(self) -> bool:
        # the kernel flags an open mountinfo (POLLPRI|POLLERR) once per mount or unmount in
        # its namespace since the last poll: exact, where a timed re-read is not (a device
        # number is reused by the next mount as soon as it is freed)
        return any(ev & (select.POLLPRI | select.POLLERR) for _, ev in self.poller.poll(0))


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="surrogateescape")


class MountTable:
    """Mount tables as processes see them, one per mount namespace, cached until the kernel
    reports a change in that namespace. A process's own table comes first (a container's
    mounts are not the host's); the host's (pid 1, when the agent shares the host's PID
    namespace) and the agent's own are the fallbacks."""

    _MAX_NAMESPACES = 256

    def __init__(self, sources: tuple[Path, ...] = MOUNTINFO):
        self._sources = sources
        self._lock = threading.Lock()
        self._tables: dict[str, _Table] = {}

    def _table(self, src: Path) -> dict[int, list[tuple[str, str, str]]] | None:
        try:
            key = f"{os.stat(src.parent / 'ns' / 'mnt').st_ino}"
        except OSError:
            key = str(src)
        t = self._tables.get(key)
        try:
            if t is None:
                if len(self._tables) >= self._MAX_NAMESPACES:
                    self.close()
                fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    t = _Table(fd, parse_mountinfo(_read_fd(fd)))
                except OSError:
                    os.close(fd)
                    raise
                self._tables[key] = t
            elif t.changed():
                t.mounts = parse_mountinfo(_read_fd(t.fd))
        except OSError:
            return None
        return t.mounts

    def close(self) -> None:
        for t in self._tables.values():
            os.close(t.fd)
        self._tables.clear()

    def _mounts(self, dev: int, pid: int = 0) -> list[tuple[str, str, str]]:
        sources = ((Path(f"/proc/{pid}/mountinfo"),) if pid else ()) + self._sources
        with self._lock:
            for src in sources:
                table = self._table(src)
                if table is not None and dev in table:
                    return list(table[dev])
        return []

    def mount_point(self, dev: int, pid: int = 0) -> str | None:
        """Where the file system ``dev`` is mounted with its root, as process ``pid`` sees
        it, if at exactly one place."""
        whole = [mp for root, mp, _ in self._mounts(dev, pid) if root == "/"]
        return whole[0] if len(whole) == 1 else None

    def fstype(self, dev: int, pid: int = 0) -> str:
        types = {t for _, _, t in self._mounts(dev, pid)}
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
