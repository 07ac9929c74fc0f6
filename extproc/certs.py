"""`tollway certs`: a local CA and the certificates a TLS deployment needs.

One directory holds everything (files 0600, the directory 0700):

- ``ca.pem``, ``ca-key.pem``: the CA. Clients trust ``ca.pem``; the key stays here
  and signs the others. An existing CA is kept, so clients that trust it keep
  working when the other certificates are made again.
- ``front-door.pem``/``-key.pem``: Envoy's HTTPS certificate, for the hosts clients
  use (``--hosts``; localhost and 127.0.0.1 by default).
- ``tollway.pem``/``-key.pem``: Tollway's gRPC certificate, for the names Envoy dials
  (``tollway``, the compose and Kubernetes service name, localhost, 127.0.0.1).
- ``envoy-client.pem``/``-key.pem``: Envoy's client certificate for mTLS to
  Tollway, named ``envoy`` (DNS SAN); Tollway accepts only that name
  (``server.tls.client_sans``).

EC P-256 keys, SHA-256 signatures: what every TLS 1.2+ client speaks, and cheap.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA, FRONT_DOOR, TOLLWAY, ENVOY_CLIENT = "ca", "front-door", "tollway", "envoy-client"
FRONT_DOOR_HOSTS = ("localhost", "127.0.0.1")
TOLLWAY_HOSTS = ("tollway", "localhost", "127.0.0.1")
ENVOY_NAME = "envoy"  # the client certificate's SAN that Tollway requires
CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a server certificate


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def files(directory: Path, stem: str) -> Pair:
    """Where ``tollway certs`` writes one certificate and its key."""
    return Pair(directory / f"{stem}.pem", directory / f"{stem}-key.pem")


def make(
    directory: Path,
    hosts: Sequence[str] = FRONT_DOOR_HOSTS,
    tollway_hosts: Sequence[str] = TOLLWAY_HOSTS,
) -> list[Path]:
    """Write the CA (unless there is one) and the three certificates; the files written."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written: list[Path] = []
    ca = files(directory, CA)
    if ca.cert.exists() and ca.key.exists():
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        loaded = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca.key}: not an EC private key")
        ca_key = loaded
    else:
        ca_cert, ca_key = new_ca()
        written += write(ca, ca_cert, ca_key)
    leaves = (
        (FRONT_DOOR, "Tollway front door", hosts, ExtendedKeyUsageOID.SERVER_AUTH),
        (TOLLWAY, "Tollway ext_proc", tollway_hosts, ExtendedKeyUsageOID.SERVER_AUTH),
        (ENVOY_CLIENT, ENVOY_NAME, (ENVOY_NAME,), ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    for stem, common_name, names, usage in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(ca_cert, ca_key, key, common_name, names, usage)
        written += write(files(directory, stem), cert, key)
    return written


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    names: Sequence[str],
    usage: x509.ObjectIdentifier,
    days: int = LEAF_DAYS,
) -> x509.Certificate:
    """A certificate for ``names`` (DNS names, IP addresses, or URIs with a scheme)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # (clocks a little behind)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def new_ca(
    common_name: str = "Tollway local CA", days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate (it signs certificates, not CAs) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
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
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str) -> x509.GeneralName:
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write(pair: Pair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[Path]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path, data in (
        (pair.key, key_pem),
        (pair.cert, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        # Made 0600 before a byte is written: a key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    return [pair.cert, pair.key]
