"""Test certificates: a CA, a server certificate for 127.0.0.1/localhost and a client certificate,
made with ``cryptography`` (EC P-256, valid for a day)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


@dataclass
class Certificates:
    """A CA; a server certificate for 127.0.0.1/localhost signed by it and the server's key; a client
    certificate (mutual TLS) signed by it and the client's key."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, folder: Path) -> Certificates:
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprompt test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(ca_key, hashes.SHA256())
        )

        def signed(name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            return builder.sign(ca_key, hashes.SHA256()), key

        server_cert, server_key = signed(
            "127.0.0.1",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        client_cert, client_key = signed("site-0", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        out = cls(
            folder / "ca.crt",
            folder / "server.pem",
            folder / "server.key",
            folder / "client.pem",
            folder / "client.key",
        )
        out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        out.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        out.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(server_key, out.key)
        _write_key(client_key, out.client_key)
        return out
