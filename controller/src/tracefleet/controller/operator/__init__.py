"""The operator CLI (``tracefleet``): separable from the server, it imports only
``tracefleet.model``, ``tracefleet.v1`` and ``tracefleet.controller.common``."""
