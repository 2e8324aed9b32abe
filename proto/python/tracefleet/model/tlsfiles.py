"""The mTLS directory of the agent and the controller: ``ca.crt``, ``tls.crt``, ``tls.key``
(as ``tracefleet certs`` writes them and a Kubernetes TLS Secret mounts them), read fresh so
renewed files are picked up, and a digest to see that they changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CA_CERT, TLS_CERT, TLS_KEY = "ca.crt", "tls.crt", "tls.key"


class TLSFilesError(Exception):
    """A file of the TLS directory cannot be read; the message names it and the fix."""


def read_tls_files(
    tls_dir: str | os.PathLike[str], make_hint: str = "'tracefleet certs'"
) -> tuple[bytes, bytes, bytes]:
    """(ca.crt, tls.crt, tls.key) contents; ``make_hint`` is the command that makes them."""
    d = Path(tls_dir)
    out = []
    for name in (CA_CERT, TLS_CERT, TLS_KEY):
        try:
            out.append((d / name).read_bytes())
        except OSError as e:
            raise TLSFilesError(
                f"cannot read {d / name}: {e.strerror} (the TLS directory holds {CA_CERT}, "
                f"{TLS_CERT}, {TLS_KEY}; make them with {make_hint})"
            ) from None
    return out[0], out[1], out[2]


def tls_digest(files: tuple[bytes, ...]) -> str:
    """Digest of the files' contents (each hashed, so no two splits collide)."""
    h = hashlib.sha256()
    for f in files:
        h.update(hashlib.sha256(f).digest())
    return h.hexdigest()
