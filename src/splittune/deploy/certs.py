"""A test certificate authority, a server certificate, client certificates (mutual TLS) and tokens.

For experiments and tests; production deployments bring certificates from their own CA. Keys are
written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splittune test CA"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(subject: str, issuer_name: x509.Name, issuer_key, days: int, *, ca: bool = False, hosts=(), usage=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name if issuer_key is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
    return cert, key


def make_certs(out: Path, hosts: list[str], clients: list[str], days: int = 30) -> dict[str, Path]:
    """Write ``ca.pem``, ``server.pem``/``server.key`` for ``hosts``, and for each client ``<id>.pem``,
    ``<id>.key`` (mutual TLS) and ``<id>.token``; ``tokens.yaml`` maps every client to its token."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    ca_cert, ca_key = _issue("splittune test CA", None, None, days, ca=True)
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)
    written["ca"] = out / "ca.pem"
    cert, key = _issue(hosts[0], ca_cert.subject, ca_key, days, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", key)
    written["server"] = out / "server.pem"
    tokens = {}
    for cid in clients:
        cert, key = _issue(cid, ca_cert.subject, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        (out / f"{cid}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{cid}.key", key)
        tokens[cid] = secrets.token_urlsafe(32)
        fd = os.open(out / f"{cid}.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tokens[cid] + "\n")
        written[cid] = out / f"{cid}.pem"
    if clients:
        fd = os.open(out / "tokens.yaml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(tokens))
        written["tokens"] = out / "tokens.yaml"
    return written
