"""Limits of operator requests: the control API refuses a request past them and the CLI
checks them before sending, so both read them here."""

from tracefleet.model.filters import PID_MAX_LIMIT

MAX_PID = PID_MAX_LIMIT  # the filters' limit (tracefleet.model.filters)
MAX_STREAM_FILTER = 1000  # pids or nodes a StreamEvents request may name
MAX_TOP_ROWS = 10_000
