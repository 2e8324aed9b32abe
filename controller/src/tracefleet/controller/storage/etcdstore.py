"""Desired state and node registry in etcd, shared by controller replicas (a first slice).

Talks to etcd v3 through its JSON gateway (``POST /v3/kv/...``, ``/v3/watch``) with the
standard library: no client library to keep maintained. The fleet generation and every rule
are one document (``PREFIX/desired``), changed only by compare-and-swap on its revision, so
two replicas never issue the same generation and a rule is never seen without its
generation; each node's record is ``PREFIX/nodes/NAME``. A watch on the document hands every
change to the controller (``Controller.take_shared``), which pushes it to its own agents.

The ledger of result batches (exactly-once totals and the batch cursors of each agent
instance) is one document per node (``PREFIX/ledger/NODE``: its totals and cursors together,
so a cursor never moves without its counts), written by compare-and-swap on the revision this
replica last read or wrote. A node that registers has its document read again
(``node_ledger``): the batches its previous replica committed are then duplicates here, so an
agent moving between replicas is counted exactly once; a document another replica changed
since is not overwritten (``put_ledger`` returns the node, the controller re-reads it and
makes the agent resend).

Errors are ``EtcdError``, a ``sqlite3.OperationalError``: the controller's store-failure paths
(refuse to enable, apply a disable in memory and save it later) apply unchanged.
"""

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

from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.store import LedgerRows, NodeRecord, Store, StoreError
from tracefleet.model.filters import Filters

log = logging.getLogger("tracefleet.controller.etcd")

TXN_OPS = 100  # etcd refuses a transaction of more than 128 operations (--max-txn-ops)
CAS_ATTEMPTS = 20


class EtcdError(sqlite3.OperationalError):
    """etcd cannot be reached or refused a request."""


class _Unavailable(Exception):
    """No endpoint could serve a call (internal: raised to callers as EtcdError)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


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
        while True:
            errors = []  # of this round
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
                    + "; ".join(errors)
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
        body = {"key": _b64("/tracefleet-probe")}
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
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        if not kvs:
            return None, 0
        return _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])

    def range_prefix(self, prefix: str) -> list[tuple[str, str, int]]:
        """(key, value, mod_revision) of every key under ``prefix``."""
        body = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        kvs = self.call("/v3/kv/range", body).get("kvs") or []
        return [
            (_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv["mod_revision"])) for kv in kvs
        ]

    def put_all_if(self, puts: list[tuple[str, str, int]]) -> int | None:
        """Put every (key, value) if every key is still at its mod_revision (0: absent), in
        one transaction; the revision written, or None if any key had changed."""
        body = {
            "compare": [
                {"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}
                for k, _, rev in puts
            ],
            "success": [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v, _ in puts],
        }
        out = self.call("/v3/kv/txn", body)
        return int(out["header"]["revision"]) if out.get("succeeded") else None

    def put_if(self, key: str, value: str, mod_revision: int) -> bool:
        """Put ``value`` if ``key`` is still at ``mod_revision`` (0: absent)."""
        body = {
            "compare": [
                {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                 "mod_revision": str(mod_revision)}
            ],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
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
        until ``stop``; reconnects (to the next endpoint) after a failure."""
        revision = start_revision
        failures = 0  # in a row: logged at the 1st, 2nd, 4th, ... (an outage may be long)
        while not stop.is_set():
            endpoint = self.endpoints[self._next % len(self.endpoints)]
            body = {"create_request": {"key": _b64(key), "start_revision": str(revision)}}
            req = urllib.request.Request(
                f"{endpoint}/v3/watch", data=json.dumps(body).encode(), method="POST",
                headers=HEADERS,
            )  # fmt: skip
            try:
                # no read timeout: the stream is quiet until something changes
                with urllib.request.urlopen(req, timeout=None) as resp:
                    for line in resp:
                        if stop.is_set():
                            return
                        msg = json.loads(line)
                        result = msg.get("result") or {}
                        if "error" in msg or result.get("canceled"):  # e.g. no leader
                            reason = msg.get("error") or result.get("cancel_reason")
                            raise ValueError(f"watch ended by etcd: {reason}")
                        failures = 0
                        for ev in result.get("events") or []:
                            kv = ev.get("kv") or {}
                            if ev.get("type") == "DELETE" or "value" not in kv:
                                continue
                            revision = int(kv["mod_revision"]) + 1
                            on_value(_unb64(kv["value"]), int(kv["mod_revision"]))
            except (OSError, ValueError) as e:
                failures += 1
                if failures & (failures - 1) == 0:
                    log.warning("etcd watch of %s on %s: %s; watching again (%d time(s) in a "
                                "row)", key, endpoint, e, failures)  # fmt: skip
            except Exception:
                log.exception("etcd watch of %s: a change could not be applied", key)
            self._next += 1
            stop.wait(0.5)


