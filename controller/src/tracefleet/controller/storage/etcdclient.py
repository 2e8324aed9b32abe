"""etcd v3 through its JSON gateway (``POST /v3/kv/...``, ``/v3/watch``), with the standard
library: no client library to keep maintained. One job: requests to the members, with the
availability the controller acts on (``problem``), and the watch of one key. What the
documents hold is the store's (etcdstore.py).

Errors are ``EtcdError``, a ``sqlite3.OperationalError``: the controller's store-failure
paths apply unchanged."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("tracefleet.controller.etcd")

TXN_OPS = 100  # etcd refuses a transaction of more than 128 operations (--max-txn-ops)
WATCH_IDLE = 5.0  # seconds a watch may stay quiet before it is made again (see watch())


class EtcdError(sqlite3.OperationalError):
    """etcd cannot be reached or refused a request."""


class _Unavailable(Exception):
    """No endpoint could serve a call (internal: raised to callers as EtcdError)."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _value_rev(kvs: list[dict[str, Any]]) -> tuple[str | None, int]:
    """(value, mod_revision) of a range's first key; (None, 0) if there is none."""
    if not kvs:
        return None, 0
    return _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])


def _prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


PROBE_EVERY = 1.0  # seconds between checks of an unavailable etcd
RETRY_GAP = 0.2  # seconds between rounds over the endpoints while none can serve a call
UNAVAILABLE_ADVICE = (
    "check that a majority of the etcd members answer (etcdctl endpoint health --cluster)"
)
# etcd answers at once "no leader" (503) from a member cut off from its quorum, instead of
# holding the request until its own timeout (7 s); a watch on such a member is cancelled,
# and taken up on another
HEADERS = {"Content-Type": "application/json", "Grpc-Metadata-hasleader": "true"}


