"""Throw-away certificates for TLS/mTLS tests, generated at test time with `cryptography`.

Nothing is committed: a private key in the repository would be a secret in the repository,
and certificates expire. Keys are EC P-256 (fast to generate on a 2-core CI machine).

Layout produced by `make_pki`: one CA, a server certificate for 127.0.0.1/localhost signed
by it, a client certificate signed by it (for mTLS), and a second, unrelated CA with its own
client certificate (a client the server must refuse).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key (both as bytes, as grpc wants them)."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Pki:
    """Everything a TLS/mTLS test needs, as PEM bytes and as files under `directory`."""

    ca: KeyPair
    server: KeyPair
    client: KeyPair
    rogue_ca: KeyPair
    rogue_client: KeyPair
    directory: Path

    def path(self, name: str) -> Path:
        """Path of a written PEM file, e.g. `path("server.crt")`."""
        return self.directory / name


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moshi-grpc tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=1)
    )


def make_ca(common_name: str) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate that may sign leaf certificates."""
    key = _key()
    name = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder).sign(key, hashes.SHA256())
    return KeyPair(_cert_pem(cert), _key_pem(key)), key, cert


def make_leaf(
    common_name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> KeyPair:
    """A leaf certificate signed by `ca_key`: server auth (with SANs) or client auth."""
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _validity(builder).sign(ca_key, hashes.SHA256())
    return KeyPair(_cert_pem(cert), _key_pem(key))


def make_pki(directory: Path) -> Pki:
    """Generate a CA, server and client certificates (plus a rogue CA/client) into `directory`.

    Files written: ca.crt, server.crt, server.key, client.crt, client.key, rogue-ca.crt,
    rogue-client.crt, rogue-client.key (CA keys are never written: nothing needs them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_cert = make_ca("moshi-grpc test CA")
    server = make_leaf("127.0.0.1", ca_key, ca_cert, server=True)
    client = make_leaf("test-client", ca_key, ca_cert, server=False)
    rogue_ca, rogue_key, rogue_cert = make_ca("rogue CA")
    rogue_client = make_leaf("rogue-client", rogue_key, rogue_cert, server=False)
    files = {
        "ca.crt": ca.cert_pem,
        "server.crt": server.cert_pem,
        "server.key": server.key_pem,
        "client.crt": client.cert_pem,
        "client.key": client.key_pem,
        "rogue-ca.crt": rogue_ca.cert_pem,
        "rogue-client.crt": rogue_client.cert_pem,
        "rogue-client.key": rogue_client.key_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=ca,
        server=server,
        client=client,
        rogue_ca=rogue_ca,
        rogue_client=rogue_client,
        directory=directory,
    )