def _rule_dict(r: Rule) -> dict[str, Any]:
    return {
        "event_set": r.event_set,
        "enabled": r.enabled,
        "selector": r.selector,
        "filters": r.filters.to_json(),
        "canary_percent": r.canary_percent,
        "sample_rate": r.sample_rate,
        "expires_at": r.expires_at,
        "expired": r.expired,
        "generation": r.generation,
        "export": list(r.export),
    }


def _rule(d: dict[str, Any]) -> Rule:
    return Rule(
        event_set=str(d["event_set"]),
        enabled=bool(d["enabled"]),
        selector=str(d["selector"]),
        filters=Filters.from_json(d["filters"]),
        canary_percent=int(d["canary_percent"]),
        sample_rate=float(d["sample_rate"]),
        expires_at=None if d["expires_at"] is None else float(d["expires_at"]),
        expired=bool(d["expired"]),
        generation=int(d["generation"]),
        export=tuple(str(n) for n in d["export"]),
    )


def parse_desired(text: str | None) -> tuple[int, list[Rule]]:
    if not text:
        return 0, []
    doc = json.loads(text)
    return int(doc["generation"]), [_rule(r) for r in doc["rules"]]


def _doc_rows(node: str, doc: dict[str, Any]) -> LedgerRows:
    """A node's ledger document as the rows Ledger loads."""
    applied, duplicate, discarded = (int(x) for x in doc["batches"])
    return LedgerRows(
        set_totals=[
            (node, name, *(int(c) for c in counts)) for name, counts in sorted(doc["sets"].items())
        ],
        node_batches=[(node, applied, duplicate, discarded)],
        cursors=[
            (node, inst, int(seq), float(updated))
            for inst, (seq, updated) in sorted(doc.get("cursors", {}).items())
        ],
    )


