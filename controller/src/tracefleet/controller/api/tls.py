"""Server-side mTLS of the controller: credentials that reload the certificate files when they
change (no restart), and what grpc tells us about handshakes it rejected.

``ServerTLS(tls_dir).credentials()`` returns ``grpc.dynamic_ssl_server_credentials`` that
require a client certificate signed by ``ca.crt``. grpc calls the fetcher at the start of
every TLS handshake; it returns a new configuration only when ``ca.crt``, ``tls.crt`` or
``tls.key`` changed and the new files load and match (a half-written set keeps the old one).

Handshakes grpc rejects (wrong CA, expired, no client certificate) never reach Python: grpc
only writes a "Handshake failed" line to the process's stderr. ``HandshakeLogWatcher`` tees
fd 2 through a pipe and counts those lines by reason; the line carries no peer address, so
that is all that can be said about such a client.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tracefleet.controller.common import env
from tracefleet.model.tlsfiles import CA_CERT, TLS_CERT, TLS_KEY, TLSFilesError, read_tls_files
from tracefleet.model.tlsfiles import tls_digest as _digest

log = logging.getLogger("tracefleet.controller.tls")

TLS_DIR_ENV = env.TLS_DIR


class TLSConfigError(Exception):
    """The TLS directory is unusable; the message names the file and the fix."""


def read_tls_dir(tls_dir: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes]:
    """(ca.crt, tls.crt, tls.key) contents; TLSConfigError if one is missing or they do not
    match."""
    d = Path(tls_dir)
    try:
        ca, cert, key = read_tls_files(d)
    except TLSFilesError as e:
        raise TLSConfigError(str(e)) from None
    try:
        x509.load_pem_x509_certificates(ca)
        leaf = x509.load_pem_x509_certificate(cert)
        priv = serialization.load_pem_private_key(key, password=None)
    except ValueError as e:
        raise TLSConfigError(f"bad PEM in {d}: {e}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if leaf.public_key().public_bytes(enc, pub) != priv.public_key().public_bytes(enc, pub):
        raise TLSConfigError(f"{d / TLS_KEY} is not the key of {d / TLS_CERT}")
    return ca, cert, key


class ServerTLS:
    def __init__(self, tls_dir: str | os.PathLike[str]) -> None:
        self.tls_dir = Path(tls_dir)
        self._lock = threading.Lock()
        self._files = read_tls_dir(self.tls_dir)  # raises TLSConfigError
        self._digest = _digest(self._files)
        self._stamp = self._stat()
        self.handshakes = 0  # fetcher calls = TLS handshakes started
        self.reloads = 0
        self._bad_digest = ""

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for name in (CA_CERT, TLS_CERT, TLS_KEY):
            try:
                st = os.stat(self.tls_dir / name)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = self._files
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(),
            self._fetch,  # type: ignore[arg-type]  # grpc takes None (no change); its stub does not say so
            require_client_authentication=True,
        )

    def subject(self) -> str:
        return x509.load_pem_x509_certificate(self._files[1]).subject.rfc4514_string()

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc (on its own threads) before each handshake."""
        with self._lock:
            self.handshakes += 1
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                files = read_tls_dir(self.tls_dir)
            except TLSConfigError as e:
                log.warning("TLS files changed but cannot be used yet (keeping the old): %s", e)
                self._stamp = ()  # look again at the next handshake
                return None
            digest = _digest(files)
            if digest == self._digest:
                return None
            self._files, self._digest = files, digest
            self.reloads += 1
            log.info("reloaded TLS certificate from %s: %s", self.tls_dir, self.subject())
            return self._config()


# handshakes rejected inside grpc -------------------------------------------------------------

_HANDSHAKE_FAILED = re.compile(r"Handshake failed[^\n]*")
_REASONS = tuple(
    (reason, re.compile(pattern, re.I))
    for reason, pattern in (
        ("expired", r"expired"),
        ("not_yet_valid", r"not yet valid"),
        ("no_client_certificate", r"PEER_DID_NOT_RETURN_A_CERTIFICATE|CERTIFICATE_REQUIRED"),
        ("unknown_ca", r"unable to get local issuer|self.signed|CERTIFICATE_VERIFY_FAILED"),
        ("not_tls", r"WRONG_VERSION_NUMBER|HTTP_REQUEST|PACKET_LENGTH"),
    )
)


# every reason handshake_reason() returns (refusal reasons tls_<reason>)
HANDSHAKE_REASONS = (*(reason for reason, _ in _REASONS), "other")


def handshake_reason(line: str) -> str:
    for reason, pattern in _REASONS:
        if pattern.search(line):
            return reason
    return "other"


class HandshakeLogWatcher:
    """Tee this process's fd 2 through a pipe and count grpc's "Handshake failed" lines by
    reason (``counts``). Everything is written on to the original stderr unchanged."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._orig = -1

    def start(self) -> None:
        self._orig = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(
            target=self._pump, args=(r,), name="tls-handshake-log", daemon=True
        )
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Put the original stderr back and let the tee drain what is left in the pipe."""
        if self._thread is None:
            return
        with contextlib.suppress(OSError):
            sys.stderr.flush()
            os.dup2(self._orig, 2)  # closes the pipe's only write end: the reader sees EOF
        self._thread.join(timeout=2)
        self._thread = None

    def _pump(self, r: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                return
            if not chunk:
                return
            with contextlib.suppress(OSError):
                os.write(self._orig, chunk)
            try:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                pending = pending[-8192:]
                for raw in lines:
                    if b"Handshake failed" in raw:
                        self._count(raw.decode("utf-8", "replace"))
            except Exception:  # never let the tee die: stderr writers would block
                pending = b""

    def _count(self, line: str) -> None:
        m = _HANDSHAKE_FAILED.search(line)
        reason = handshake_reason(line)
        self.counts[reason] += 1
        from tracefleet.controller.domain.limits import REFUSALS

        REFUSALS.refuse(f"tls_{reason}", "", m.group(0) if m else line.strip(), log_it=False)
        # logged by grpc itself on this very stream; add a controller line naming the count
        msg = (
            f"refused a TLS client ({reason}): {m.group(0) if m else line.strip()} "
            f"[{self.counts[reason]} so far]\n"
        )
        with contextlib.suppress(OSError):
            os.write(self._orig, msg.encode())
