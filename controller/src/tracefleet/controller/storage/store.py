"""Durable desired state: the fleet generation, the rules, and what nodes last reported;
and the ledger of result batches: totals per node and event set, and the last batch applied
per agent instance, written in one transaction so a batch is counted exactly once.

SQLite (one file, WAL). Every rule change bumps the generation in the same transaction, so the
generation is monotonic across restarts and a rule is never seen without its generation.
``:memory:`` gives a throw-away store for tests. Schema 1 (before the ledger) is upgraded in
place.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tracefleet.controller.domain.rules import Rule
from tracefleet.model.filters import Filters

_SCHEMA_VERSION = 2
# set_totals' call accounting columns (ledger.SetCounts' fields after delivered, dropped,
# discarded), added in place to older databases; then the program runs the kernel skipped
SET_ACCOUNTING = ("passed", "lost", "lost_inflight_full", "lost_inflight_stale", "lost_deleted",
                  "prefix_filtered", "decode_errors", "kernel_missed_entry",
                  "kernel_missed_exit")  # fmt: skip
_SET_COLUMNS = ", ".join(("node", "event_set", "delivered", "dropped", "discarded",
                          *SET_ACCOUNTING))  # fmt: skip
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rules (
    event_set TEXT PRIMARY KEY,
    enabled INTEGER NOT NULL,
    selector TEXT NOT NULL,
    filters TEXT NOT NULL,
    canary_percent INTEGER NOT NULL,
    sample_rate REAL NOT NULL,
    expires_at REAL,
    expired INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    export TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    kernel_version TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    info TEXT NOT NULL,
    applied_generation INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS set_totals (
    node TEXT NOT NULL,
    event_set TEXT NOT NULL,
    delivered INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    discarded INTEGER NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    lost_inflight_full INTEGER NOT NULL DEFAULT 0,
    lost_inflight_stale INTEGER NOT NULL DEFAULT 0,
    lost_deleted INTEGER NOT NULL DEFAULT 0,
    prefix_filtered INTEGER NOT NULL DEFAULT 0,
    decode_errors INTEGER NOT NULL DEFAULT 0,
    kernel_missed_entry INTEGER NOT NULL DEFAULT 0,
    kernel_missed_exit INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node, event_set)
);
CREATE TABLE IF NOT EXISTS node_batches (
    node TEXT PRIMARY KEY,
    applied INTEGER NOT NULL,
    duplicate INTEGER NOT NULL,
    discarded INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_cursors (
    node TEXT NOT NULL,
    instance TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (node, instance)
);
"""


@dataclass
class NodeRecord:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    kernel_version: str = ""
    agent_version: str = ""
    # strategies, event sets, statuses: what the node last reported, JSON-ready
    info: dict[str, Any] = field(default_factory=dict)
    applied_generation: int = 0
    last_seen: float = 0.0  # unix seconds
    # json.dumps(info, sort_keys=True) when the caller has it already ("": encoded here)
    info_json: str = ""
    # json.dumps(labels, sort_keys=True) when the caller has it already ("": encoded here)
    labels_json: str = ""


@dataclass
class LedgerRows:
    """What the ledger writes in one transaction (absolute values, not increments)."""

    # (node, event_set, delivered, dropped, discarded, *SET_ACCOUNTING)
    set_totals: list[tuple[Any, ...]] = field(default_factory=list)
    # (node, applied, duplicate, discarded batches)
    node_batches: list[tuple[str, int, int, int]] = field(default_factory=list)
    # (node, instance, seq, updated)
    cursors: list[tuple[str, str, int, float]] = field(default_factory=list)
    # (node, instance) no longer kept
    dropped_cursors: list[tuple[str, str]] = field(default_factory=list)


class StoreError(RuntimeError):
    pass


def corrupt(path: str, why: str) -> StoreError:
    return StoreError(
        f"the database {path} is damaged ({why}). Fix: stop the controller, move the file "
        f"aside (mv {path} {path}.damaged; also its -wal and -shm files) and start again: it "
        "starts empty (agents re-register; enable the event sets again), or restore a backup"
    )


