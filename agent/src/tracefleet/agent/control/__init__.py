"""The agent's side of the controller: the client, its outbox, redaction of what leaves the
node, TLS and the ServiceAccount token. Drives a ``capture.engine.CaptureEngine``."""
