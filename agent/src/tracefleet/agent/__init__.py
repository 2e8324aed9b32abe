"""tracefleet per-host agent.

Public: ``cli`` (the ``tracefleet-agent`` command) and ``emit`` (for applications writing
user_events). Everything else is the agent's own, with no stability promise; each layer
imports only the ones below it:

* ``kernel``: the libbpf binding, the ABI shared with ``bpf/``, host checks, mounts, the
  kernel's filter maps;
* ``capture``: event sets, the capture ladder and the engine's set lifecycle, the ring
  consumer, decode, accounting, the user-space fallback, user_events, workload identity;
* ``control``: the controller client, its outbox, redaction, TLS and the ServiceAccount token;
* ``export``: event exporters (files, OTLP); ``metrics``: the agent's ``/metrics``;
  ``env``: the environment variables it reads.
"""
