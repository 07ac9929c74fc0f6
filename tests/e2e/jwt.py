"""An issuer for tests: an ES256 key, its JWKS, and tokens signed (or not) with it."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from . import leaks


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    def __init__(self, issuer: str, kid: str = "k1") -> None:
        self.issuer, self.kid = issuer, kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        return json.dumps(
            {
                "keys": [
                    {
                        "kty": "EC",
                        "crv": "P-256",
                        "alg": "ES256",
                        "use": "sig",
                        "kid": self.kid,
                        "x": _b64(numbers.x.to_bytes(32, "big")),
                        "y": _b64(numbers.y.to_bytes(32, "big")),
                    }
                ]
            }
        )

    def token(
        self,
        *,
        audience: str = "tollway",
        lifetime_s: int = 300,
        issuer: str | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        alg: str = "ES256",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": issuer or self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime_s,
            **claims,
        }
        header = {"alg": alg, "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        if alg == "none":
            token = f"{signing_input}."
        else:
            der = (key or self.key).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            signature = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
            token = f"{signing_input}.{signature}"
            leaks.plant(signature)  # a token is a credential: no log may hold it
        leaks.plant(token)
        return token
