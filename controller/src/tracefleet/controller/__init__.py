"""tracefleet controller and the tracefleet CLI.

Public: ``server`` (the ``tracefleet-controller`` command) and ``operator.cli`` (the
``tracefleet`` command). The rest has no stability promise:

* ``api``: the gRPC services (agents, operators), who may call them (auth, TLS,
  Kubernetes tokens), ``/metrics``;
* ``domain``: the fleet, rules, policy, the exactly-once ledger, aggregates, limits;
* ``storage``: the store (SQLite) and etcd;
* ``operator``: the operator CLI and its rendering; imports only ``common``, never the
  server's packages (tests/unit/test_layout.py);
* ``common``: what the CLI and the server share (environment, addresses, selectors,
  certificates, config files).
"""
