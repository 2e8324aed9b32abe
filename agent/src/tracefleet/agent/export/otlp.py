"""OTLP logs exporter (gRPC or HTTP/protobuf) through the OpenTelemetry Python SDK's exporters.

One log record per event: ``event_name`` ``tracefleet.<set>.<syscall>``, the strace-like line
as body, the typed fields as attributes under stable names (OpenTelemetry semantic
conventions where they exist: ``process.pid``, ``process.command_line``...; ``tracefleet.*``
otherwise), the node as resource attributes. Batches come from the same bounded queue as the
file exporter (export.base.Exporter): the SDK exporter retries a batch with backoff until its
timeout, then the batch is counted as undeliverable (cause ``write``) and the next one goes;
capture never waits. Accounting records are sent as log records named
``tracefleet.accounting`` (the JSON as body).
"""

from __future__ import annotations

import contextlib
import json
import queue
import time
from typing import Any

from tracefleet.agent.export.base import ACCOUNTING_TYPE, Accounting, ExportConfigError, Exporter
from tracefleet.model import Event, human

MAX_BATCH = 512


def _attr(value: Any) -> Any:
    """An OTLP attribute value: str, int, bool, float or a list of str; else JSON text."""
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


_WORKLOAD_ATTRS = (
    ("container_id", "container.id"),
    ("container", "k8s.container.name"),
    ("pod", "k8s.pod.name"),
    ("pod_uid", "k8s.pod.uid"),
    ("namespace", "k8s.namespace.name"),
    ("attribution", "tracefleet.attribution"),
)


def attributes(ev: dict[str, Any]) -> dict[str, Any]:
    """Stable attribute names of one event (the JSON shape of tracefleet.model.Event)."""
    out: dict[str, Any] = {
        "process.pid": ev["pid"],
        "thread.id": ev["tid"],
        "process.executable.name": ev["comm"],
        "tracefleet.event_set": ev["event_set"],
        "tracefleet.syscall": ev["syscall"],
        "tracefleet.ret": ev["ret"],
        "tracefleet.duration_ns": ev.get("duration_ns", 0),
        "tracefleet.strategy": ev.get("strategy", ""),
        "tracefleet.cgroup_id": ev.get("cgroup_id", 0),
    }
    for key, name in (("ppid", "process.parent_pid"), ("uid", "process.user.id"),
                      ("gid", "process.group.id"), ("exe", "process.executable.path")):  # fmt: skip
        if ev.get(key) is not None:
            out[name] = ev[key]
    # workload identity (when the agent attributed the event): semantic-convention names
    for key, name in _WORKLOAD_ATTRS:
        if ev.get(key):
            out[name] = ev[key]
    for name, arg in (ev.get("args") or {}).items():
        value = arg.get("value")
        if value is not None:
            out[f"tracefleet.arg.{name}"] = _attr(value)
        out[f"tracefleet.arg.{name}.status"] = str(arg.get("status", ""))
    args = ev.get("args") or {}
    argv = args.get("argv", {}).get("value")
    if isinstance(argv, list):
        out["process.command_args"] = [str(a) for a in argv]
        out["process.command_line"] = " ".join(str(a) for a in argv)
    if ev["event_set"] == "exec" and isinstance(args.get("filename", {}).get("value"), str):
        out["process.executable.path"] = args["filename"]["value"]
    for key in ("pathname", "path", "filename"):
        if ev["event_set"] != "exec" and isinstance(args.get(key, {}).get("value"), str):
            out["file.path"] = args[key]["value"]
            break
    addr = args.get("addr", {}).get("value")
    if isinstance(addr, dict) and "address" in addr:
        out["network.peer.address"] = addr["address"]
        out["network.peer.port"] = addr.get("port", 0)
    return out


