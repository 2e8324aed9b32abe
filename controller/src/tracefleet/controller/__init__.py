"""tracefleet controller and the tracefleet CLI."""
