"""The controller's domain: fleet, rules, policy, ledger, aggregates, limits, redaction.
Knows no gRPC server and no storage engine beyond ``storage.store.Store``."""
