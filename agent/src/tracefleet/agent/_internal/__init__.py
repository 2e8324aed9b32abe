"""Private implementation modules of the agent; not a public API."""
