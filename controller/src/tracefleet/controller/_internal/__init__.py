"""Private implementation modules of the controller; not a public API."""
