"""The etcd client's availability, against a stand-in HTTP server (the real cluster's cases
are in tests/e2e/test_fleet_etcd.py): a call rides through "no leader" answers for up to its
wait; past it, etcd is unavailable, later calls fail at once without a request, and a probe
makes it available again; a request etcd refuses is an error, not an outage."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import wait_until
from tracefleet.controller.storage import etcdclient
from tracefleet.controller.storage.etcdclient import EtcdClient, EtcdError


class FakeEtcd(http.server.ThreadingHTTPServer):
    """Answers each POST with the next (status, body) of ``script`` (the last one repeats)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[tuple[int, dict[str, Any]]] = [(200, {"kvs": []})]
        self.requests: list[dict[str, str]] = []  # headers of each request
        self.lock = threading.Lock()

    def answer(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(headers)
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeEtcd

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.answer(dict(self.headers))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


NO_LEADER = (503, {"error": "etcdserver: no leader", "code": 14})


@pytest.fixture
def etcd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEtcd]:
    monkeypatch.setattr(etcdclient, "PROBE_EVERY", 0.05)
    monkeypatch.setattr(etcdclient, "RETRY_GAP", 0.02)
    server = FakeEtcd()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_call_rides_through_an_election(etcd: FakeEtcd) -> None:
    etcd.script = [NO_LEADER, NO_LEADER, NO_LEADER, (200, {"kvs": []})]
    client = EtcdClient([etcd.url], timeout=1, wait=5)
    assert client.get("/k") == (None, 0)
    assert len(etcd.requests) == 4 and client.problem == ""
    # a member cut off from its quorum must say so at once rather than hold the request
    assert all(h.get("Grpc-Metadata-Hasleader") == "true" for h in etcd.requests)


def test_an_outage_costs_one_wait_then_calls_fail_at_once_until_a_probe_succeeds(
    etcd: FakeEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    etcd.script = [NO_LEADER]
    client = EtcdClient([etcd.url], timeout=1, wait=0.3)
    with pytest.raises(EtcdError, match=r"no etcd endpoint could serve a request within 0\.3s"):
        client.get("/k")
    assert "etcd unavailable" in client.problem and "majority" in client.problem
    callers: list[str] = []  # the thread of each request the client makes
    urlopen = etcdclient.urllib.request.urlopen

    def counted(*args: Any, **kwargs: Any) -> Any:
        callers.append(threading.current_thread().name)
        return urlopen(*args, **kwargs)

    monkeypatch.setattr(etcdclient.urllib.request, "urlopen", counted)
    for _ in range(3):
        with pytest.raises(EtcdError, match="etcd unavailable"):
            client.get("/k")
    wait_until(lambda: len(callers) >= 2, 10, "the probe to ask etcd twice")
    assert set(callers) == {"etcd-probe"}, callers  # the calls failed without a request
    assert client.problem
    etcd.script = [(200, {"kvs": []})]
    wait_until(lambda: client.problem == "", 10, "the probe to find etcd back")
    assert client.get("/k") == (None, 0)


def test_a_request_etcd_refuses_is_an_error_not_an_outage(etcd: FakeEtcd) -> None:
    etcd.script = [(400, {"error": "etcdserver: too many operations in txn request"})]
    client = EtcdClient([etcd.url], timeout=1, wait=5)
    with pytest.raises(EtcdError, match=r"HTTP 400 .*too many operations"):
        client.txn([{"request_put": {"key": "a", "value": "b"}}])
    assert len(etcd.requests) == 1 and client.problem == ""
