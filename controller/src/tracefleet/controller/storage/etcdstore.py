"""Desired state and node registry in etcd, shared by controller replicas (a first slice).

Talks to etcd through ``EtcdClient`` (etcdclient.py). The fleet generation and every rule
are one document (``PREFIX/desired``), changed only by compare-and-swap on its revision, so
two replicas never issue the same generation and a rule is never seen without its
generation; each node's record is ``PREFIX/nodes/NAME``. A watch on the document hands every
change to the controller (``Controller.take_shared``), which pushes it to its own agents.

The ledger of result batches (exactly-once totals and the batch cursors of each agent
instance) is one document per node (``PREFIX/ledger/NODE``: its totals and cursors together,
so a cursor never moves without its counts), written by compare-and-swap on the revision this
replica last read or wrote. A node that registers has its document read again
(``node_ledgers``): the batches its previous replica committed are then duplicates here, so an
agent moving between replicas is counted exactly once; a document another replica changed
since is not overwritten (``put_ledger`` returns the node, the controller re-reads it and
makes the agent resend).

Errors are ``EtcdError``, a ``sqlite3.OperationalError``: the controller's store-failure paths
(refuse to enable, apply a disable in memory and save it later) apply unchanged.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.etcdclient import (
    TXN_OPS,
    EtcdClient,
    EtcdError,
    b64,
)
from tracefleet.controller.storage.store import LedgerRows, NodeRecord, Store, StoreError
from tracefleet.model.filters import Filters

CAS_ATTEMPTS = 20


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
            key = b64(f"{self.prefix}/nodes/{n.name}")
            ops.append({"request_put": {"key": key, "value": b64(value)}})
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
            {"request_delete_range": {"key": b64(f"{self.prefix}/{kind}/{n}")}}
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

    def node_ledgers(self, names: list[str]) -> dict[str, LedgerRows]:
        """Read in one request per TXN_OPS nodes: a mass failover registers many at once."""
        docs = self.client.get_many([self._ledger_key(n) for n in names])
        return {n: self._take_doc(n, *doc) for n, doc in zip(names, docs, strict=True)}

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
