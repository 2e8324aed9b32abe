"""Environment variables the agent reads: their names, in one place."""

BPF_DIR = "TRACEFLEET_BPF_DIR"  # directory holding the built *.bpf.o objects
CONTROLLER = "TRACEFLEET_CONTROLLER"  # host:port of the controller
NODE_NAME = "TRACEFLEET_NODE_NAME"  # this node's identity (downward API in Kubernetes)
NODE_LABELS = "TRACEFLEET_NODE_LABELS"  # k=v,k=v labels announced at registration
METRICS_LISTEN = "TRACEFLEET_AGENT_METRICS_LISTEN"  # host:port of /metrics
TLS_DIR = "TRACEFLEET_TLS_DIR"  # ca.crt, tls.crt, tls.key for mTLS to the controller
# Projected ServiceAccount token proving this node to a controller in k8s-token mode
TOKEN_FILE = "TRACEFLEET_AGENT_TOKEN_FILE"
# Fail-static state file of `tracefleet-agent run` ('off': none)
STATE_FILE = "TRACEFLEET_AGENT_STATE_FILE"
# The host's cgroup2 hierarchy (a pod sees only its own under /sys/fs/cgroup)
CGROUP_ROOT = "TRACEFLEET_CGROUP_ROOT"
