"""tracefleet per-host agent."""
