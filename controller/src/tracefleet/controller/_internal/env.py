"""Every environment variable the controller and the tracefleet CLI read, in one place."""

from __future__ import annotations

# Address of the controller the tracefleet CLI dials (host:port).
CONTROLLER = "TRACEFLEET_CONTROLLER"
# Where tracefleet-controller listens (host:port); --listen wins.
CONTROLLER_LISTEN = "TRACEFLEET_CONTROLLER_LISTEN"
# SQLite file holding the desired state; --db wins.
CONTROLLER_DB = "TRACEFLEET_CONTROLLER_DB"

DEFAULT_CONTROLLER = "127.0.0.1:7070"
DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_DB = "/var/lib/tracefleet/controller.db"
