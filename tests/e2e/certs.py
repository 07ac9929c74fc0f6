"""Throwaway CAs and certificates for tests, made by Tollway's own `extproc.certs`."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from extproc.certs import Pair, new_ca, write
from extproc.certs import issue as issue_cert

__all__ = ["Pair", "issue", "make_ca"]


def make_ca(
    directory: Path, name: str = "Tollway test CA"
) -> tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = new_ca(name, days=1)
    stem = name.replace(" ", "-")
    pair = Pair(directory / f"{stem}.pem", directory / f"{stem}.key")
    write(pair, cert, key)
    return pair, cert, key


def issue(
    directory: Path,
    stem: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> Pair:
    """A certificate for ``names``, for a server or a client."""
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    key = ec.generate_private_key(ec.SECP256R1())
    pair = Pair(directory / f"{stem}.pem", directory / f"{stem}.key")
    write(pair, issue_cert(ca_cert, ca_key, key, stem, names, usage, days=1), key)
    return pair
