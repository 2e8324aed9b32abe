"""Durable export of events from the node: every event of the exported sets, not a sample.

An exporter never blocks capture: the consumer thread only appends the event to a bounded
queue; a thread per exporter serialises and writes it. What cannot be written is counted per
exporter and cause (``queue_full``: the writer fell behind; ``write``: the file system refused;
``rotated_out``: written, then deleted with the oldest file of the rotation; ``shutdown``:
still queued when the agent stopped and the writer did not finish in time), never silently
lost, and the node's own accounting (events delivered and dropped in the kernel per set, and
this exporter's counts) is written into the same stream as a typed record, so the store
knows what is missing:

    {"type": "tracefleet.accounting", "time": ..., "node": ..., "exporter": ..., ...}

Event lines are exactly ``capture -o jsonl`` (tracefleet.model.Event) plus ``node``; they
have no ``type`` key, which is how a shipper tells the two apart.

The exporters' one home: ``base`` (Exporter, the hub, accounting), ``file``, ``otlp`` (logs),
``otlpmetrics`` (the agent's metrics), ``spec`` (``--exporter`` parsing). Imports run one way:
base <- file, otlp, otlpmetrics <- spec <- this package's names.
"""

from tracefleet.agent.export.base import (
    ACCOUNTING_TYPE,
    CAUSES,
    Accounting,
    ExportConfigError,
    Exporter,
    ExportHub,
    engine_accounting,
)
from tracefleet.agent.export.file import FileExporter, FileExportSpec, file_spec, parse_size
from tracefleet.agent.export.spec import EXPORTER_NAME, parse_exporter

__all__ = [
    "ACCOUNTING_TYPE",
    "CAUSES",
    "EXPORTER_NAME",
    "Accounting",
    "ExportConfigError",
    "ExportHub",
    "Exporter",
    "FileExportSpec",
    "FileExporter",
    "engine_accounting",
    "file_spec",
    "parse_exporter",
    "parse_size",
]
