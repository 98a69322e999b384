"""Credentials of a loopback deployment (``federation.tls``, ``federation.node_auth``), generated with
``cryptography``: a certificate authority and the SuperLink's certificate for 127.0.0.1, and one SuperNode key
pair per client (ECDSA P-384 in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes them).

Everything is written to a directory readable only by the user running the deployment (mode 0700, private keys
0600); the CA's private key is used once, to sign the SuperLink's certificate, and is not kept.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=2)
"""Lifetime of the generated certificates: a loopback deployment lasts one run."""


@dataclass(frozen=True)
class Certificates:
    """Paths of the CA certificate (for SuperNodes and ``flwr``), the SuperLink's certificate and its key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's key pair: the private key (``--auth-supernode-private-key``) and the public key
    (``flwr supernode register``)."""

    private: Path
    public: Path


def _private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificates(directory: Path, host: str = "127.0.0.1") -> Certificates:
    """A fresh CA and a certificate for ``host`` (an IP address, in the subject alternative name) signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora loopback CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert = directory / "superlink.pem"
    cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return Certificates(ca_path, cert, _private(directory / "superlink.key", _pem_key(server_key)))


def node_keys(directory: Path, name: str) -> NodeKeys:
    """A SuperNode key pair ``<name>`` / ``<name>.pub`` in OpenSSH format."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = _key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (directory / f"{name}.pub").write_bytes(public + b"\n")
    return NodeKeys(_private(directory / name, private), directory / f"{name}.pub")
