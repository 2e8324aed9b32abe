"""The agent's Kubernetes ServiceAccount token (``--token-file``, TRACEFLEET_AGENT_TOKEN_FILE).

In Kubernetes every agent pod mounts the same client certificate, so the certificate cannot
say which node an agent runs on. The DaemonSet mounts a projected ServiceAccount token for
the audience ``tracefleet`` instead; the API server writes the pod's node into it. The
control client reads the file for every new connection (kubelet replaces it well before it
expires) and sends it as ``authorization: Bearer`` metadata of Connect; a controller started
with ``--agent-identity=k8s-token`` checks it with the API server's TokenReview.
"""

from __future__ import annotations

import os
from pathlib import Path

METADATA_KEY = "authorization"
MAX_TOKEN_BYTES = 16 * 1024  # a ServiceAccount JWT is ~1 KiB


class AgentTokenError(Exception):
    pass


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path``, stripped; AgentTokenError (with the fix) if unusable."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise AgentTokenError(
            f"cannot read the ServiceAccount token {p}: {e.strerror} (mount a projected "
            "serviceAccountToken volume there, see deploy/kubernetes/agent/daemonset.yaml)"
        ) from None
    token = data.decode("ascii", "replace").strip()
    if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise AgentTokenError(f"{p} does not hold one ServiceAccount token (a JWT)")
    return token


def token_metadata(path: str | os.PathLike[str]) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying the token of ``path``."""
    return ((METADATA_KEY, f"Bearer {read_token(path)}"),)
