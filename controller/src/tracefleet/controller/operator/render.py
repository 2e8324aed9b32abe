"""Output of the tracefleet CLI: protobuf -> plain data, and table/json/yaml rendering."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import yaml
from google.protobuf import descriptor, duration_pb2, timestamp_pb2
from google.protobuf.message import Message

# a field descriptor of the pure-Python or the upb protobuf runtime (the stubs type them apart)
AnyField = Any

FORMATS = ("table", "json", "yaml")


def to_data(msg: Message) -> dict[str, Any]:
    """A message as JSON-ready data: every field present (ints stay ints), Timestamps as
    RFC 3339 strings (null when unset), Durations as seconds, enums as lower-case names."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vfield = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(vfield, v) for k, v in sorted(value.items())}
        elif _is_repeated(field):
            out[field.name] = [_value(field, v) for v in value]
        elif field.message_type is not None and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _is_repeated(field: AnyField) -> bool:
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == descriptor.FieldDescriptor.LABEL_REPEATED)


def _value(field: AnyField, value: Any) -> Any:
    if isinstance(value, timestamp_pb2.Timestamp):
        return timestamp_text(value)
    if isinstance(value, duration_pb2.Duration):
        return value.ToTimedelta().total_seconds()
    if isinstance(value, Message):
        return to_data(value)
    if field.enum_type is not None:
        name = field.enum_type.values_by_number[value].name
        prefix = _enum_prefix(field.enum_type.name)
        return name.removeprefix(prefix).lower()
    return value


def _enum_prefix(enum_name: str) -> str:
    out = [enum_name[0]]
    for ch in enum_name[1:]:
        if ch.isupper():
            out.append("_")
        out.append(ch)
    return "".join(out).upper() + "_"


def timestamp_text(ts: timestamp_pb2.Timestamp | None) -> str | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")
    raise ValueError(fmt)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def rate(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2f}" if x else "0"


def ago(ts: timestamp_pb2.Timestamp, now: float) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return "never"
    secs = max(0.0, now - ts.ToNanoseconds() / 1e9)
    if secs < 120:
        return f"{secs:.0f}s ago"
    if secs < 7200:
        return f"{secs / 60:.0f}m ago"
    return f"{secs / 3600:.1f}h ago"


def seconds_text(secs: float) -> str:
    if secs < 0.001:
        return f"{secs * 1e6:.0f}us"
    if secs < 1:
        return f"{secs * 1e3:.1f}ms"
    return f"{secs:.2f}s"