class OtlpExporter(Exporter):
    kind = "otlp"

    def __init__(self, name: str, endpoint: str, protocol: str = "grpc", *, node: str = "",
                 accounting: Accounting | None = None, queue_size: int = 65536,
                 timeout: float = 10.0, accounting_seconds: float = 10.0) -> None:  # fmt: skip
        super().__init__(name, queue_size=queue_size, node=node, accounting=accounting,
                         accounting_seconds=accounting_seconds)  # fmt: skip
        if protocol not in ("grpc", "http"):
            raise ExportConfigError(
                f"exporter {name}: OTLP protocol {protocol!r}: use grpc or http"
            )
        self.endpoint, self.protocol, self.timeout = endpoint, protocol, timeout
        self._sdk: Any = None

    def _open(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        if self.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

            # reconnect within 5 s of a collector coming back (gRPC's default backoff grows
            # to 120 s, and every event sent meanwhile would be lost)
            self._sdk = OTLPLogExporter(
                endpoint=self.endpoint,
                insecure=True,
                timeout=self.timeout,
                channel_options=(("grpc.max_reconnect_backoff_ms", 5000),),  # type: ignore[arg-type]
            )
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import (
                OTLPLogExporter as HttpExporter,
            )

            self._sdk = HttpExporter(endpoint=self.endpoint, timeout=self.timeout)
        self._resource = Resource.create({"service.name": "tracefleet-agent",
                                          "host.name": self.node,
                                          "k8s.node.name": self.node})  # fmt: skip
        self._scope = InstrumentationScope("tracefleet.agent")

    def _close(self) -> None:
        if self._sdk is not None:
            self._sdk.shutdown()
            self._sdk = None

    def _record(self, body: str, attrs: dict[str, Any], event_name: str, ts: int) -> Any:
        from opentelemetry._logs import LogRecord
        from opentelemetry.sdk._logs import ReadableLogRecord

        rec = LogRecord(timestamp=ts or None, observed_timestamp=time.time_ns(), body=body,
                        attributes=attrs, event_name=event_name)  # fmt: skip
        return ReadableLogRecord(rec, self._resource, self._scope)

    def _run(self) -> None:
        next_acct = time.monotonic() + self._accounting_seconds
        done = False
        while not done:
            batch: list[dict[str, Any]] = []
            try:
                first = self._q.get(timeout=max(0.0, next_acct - time.monotonic()))
                if first is None:
                    done = True
                else:
                    batch.append(first)
                while not done and len(batch) < MAX_BATCH:
                    ev = self._q.get_nowait()
                    if ev is None:
                        done = True
                    else:
                        batch.append(ev)
            except queue.Empty:
                pass
            if batch and self._dequeued(len(batch)):
                self._send(batch)
            if done or time.monotonic() >= next_acct:
                self._send_accounting()
                next_acct = time.monotonic() + self._accounting_seconds

    def _send(self, batch: list[dict[str, Any]]) -> None:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        records = []
        for ev in batch:
            try:
                event = Event.from_json(ev)
                obj = event.to_json()
                records.append(self._record(human.line(event), attributes(obj),
                                            f"tracefleet.{obj['event_set']}.{obj['syscall']}",
                                            obj.get("time_ns", 0)))  # fmt: skip
            except Exception as e:
                self._fail("serialize", e)
        if not records:
            return
        try:
            ok = self._sdk.export(records) == LogRecordExportResult.SUCCESS
        except Exception as e:  # the SDK reports failures as a result; be sure anyway
            ok, err = False, e
        else:
            err = RuntimeError(f"OTLP export to {self.endpoint} failed after retries")
        if ok:
            with self._lock:
                self.written += len(records)
        else:
            with self._lock:
                self.undeliverable["write"] += len(records) - 1
            self._fail("write", err)

    def _send_accounting(self) -> None:
        rec = self.accounting_record()
        body = json.dumps(rec, separators=(",", ":"))
        attrs = {"tracefleet.record": ACCOUNTING_TYPE}
        # a lost accounting record is superseded by the next one (counts are cumulative)
        with contextlib.suppress(Exception):
            self._sdk.export([self._record(body, attrs, ACCOUNTING_TYPE, rec["time_ns"])])


def parse_otlp(name: str, kind: str, rest: str) -> tuple[str, str]:
    """(protocol, endpoint) of ``otlp-grpc:HOST:PORT`` or ``otlp-http:http://HOST:PORT/v1/logs``."""
    protocol = kind.removeprefix("otlp-")
    if protocol == "grpc" and rest.count(":") == 1 and rest.rsplit(":", 1)[1].isdigit():
        return protocol, rest
    if protocol == "http" and rest.startswith(("http://", "https://")):
        return protocol, rest
    raise ExportConfigError(
        f"exporter {name}: bad OTLP endpoint {rest[:80]!r}: use otlp-grpc:HOST:PORT or "
        "otlp-http:http://HOST:PORT/v1/logs"
    )
