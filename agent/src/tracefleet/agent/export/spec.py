"""``--exporter NAME=KIND:...`` parsed into a spec, dispatched to each kind's own parser."""

from __future__ import annotations

import re
from typing import Any

from tracefleet.agent.export.base import ExportConfigError
from tracefleet.agent.export.file import file_spec
from tracefleet.agent.export.otlp import parse_otlp

EXPORTER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # as the controller checks it


def parse_exporter(text: str) -> tuple[str, Any]:
    """``NAME=file:/PATH[,max_bytes=SIZE][,keep=N]``, ``NAME=otlp-grpc:HOST:PORT`` or
    ``NAME=otlp-http:URL`` (tracefleet-agent run --exporter): (name, FileExportSpec or
    (protocol, endpoint))."""
    usage = ("use NAME=file:/PATH[,max_bytes=64M][,keep=5], NAME=otlp-grpc:HOST:PORT or "
             "NAME=otlp-http:http://HOST:PORT/v1/logs")  # fmt: skip
    name, sep, rest = text.partition("=")
    if not sep or not EXPORTER_NAME.fullmatch(name):
        raise ExportConfigError(
            f"bad exporter {text[:80]!r}: NAME is 1..63 of [a-z0-9_.-]; {usage}"
        )
    kind, sep, rest = rest.partition(":")
    if kind in ("otlp-grpc", "otlp-http") and sep:
        return name, parse_otlp(name, kind, rest)
    if kind != "file" or not sep:
        raise ExportConfigError(
            f"exporter {name}: unknown kind {kind[:20]!r} (known: file, otlp-grpc, otlp-http); "
            f"{usage}"
        )
    path, *opts = rest.split(",")
    kw: dict[str, Any] = {}
    for opt in opts:
        k, sep, v = opt.partition("=")
        if k == "max_bytes" and sep:
            kw["max_bytes"] = v
        elif k == "keep" and sep and v.isdigit():
            kw["keep"] = int(v)
        else:
            raise ExportConfigError(f"exporter {name}: bad option {opt[:40]!r}; {usage}")
    return name, file_spec(path, **kw)