class EtcdClient:
    """etcd v3 over its JSON gateway; tries the endpoints in turn.

    Calls block their caller (the controller's event loop). A call rides through a leader
    election (members answer "no leader" for a second or two) by going round the endpoints
    again for up to ``wait`` seconds. When etcd still cannot serve it (no quorum, members
    unreachable) the client is *unavailable*: the outage costs that one wait, not one per
    call, as every later call fails at once while a thread probes etcd with a quorum read
    every PROBE_EVERY seconds and makes it available again when one succeeds. Both
    transitions are logged once."""

    def __init__(self, endpoints: Iterable[str], timeout: float = 3.0, wait: float = 5.0) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints if e.strip()]
        if not self.endpoints:
            raise ValueError("no etcd endpoint: pass --etcd http://HOST:2379[,http://...]")
        for e in self.endpoints:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"etcd endpoint {e!r}: use http://HOST:PORT")
        self.timeout = timeout  # one request to one member
        self.wait = wait  # one call, over every endpoint and round
        self._next = 0
        self._lock = threading.Lock()
        self._down: tuple[float, str] | None = None  # (since, why) while unavailable

    @property
    def problem(self) -> str:
        """Why etcd cannot serve this client now, with what to check; "" while it can."""
        down = self._down
        if down is None:
            return ""
        return (
            f"etcd unavailable for {time.monotonic() - down[0]:.0f}s ({down[1]}); "
            + UNAVAILABLE_ADVICE
        )

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        problem = self.problem
        if problem:
            raise EtcdError(problem)
        try:
            return self._call(path, body, self.wait)
        except _Unavailable as e:
            self._went_down(str(e))
            raise EtcdError(f"{e}; {UNAVAILABLE_ADVICE}") from None

    def _call(self, path: str, body: dict[str, Any], wait: float) -> dict[str, Any]:
        data = json.dumps(body).encode()
        deadline = time.monotonic() + wait
        n = len(self.endpoints)
        errors: list[str] = []  # the last n name the last round tried
        while True:
            for i in range(n):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                endpoint = self.endpoints[(self._next + i) % n]
                req = urllib.request.Request(
                    f"{endpoint}{path}", data=data, method="POST", headers=HEADERS
                )
                try:
                    with urllib.request.urlopen(req, timeout=min(self.timeout, remaining)) as r:
                        out: dict[str, Any] = json.loads(r.read())
                except urllib.error.HTTPError as e:  # etcd answered
                    detail = e.read()[:300].decode(errors="replace")
                    if e.code in (502, 503, 504):  # no leader, timed out: another may serve
                        errors.append(f"{endpoint}: HTTP {e.code} {detail}")
                        continue
                    raise EtcdError(f"etcd {endpoint}{path}: HTTP {e.code} {detail}") from None
                except (OSError, ValueError) as e:
                    errors.append(f"{endpoint}: {e}")
                    continue
                self._next = (self._next + i) % n
                return out
            if deadline - time.monotonic() <= RETRY_GAP:
                raise _Unavailable(
                    f"no etcd endpoint could serve a request within {wait:g}s ("
                    + "; ".join(errors[-n:])
                    + ")"
                )
            time.sleep(RETRY_GAP)

    def _went_down(self, why: str) -> None:
        with self._lock:
            if self._down is not None:
                return
            self._down = (time.monotonic(), why)
        log.warning(
            "etcd unavailable (%s): changes of event sets are refused, agents keep their "
            "last state and their result batches wait unacknowledged; %s. Checking again "
            "every %.0f s", why, UNAVAILABLE_ADVICE, PROBE_EVERY,
        )  # fmt: skip
        threading.Thread(target=self._probe, name="etcd-probe", daemon=True).start()

    def _probe(self) -> None:
        # a linearizable read needs the quorum, as a write does
        body = {"key": b64("/tracefleet-probe")}
        while True:
            time.sleep(PROBE_EVERY)
            try:
                self._call("/v3/kv/range", body, self.timeout)
            except (_Unavailable, EtcdError):
                continue
            with self._lock:
                down, self._down = self._down, None
            if down is not None:
                log.warning("etcd available again after %.1f s", time.monotonic() - down[0])
            return

    def get(self, key: str) -> tuple[str | None, int]:
        """(value, mod_revision) of ``key``; (None, 0) if absent."""
        return _value_rev(self.call("/v3/kv/range", {"key": b64(key)}).get("kvs") or [])

    def get_many(self, keys: list[str]) -> list[tuple[str | None, int]]:
        """get() of each key, TXN_OPS keys a request (a read-only transaction)."""
        out: list[tuple[str | None, int]] = []
        for i in range(0, len(keys), TXN_OPS):
            chunk = keys[i : i + TXN_OPS]
            ops = [{"request_range": {"key": b64(k)}} for k in chunk]
            responses = self.call("/v3/kv/txn", {"success": ops}).get("responses") or []
            if len(responses) != len(chunk):
                raise EtcdError(f"etcd answered {len(responses)} reads of {len(chunk)}")
            out += [_value_rev((r.get("response_range") or {}).get("kvs") or [])
                    for r in responses]  # fmt: skip
        return out

    def range_prefix(self, prefix: str) -> list[tuple[str, str, int]]:
        """(key, value, mod_revision) of every key under ``prefix``."""
        body = {"key": b64(prefix), "range_end": _prefix_end(prefix)}
        kvs = self.call("/v3/kv/range", body).get("kvs") or []
        return [
            (_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv["mod_revision"])) for kv in kvs
        ]

    def put_all_if(self, puts: list[tuple[str, str, int]]) -> int | None:
        """Put every (key, value) if every key is still at its mod_revision (0: absent), in
        one transaction; the revision written, or None if any key had changed."""
        body = {
            "compare": [
                {"key": b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}
                for k, _, rev in puts
            ],
            "success": [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v, _ in puts],
        }
        out = self.call("/v3/kv/txn", body)
        return int(out["header"]["revision"]) if out.get("succeeded") else None

    def put_if(self, key: str, value: str, mod_revision: int) -> bool:
        """Put ``value`` if ``key`` is still at ``mod_revision`` (0: absent)."""
        body = {
            "compare": [
                {"key": b64(key), "target": "MOD", "result": "EQUAL",
                 "mod_revision": str(mod_revision)}
            ],
            "success": [{"request_put": {"key": b64(key), "value": b64(value)}}],
        }  # fmt: skip
        return bool(self.call("/v3/kv/txn", body).get("succeeded"))

    def txn(self, ops: list[dict[str, Any]]) -> None:
        for i in range(0, len(ops), TXN_OPS):
            self.call("/v3/kv/txn", {"success": ops[i : i + TXN_OPS]})

    def watch(
        self, key: str, start_revision: int, on_value: Callable[[str, int], None],
        stop: threading.Event,
    ) -> None:  # fmt: skip
        """Call on_value(value, mod_revision) for every put of ``key`` from start_revision on,
        until ``stop``; reconnects (to the next endpoint) after a failure.

        A member can hang with the stream open (its process stopped, its host gone without a
        reset): a watch quiet for WATCH_IDLE seconds is made again on the same member, which
        must answer within WATCH_IDLE or the watch moves to the next one. A watch from a
        revision etcd has compacted is cancelled by etcd: the key is read, its value handed
        over if it changed since, and watched from there."""
        revision = start_revision
        failures = 0  # in a row: logged at the 1st, 2nd, 4th, ... (an outage may be long)
        while not stop.is_set():
            endpoint = self.endpoints[self._next % len(self.endpoints)]
            body = {"create_request": {"key": b64(key), "start_revision": str(revision)}}
            req = urllib.request.Request(
                f"{endpoint}/v3/watch", data=json.dumps(body).encode(), method="POST",
                headers=HEADERS,
            )  # fmt: skip
            created = False
            why: Exception | None = None
            try:
                with urllib.request.urlopen(req, timeout=WATCH_IDLE) as resp:
                    for line in resp:
                        if stop.is_set():
                            return
                        msg = json.loads(line)
                        result = msg.get("result") or {}
                        compacted = int(result.get("compact_revision") or 0)
                        if compacted and result.get("canceled"):
                            revision = self._catch_up(key, revision, compacted, on_value)
                            break
                        if "error" in msg or result.get("canceled"):  # e.g. no leader
                            reason = msg.get("error") or result.get("cancel_reason")
                            raise ValueError(f"watch ended by etcd: {reason}")
                        created = True
                        failures = 0
                        for ev in result.get("events") or []:
                            kv = ev.get("kv") or {}
                            if ev.get("type") == "DELETE" or "value" not in kv:
                                continue
                            revision = int(kv["mod_revision"]) + 1
                            on_value(_unb64(kv["value"]), int(kv["mod_revision"]))
                    else:
                        raise ValueError("the member closed the watch")
                continue  # compacted: watched again from the revision read
            except TimeoutError as e:
                if created:
                    continue  # quiet for WATCH_IDLE: made again here, to learn it answers
                why = e
            except (OSError, ValueError, EtcdError) as e:
                why = e
            except Exception:
                log.exception("etcd watch of %s: a change could not be applied", key)
            if stop.is_set():
                return
            if why is not None:
                failures += 1
                if failures & (failures - 1) == 0:
                    log.warning("etcd watch of %s on %s: %s; watching again (%d time(s) in a "
                                "row)", key, endpoint, why, failures)  # fmt: skip
            self._next += 1
            stop.wait(0.5)

    def _catch_up(
        self, key: str, revision: int, compacted: int, on_value: Callable[[str, int], None]
    ) -> int:
        """After etcd compacted past ``revision``: hand over the key's value if it changed
        since, and return the revision to watch from."""
        value, mod = self.get(key)
        log.warning("etcd watch of %s: revision %d was compacted (now %d); read the key "
                    "again", key, revision, compacted)  # fmt: skip
        if value is not None and mod >= revision:
            on_value(value, mod)
            return max(mod + 1, compacted)
        return max(revision, compacted)
