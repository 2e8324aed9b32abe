"""The user-space fallback's identity check (fallback.Caller), on this test's own processes
and threads: no root (a pidfd and /proc/<pid>/stat of one's own processes need none)."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tracefleet.agent.capture import fallback
from tracefleet.agent.capture.fallback import Caller, CallerGone


def _thread_tid() -> tuple[int, threading.Event, threading.Thread]:
    got: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def run() -> None:
        import threading as t

        got.append(t.get_native_id())
        ready.set()
        done.wait(60)

    th = threading.Thread(target=run)
    th.start()
    assert ready.wait(60)
    return got[0], done, th


def test_a_live_thread_that_started_before_the_call_is_the_caller():
    import os

    tid, done, th = _thread_tid()
    try:
        c = Caller(tid, os.getpid(), time.monotonic_ns())
        assert c.tid == tid and c.alive()
        c.close()
    finally:
        done.set()
        th.join()


def test_a_task_started_after_the_call_is_refused_as_pid_reused():
    import os

    with pytest.raises(CallerGone) as e:
        Caller(os.getpid(), os.getpid(), 0)  # a call at boot: this process started later
    assert e.value.cause == "pid-reused"


def test_an_exited_task_is_refused_and_a_pinned_one_seen_exiting():
    p = subprocess.Popen(["sleep", "600"])
    c = Caller(p.pid, p.pid, time.monotonic_ns())
    assert c.alive()
    p.kill()
    p.wait()
    assert not c.alive()  # reads made meanwhile are not trusted
    c.close()
    with pytest.raises(CallerGone) as e:
        Caller(p.pid, p.pid, time.monotonic_ns())
    assert e.value.cause == "caller-exited"


def test_without_thread_pidfds_the_thread_group_is_pinned(monkeypatch):
    """Kernels before 6.9 refuse PIDFD_THREAD (EINVAL): the caller is read through its
    thread group, which a plain pidfd can name."""
    import os

    monkeypatch.setattr(fallback, "_PIDFD_THREAD", 1 << 30)  # an unknown flag: EINVAL
    tid, done, th = _thread_tid()
    try:
        c = Caller(tid, os.getpid(), time.monotonic_ns())
        assert c.tid == os.getpid() and c.alive()
        c.close()
    finally:
        done.set()
        th.join()
