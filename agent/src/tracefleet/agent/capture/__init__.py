"""Capture: event sets, the ladder, the engine and its set lifecycle (``engine`` is the
protocol the controller client drives; ``bpfengine`` the real one), the ring consumer,
decode, accounting, the user-space fallback, user_events and workload identity."""
