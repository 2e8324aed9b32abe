"""Every environment variable the controller and the tracefleet CLI read, in one place."""

from __future__ import annotations

# Address of the controller the tracefleet CLI dials (host:port or unix:/PATH).
CONTROLLER = "TRACEFLEET_CONTROLLER"
# Where tracefleet-controller listens (unix:/PATH or host:port); --listen wins.
CONTROLLER_LISTEN = "TRACEFLEET_CONTROLLER_LISTEN"
# SQLite file holding the desired state; --db wins.
CONTROLLER_DB = "TRACEFLEET_CONTROLLER_DB"
# Replicated mode: etcd client URLs (comma-separated) and key prefix; --etcd, --etcd-prefix win.
ETCD = "TRACEFLEET_ETCD"
ETCD_PREFIX = "TRACEFLEET_ETCD_PREFIX"
# Directory with ca.crt, tls.crt, tls.key (the controller's server certificate, or the CLI's
# operator certificate); --tls-dir wins.
TLS_DIR = "TRACEFLEET_TLS_DIR"
# The CLI's operator bearer token; --token wins.
TOKEN = "TRACEFLEET_TOKEN"
# The name the CLI expects in the controller's certificate; --tls-server-name wins.
TLS_SERVER_NAME = "TRACEFLEET_TLS_SERVER_NAME"
# Operator bearer tokens file of the controller; --tokens-file wins.
TOKENS_FILE = "TRACEFLEET_TOKENS_FILE"
# Policy file of the controller; --policy wins.
POLICY_FILE = "TRACEFLEET_POLICY_FILE"
# How the controller ties an agent to the node it registers as: "certificate" (the client
# certificate names the node; `tracefleet certs agent`) or "k8s-token" (a shared agent
# certificate plus a projected ServiceAccount token checked with TokenReview);
# --agent-identity wins.
AGENT_IDENTITY = "TRACEFLEET_AGENT_IDENTITY"
# k8s-token: the audience the agents' projected tokens are issued for; --agent-token-audience
# wins.
AGENT_TOKEN_AUDIENCE = "TRACEFLEET_AGENT_TOKEN_AUDIENCE"
# k8s-token: the agents' ServiceAccount as NAMESPACE/NAME; --agent-service-account wins.
AGENT_SERVICE_ACCOUNT = "TRACEFLEET_AGENT_SERVICE_ACCOUNT"
# Set by Kubernetes in every pod: the API server's in-cluster address (k8s-token mode).
KUBERNETES_SERVICE_HOST = "KUBERNETES_SERVICE_HOST"
KUBERNETES_SERVICE_PORT = "KUBERNETES_SERVICE_PORT"

# Secure by default: a unix socket whose file permissions decide who may call (root or the
# admin group: admin; the read group, on the "-read" socket beside it: read).
DEFAULT_SOCKET = "/run/tracefleet/controller.sock"
DEFAULT_CONTROLLER = f"unix:{DEFAULT_SOCKET}"
DEFAULT_LISTEN = f"unix:{DEFAULT_SOCKET}"
DEFAULT_ADMIN_GROUP = "tracefleet"
DEFAULT_READ_GROUP = "tracefleet-read"
DEFAULT_DB = "/var/lib/tracefleet/controller.db"