class EtcdStore:
    """The Store interface: desired state and nodes in etcd, the ledger in ``local``."""

    shared = True  # with other replicas: a change not saved here would reach only this one's

    @property
    def problem(self) -> str:
        return self.client.problem

    def __init__(self, client: EtcdClient, prefix: str, local: Store) -> None:
        self.client = client
        self.prefix = "/" + prefix.strip("/")
        self.local = local
        self.path = f"etcd {','.join(client.endpoints)} {self.prefix} (ledger: {local.path})"
        self._desired_key = f"{self.prefix}/desired"
        # the ledger documents as this replica last read or wrote them, and their revisions
        self._ledger_docs: dict[str, dict[str, Any]] = {}
        self._ledger_revs: dict[str, int] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            self._read()
        except (EtcdError, ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"cannot use etcd at {', '.join(client.endpoints)}: {e}. Fix: start etcd or "
                "correct --etcd"
            ) from None

    def close(self) -> None:
        self._stop.set()
        self.local.close()

    # desired state ----------------------------------------------------------------------

    def _read(self) -> tuple[int, list[Rule], int]:
        text, revision = self.client.get(self._desired_key)
        gen, rules = parse_desired(text)
        return gen, rules, revision

    def _change(self, fn: Callable[[int, dict[str, Rule]], int]) -> int:
        """Read-modify-write of the desired document: fn(generation, rules by set) changes
        the rules in place and returns the new generation; retried when another replica
        wrote in between."""
        for _ in range(CAS_ATTEMPTS):
            gen, rules, revision = self._read()
            by_set = {r.event_set: r for r in rules}
            new_gen = fn(gen, by_set)
            doc = {
                "generation": new_gen,
                "rules": [_rule_dict(r) for _, r in sorted(by_set.items())],
            }
            if self.client.put_if(self._desired_key, json.dumps(doc, sort_keys=True), revision):
                return new_gen
        raise EtcdError(f"{self._desired_key}: {CAS_ATTEMPTS} concurrent writers in a row")

    def generation(self) -> int:
        return self._read()[0]

    def rules(self) -> list[Rule]:
        return self._read()[1]

    def put_rules(self, rules: Iterable[Rule], after: int = 0) -> tuple[int, list[Rule]]:
        todo = list(rules)
        stored: list[Rule] = []

        def fn(gen: int, by_set: dict[str, Rule]) -> int:
            new_gen = max(gen, after) + 1
            stored[:] = [r.with_changes(generation=new_gen) for r in todo]
            by_set.update((r.event_set, r) for r in stored)
            return new_gen

        return self._change(fn), stored

    def save_rules(self, rules: Iterable[Rule], generation: int) -> None:
        todo = list(rules)

        def fn(gen: int, by_set: dict[str, Rule]) -> int:
            by_set.update((r.event_set, r) for r in todo)
            return max(gen, generation)

        self._change(fn)

    def update_expiry(self, event_set: str, expires_at: float | None) -> None:
        def fn(gen: int, by_set: dict[str, Rule]) -> int:
            if event_set in by_set:
                by_set[event_set] = by_set[event_set].with_changes(expires_at=expires_at)
            return gen

        self._change(fn)

    def ensure_generation_above(self, n: int) -> int:
        return self._change(lambda gen, _: max(gen, n + 1))

    def watch(self, on_change: Callable[[int, list[Rule]], None]) -> None:
        """Call on_change(generation, rules) from a thread for every change of the desired
        state after now (by this replica or another)."""
        _, _, revision = self._read()

        def on_value(text: str, _revision: int) -> None:
            on_change(*parse_desired(text))

        self._watcher = threading.Thread(
            target=self.client.watch,
            args=(self._desired_key, revision + 1, on_value, self._stop),
            name="etcd-watch",
            daemon=True,
        )
        self._watcher.start()

    # nodes ------------------------------------------------------------------------------

    def put_nodes(self, nodes: Iterable[NodeRecord]) -> None:
        ops = []
        for n in nodes:
            value = json.dumps(
                {
                    "labels": n.labels,
                    "kernel_version": n.kernel_version,
                    "agent_version": n.agent_version,
                    "info": n.info,
                    "applied_generation": n.applied_generation,
                    "last_seen": n.last_seen,
                },
                sort_keys=True,
            )
            key = _b64(f"{self.prefix}/nodes/{n.name}")
            ops.append({"request_put": {"key": key, "value": _b64(value)}})
        self.client.txn(ops)

    def nodes(self) -> list[NodeRecord]:
        out = []
        base = f"{self.prefix}/nodes/"
        for key, value, _ in self.client.range_prefix(base):
            d = json.loads(value)
            out.append(
                NodeRecord(
                    key[len(base) :],
                    dict(d["labels"]),
                    str(d["kernel_version"]),
                    str(d["agent_version"]),
                    dict(d["info"]),
                    int(d["applied_generation"]),
                    float(d["last_seen"]),
                )
            )
        return sorted(out, key=lambda r: r.name)

    def delete_nodes(self, names: Iterable[str]) -> None:
        names = list(names)
        ops = [
            {"request_delete_range": {"key": _b64(f"{self.prefix}/{kind}/{n}")}}
            for n in names
            for kind in ("nodes", "ledger")
        ]
        self.client.txn(ops)
        for n in names:
            self._ledger_docs.pop(n, None)
            self._ledger_revs.pop(n, None)
        self.local.delete_nodes(names)

    # ledger -----------------------------------------------------------------------------

    def _ledger_key(self, node: str) -> str:
        return f"{self.prefix}/ledger/{node}"

    def _take_doc(self, node: str, text: str | None, revision: int) -> LedgerRows:
        doc = json.loads(text) if text else {"sets": {}, "batches": [0, 0, 0], "cursors": {}}
        self._ledger_docs[node] = doc
        self._ledger_revs[node] = revision
        return _doc_rows(node, doc)

    def ledger(self) -> LedgerRows:
        rows = LedgerRows()
        base = f"{self.prefix}/ledger/"
        for key, value, revision in self.client.range_prefix(base):
            one = self._take_doc(key[len(base) :], value, revision)
            rows.set_totals += one.set_totals
            rows.node_batches += one.node_batches
            rows.cursors += one.cursors
        return rows

    def node_ledger(self, name: str) -> LedgerRows:
        return self._take_doc(name, *self.client.get(self._ledger_key(name)))

    def put_ledger(self, rows: LedgerRows) -> set[str]:
        """Write the changed nodes' documents, each only if no other replica changed it
        since this one read or wrote it; returns the nodes not written (their documents
        are read again: what the controller applied to them must not be acknowledged)."""
        docs: dict[str, dict[str, Any]] = {}

        def doc(node: str) -> dict[str, Any]:
            d = docs.get(node)
            if d is None:
                old = self._ledger_docs.get(node) or {"sets": {}, "batches": [0, 0, 0]}
                d = docs[node] = {
                    "sets": dict(old["sets"]),
                    "batches": list(old["batches"]),
                    "cursors": dict(old.get("cursors", {})),
                }
            return d

        for node, event_set, *counts in rows.set_totals:
            doc(node)["sets"][event_set] = [int(c) for c in counts]
        for node, applied, duplicate, discarded in rows.node_batches:
            doc(node)["batches"] = [applied, duplicate, discarded]
        for node, instance, seq, updated in rows.cursors:
            doc(node)["cursors"][instance] = [seq, updated]
        for node, instance in rows.dropped_cursors:
            doc(node)["cursors"].pop(instance, None)
        conflicts: set[str] = set()
        names = sorted(docs)
        per_txn = TXN_OPS // 2  # a compare and a put per node
        for i in range(0, len(names), per_txn):
            chunk = names[i : i + per_txn]
            if self._put_docs(chunk, docs):
                continue
            for node in chunk:  # which of them changed: the others are written alone
                if len(chunk) == 1 or not self._put_docs([node], docs):
                    conflicts.add(node)
        return conflicts

    def _put_docs(self, nodes: list[str], docs: dict[str, dict[str, Any]]) -> bool:
        puts = [
            (self._ledger_key(n), json.dumps(docs[n], sort_keys=True), self._ledger_revs.get(n, 0))
            for n in nodes
        ]
        revision = self.client.put_all_if(puts)
        if revision is None:
            return False
        for n in nodes:
            self._ledger_docs[n] = docs[n]
            self._ledger_revs[n] = revision
        return True

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"EtcdStore has no {name!r} (a Store method it does not carry)")
