"""Hook for the controller's Prometheus endpoint (--metrics-listen).

Metrics are a separate issue: this module is the one place that will start the exporter. Until
then it only says that the flag is accepted but not served.
"""

from __future__ import annotations

import logging

from tracefleet.controller._internal.controller import Controller

log = logging.getLogger("tracefleet.controller.metrics")


def start_metrics(address: str, controller: Controller) -> None:
    """Serve /metrics on ``address`` (host:port) for ``controller``. Not implemented yet."""
    del controller
    log.warning("--metrics-listen %s: metrics are not implemented yet; ignoring", address)