class Store:
    # one controller's own file: a change it cannot save may still narrow tracing at once
    # (a disable, applied now and saved later); a shared store refuses every change instead
    shared = False
    problem = ""  # why it cannot be written now; a file's failures are per write (disk full)

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {parent} for the database: {e}") from e
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as e:
            raise StoreError(f"cannot open the database {path}: {e}") from e
        except sqlite3.DatabaseError as e:  # not a database, or a damaged one
            raise corrupt(path, str(e)) from None
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version in (0, 1):  # new, or before the ledger (its tables were just created)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        elif version != _SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}, this controller knows {_SCHEMA_VERSION}"
            )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(rules)")}
        if "export" not in columns:  # a database from before per-rule export
            self._db.execute("ALTER TABLE rules ADD COLUMN export TEXT NOT NULL DEFAULT '[]'")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(set_totals)")}
        for col in SET_ACCOUNTING:  # a database from before the call accounting
            if col not in columns:
                self._db.execute(
                    f"ALTER TABLE set_totals ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0"
                )
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', 0)")
        try:
            self._check()
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise corrupt(path, f"{type(e).__name__}: {e}"[:300]) from None

    def _check(self) -> None:
        """Read everything once: a damaged page or a bad JSON value fails here, at start-up,
        and not later in the middle of serving."""
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(map(str, problems)))
        self.rules()
        self.nodes()
        self.ledger()

    def close(self) -> None:
        self._db.close()

    # generation -------------------------------------------------------------------------

    def generation(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def _bump(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
        return self.generation()

    def ensure_generation_above(self, n: int) -> int:
        """Make the generation > n (an agent applied n from a controller whose database was
        lost); returns the generation."""
        with self._tx():
            if self.generation() <= n:
                self._db.execute("UPDATE meta SET value = ? WHERE key='generation'", (n + 1,))
            return self.generation()

    # rules ------------------------------------------------------------------------------

    def save_rules(self, rules: Iterable[Rule], generation: int) -> None:
        """Store rules that already carry their generation (applied in memory while the
        database could not be written); the stored generation becomes at least that."""
        with self._tx():
            self._db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key='generation'", (generation,)
            )
            for r in rules:
                self._write_rule(r)

    def put_rules(self, rules: Iterable[Rule], after: int = 0) -> tuple[int, list[Rule]]:
        """Store rules under one new generation, above ``after`` too (the controller's
        generation may be ahead of the store's after a write failed); returns it and the
        stored rules."""
        with self._tx():
            self._db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key='generation'", (after,)
            )
            gen = self._bump()
            stored = [r.with_changes(generation=gen) for r in rules]
            for r in stored:
                self._write_rule(r)
        return gen, stored

    def update_expiry(self, event_set: str, expires_at: float | None) -> None:
        """Restart a rule's TTL without changing any node's desired state (no new
        generation)."""
        with self._tx():
            self._db.execute(
                "UPDATE rules SET expires_at = ? WHERE event_set = ?", (expires_at, event_set)
            )

    def rules(self) -> list[Rule]:
        rows = self._db.execute(
            "SELECT event_set, enabled, selector, filters, canary_percent, sample_rate,"
            " expires_at, expired, generation, export FROM rules ORDER BY event_set"
        ).fetchall()
        return [
            Rule(
                event_set=row[0],
                enabled=bool(row[1]),
                selector=row[2],
                filters=Filters.from_json(json.loads(row[3])),
                canary_percent=int(row[4]),
                sample_rate=float(row[5]),
                expires_at=row[6],
                expired=bool(row[7]),
                generation=int(row[8]),
                export=tuple(str(n) for n in json.loads(row[9])),
            )
            for row in rows
        ]

    def _write_rule(self, r: Rule) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO rules (event_set, enabled, selector, filters, canary_percent,"
            " sample_rate, expires_at, expired, generation, export)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.event_set,
                int(r.enabled),
                r.selector,
                json.dumps(r.filters.to_json(), sort_keys=True),
                r.canary_percent,
                r.sample_rate,
                r.expires_at,
                int(r.expired),
                r.generation,
                json.dumps(list(r.export)),
            ),
        )

    # nodes ------------------------------------------------------------------------------

    def put_nodes(self, nodes: Iterable[NodeRecord]) -> None:
        with self._tx():
            self._db.executemany(
                "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        n.name,
                        n.labels_json or json.dumps(n.labels, sort_keys=True),
                        n.kernel_version,
                        n.agent_version,
                        n.info_json or json.dumps(n.info, sort_keys=True),
                        n.applied_generation,
                        n.last_seen,
                    )
                    for n in nodes
                ],
            )

    def nodes(self) -> list[NodeRecord]:
        rows = self._db.execute(
            "SELECT name, labels, kernel_version, agent_version, info, applied_generation,"
            " last_seen FROM nodes ORDER BY name"
        ).fetchall()
        return [
            NodeRecord(
                name=row[0],
                labels=json.loads(row[1]),
                kernel_version=row[2],
                agent_version=row[3],
                info=json.loads(row[4]),
                applied_generation=int(row[5]),
                last_seen=float(row[6]),
            )
            for row in rows
        ]

    def delete_nodes(self, names: Iterable[str]) -> None:
        """Forget nodes: their record, totals and batch cursors (one transaction)."""
        rows = [(n,) for n in names]
        with self._tx():
            for table in ("nodes", "set_totals", "node_batches", "batch_cursors"):
                key = "name" if table == "nodes" else "node"
                self._db.executemany(f"DELETE FROM {table} WHERE {key} = ?", rows)

    # ledger -----------------------------------------------------------------------------

    def put_ledger(self, rows: LedgerRows) -> set[str]:
        """Write the ledger's changed rows in one transaction (durable on return). Returns
        the nodes whose rows were not written because another writer changed them (never,
        here: this process is the only writer of its file; see EtcdStore)."""
        db = self._db
        with self._tx():
            db.executemany(
                f"INSERT OR REPLACE INTO set_totals ({_SET_COLUMNS}) "
                f"VALUES ({', '.join('?' * len(_SET_COLUMNS.split(',')))})",
                rows.set_totals,
            )
            db.executemany(
                "INSERT OR REPLACE INTO node_batches VALUES (?, ?, ?, ?)", rows.node_batches
            )
            db.executemany("INSERT OR REPLACE INTO batch_cursors VALUES (?, ?, ?, ?)", rows.cursors)
            db.executemany(
                "DELETE FROM batch_cursors WHERE node = ? AND instance = ?", rows.dropped_cursors
            )
        return set()

    def node_ledgers(self, names: list[str]) -> dict[str, LedgerRows]:
        """Nodes' ledgers as another writer may have left them (none here: nobody else
        writes this file, the controller's memory is current)."""
        return {}

    def ledger(self) -> LedgerRows:
        q = self._db.execute
        totals = q(f"SELECT {_SET_COLUMNS} FROM set_totals")
        batches = q("SELECT node, applied, duplicate, discarded FROM node_batches")
        cursors = q("SELECT node, instance, seq, updated FROM batch_cursors")
        return LedgerRows(
            set_totals=[(r[0], r[1], *(int(v) for v in r[2:])) for r in totals],
            node_batches=[(r[0], int(r[1]), int(r[2]), int(r[3])) for r in batches],
            cursors=[(r[0], r[1], int(r[2]), float(r[3])) for r in cursors],
        )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
