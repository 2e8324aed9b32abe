"""``tracefleet certs``: a private CA and the mTLS certificates of tracefleet (ECDSA P-256).

Identity model (read back by ``auth.identity_of``):

* CA: ``CN=tracefleet-ca``; ``ca.crt`` + ``ca.key`` (keep the key offline).
* controller: ``CN=tracefleet-controller, OU=controller``, SAN DNS/IP names, serverAuth.
* agent: ``CN=<node>, OU=agent``, SAN ``DNS:<node>`` (when it is a valid DNS name), clientAuth.
  The controller accepts it only for the node of that name.
* operator: ``CN=<name>, OU=<role>`` with role ``admin`` or ``read``, clientAuth.

Every leaf directory holds ``ca.crt``, ``tls.crt`` and ``tls.key``: the layout
``TRACEFLEET_TLS_DIR`` and the Kubernetes TLS Secrets use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tracefleet.model.tlsfiles import CA_CERT, TLS_CERT, TLS_KEY

CA_KEY = "ca.key"
OU_CONTROLLER, OU_AGENT = "controller", "agent"
ROLE_ADMIN, ROLE_READ = "admin", "read"
ROLES = (ROLE_ADMIN, ROLE_READ)
_DNS = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class CertError(Exception):
    """A one-line cause and fix."""


@dataclass(frozen=True)
class Issued:
    directory: Path
    subject: str
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a reloading reader never sees half a file


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(out: Path, *, days: int = 3650, common_name: str = "tracefleet-ca",
            force: bool = False) -> Issued:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_KEY).exists() and not force:
        raise CertError(f"{out / CA_KEY} exists; pass --force to replace the CA (re-issue "
                        "every certificate afterwards)")  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(out / CA_KEY, _key_pem(key), private=True)
    _write(out / CA_CERT, _cert_pem(cert))
    return Issued(out, cert.subject.rfc4514_string(), cert.not_valid_after_utc)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    try:
        ca_pem = (ca_dir / CA_CERT).read_bytes()
        key_pem = (ca_dir / CA_KEY).read_bytes()
    except FileNotFoundError as e:
        raise CertError(
            f"no CA in {ca_dir} ({e.filename} missing): run 'tracefleet certs init --out "
            f"{ca_dir}' first or pass --ca-dir"
        ) from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir / CA_KEY}: expected an EC private key")
    return x509.load_pem_x509_certificate(ca_pem), key, ca_pem


def issue(
    ca_dir: Path,
    out: Path,
    *,
    common_name: str,
    unit: str,
    dns: list[str] | tuple[str, ...] = (),
    ips: list[str] | tuple[str, ...] = (),
    server: bool = False,
    days: float = 90,
    not_before: dt.datetime | None = None,
) -> Issued:
    """Write ca.crt, tls.crt and tls.key for one leaf into ``out``."""
    ca_cert, ca_key, ca_pem = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    try:
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    except ValueError as e:
        raise CertError(f"bad --ip: {e}") from None
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tracefleet"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    _write(out / TLS_KEY, _key_pem(key), private=True)
    _write(out / TLS_CERT, _cert_pem(cert))
    _write(out / CA_CERT, ca_pem)
    return Issued(out, cert.subject.rfc4514_string(), cert.not_valid_after_utc)


def issue_controller(ca_dir: Path, out: Path, dns: list[str], ips: list[str],
                     days: float = 90) -> Issued:  # fmt: skip
    if not dns and not ips:
        dns, ips = ["localhost"], ["127.0.0.1", "::1"]
    return issue(ca_dir, out, common_name="tracefleet-controller", unit=OU_CONTROLLER,
                 dns=dns, ips=ips, server=True, days=days)  # fmt: skip


def issue_agent(ca_dir: Path, out: Path, node: str, days: float = 90,
                not_before: dt.datetime | None = None) -> Issued:  # fmt: skip
    if not node:
        raise CertError("--node must not be empty")
    dns = [node] if _DNS.match(node) else []
    return issue(ca_dir, out, common_name=node, unit=OU_AGENT, dns=dns, days=days,
                 not_before=not_before)  # fmt: skip


def issue_operator(ca_dir: Path, out: Path, name: str, role: str, days: float = 90) -> Issued:
    if role not in ROLES:
        raise CertError(f"bad role {role!r}: use one of {', '.join(ROLES)}")
    if not name:
        raise CertError("--name must not be empty")
    return issue(ca_dir, out, common_name=name, unit=role, days=days)
