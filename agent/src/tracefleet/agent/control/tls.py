"""Client-side mTLS of the agent: channel credentials read fresh from TRACEFLEET_TLS_DIR.

The control client calls ``AgentTLS.credentials()`` for every new channel, so certificates
renewed on disk (cert-manager, kubelet's Secret refresh, ``tracefleet certs``) are used at the
next reconnect; ``changed()`` lets the client reconnect on its own when the files change.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from tracefleet.model.tlsfiles import TLSFilesError, read_tls_files, tls_digest


class AgentTLSError(Exception):
    pass


class AgentTLS:
    def __init__(self, tls_dir: str | os.PathLike[str], server_name: str = "") -> None:
        self.tls_dir = Path(tls_dir)
        self.server_name = server_name
        self._digest = ""
        self.read()  # fail early on a missing file

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return read_tls_files(self.tls_dir, "'tracefleet certs agent --node NAME'")
        except TLSFilesError as e:
            raise AgentTLSError(str(e)) from None

    def credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self.read()
        self._digest = tls_digest((ca, cert, key))
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def changed(self) -> bool:
        """True if the files differ from those of the last ``credentials()``."""
        try:
            return tls_digest(self.read()) != self._digest
        except AgentTLSError:
            return False  # mid-rotation: keep the current connection
