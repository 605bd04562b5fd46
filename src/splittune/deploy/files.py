"""TLS and token files, checked before anything starts.

gRPC reads these files late and reports them badly: a certificate without its key aborts the client
process (SIGABRT), a garbage certificate makes ``serve`` fail to bind after its model has loaded. Each
check here is one :class:`DeployError` naming the flag and the file.
"""

from __future__ import annotations

from pathlib import Path

from ..channels.transport import DeployError


def read(path: Path, flag: str) -> bytes:
    """The bytes of ``path``, or an error naming ``flag`` and the file."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise DeployError(f"{flag} {path} is a directory, not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DeployError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None


def certificates(path: Path, flag: str) -> list:
    """The PEM certificates in ``path`` (a chain or a CA bundle: at least one)."""
    from cryptography import x509

    data = read(path, flag)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise DeployError(f"{flag} {path} is not a PEM certificate (expected a '-----BEGIN CERTIFICATE-----' block)")
    return certs


def private_key(path: Path, flag: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read(path, flag)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DeployError(f"{flag} {path} is encrypted with a password; gRPC needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DeployError(f"{flag} {path} is not a PEM private key (expected a '-----BEGIN PRIVATE KEY-----' block)") from None


def check_pair(cert: Path | None, key: Path | None, cert_flag: str = "--tls-cert", key_flag: str = "--tls-key") -> None:
    """A certificate and its key: both or neither, both parse, and the key is the certificate's."""
    if cert is None and key is None:
        return
    if key is None:
        raise DeployError(f"{cert_flag} needs {key_flag} too (the private key of that certificate)")
    if cert is None:
        raise DeployError(f"{key_flag} needs {cert_flag} too (the certificate of that key)")
    from cryptography.hazmat.primitives import serialization

    leaf = certificates(cert, cert_flag)[0]
    secret = private_key(key, key_flag)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != secret.public_key().public_bytes(*spki):
        raise DeployError(f"{key_flag} {key} is not the key of {cert_flag} {cert} (their public keys differ)")


def check_client(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """A client's ``--tls-ca``, ``--tls-cert`` and ``--tls-key``."""
    if ca is not None:
        certificates(ca, "--tls-ca")
    check_pair(cert, key)


def check_server(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """``serve``'s ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``."""
    if client_ca is not None and cert is None and key is None:
        raise DeployError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    check_pair(cert, key)
    if client_ca is not None:
        certificates(client_ca, "--tls-client-ca")


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """A secret file that the group or everyone may read gets a warning, as ssh gives for a private key."""
    from ..config import warn

    try:
        mode = Path(path).stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        warn(f"{what} {path} is readable by others (permissions {mode:04o}); anyone who reads it can act as its owner: "
             f"chmod 600 {path}")


def read_token(path: Path, flag: str = "--token-file") -> str:
    warn_if_readable_by_others(path, flag)
    try:
        token = read(path, flag).decode().strip()
    except UnicodeDecodeError:
        raise DeployError(f"{flag} {path} is not a text file holding a token") from None
    if not token:
        raise DeployError(f"{flag} {path} is empty (it should hold this client's token)")
    return token
