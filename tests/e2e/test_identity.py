"""Identities beyond keys, through real Envoy: JWTs that Envoy's jwt_authn verifies,
front-door client certificates, and the roles that decide routes, models and limits."""

from __future__ import annotations

import http.server
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extproc import certs, config
from extproc.config import Config

from ..tollway_up import eventually
from .certs import issue
from .conftest import PROVIDER_KEY, Stack, start_stack
from .jwt import Issuer

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.example.test"
BILLING = "spiffe://corp/ns/billing/sa/api"
CHAT = [{"role": "user", "content": "Hello"}]
ROLES = {
    "chat": {"routes": ["openai"], "models": ["gpt-4o-mini"]},
    "everything": {},
    "tight": {"routes": ["openai"], "limits": {"rpm": 2}},
}


class _Jwks(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def idp() -> Issuer:
    return Issuer(ISSUER)


@pytest.fixture(scope="module")
def remote_idp() -> Iterator[tuple[Issuer, str]]:
    """A second issuer whose JWKS Envoy fetches over HTTP (and caches)."""
    issuer = Issuer("https://other-idp.example.test", kid="remote")
    handler = type("Handler", (_Jwks,), {"body": issuer.jwks().encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield issuer, f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def jwt_stack(
    tmp_path_factory: pytest.TempPathFactory, idp: Issuer, remote_idp: tuple[Issuer, str]
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("identity-jwt")
    (workdir / "jwks.json").write_text(idp.jwks())
    remote, remote_uri = remote_idp

    def with_jwt(cfg: Config) -> Config:
        claims = {"tenant": "org", "user": "sub", "roles": "groups"}
        return config.override(
            cfg,
            {
                "identity": {
                    "jwt": {
                        "corp": {
                            "issuer": ISSUER,
                            "audiences": ["tollway"],
                            "jwks_file": workdir / "jwks.json",
                            "clock_skew_s": 5,
                            "claims": claims,
                        },
                        "partner": {
                            "issuer": remote.issuer,
                            "audiences": ["tollway"],
                            "jwks_uri": remote_uri,
                            "claims": claims,
                        },
                    }
                },
                "roles": ROLES,
                "upstreams": {
                    "openai": {"identities": ["jwt", "key"]},
                    "gemini": {"identities": ["jwt", "key"]},
                },
            },
            "test",
        )

    stack = start_stack(workdir, customize=with_jwt)
    try:
        yield stack
    finally:
        stack.gateway.stop()


def _log_line(stack: Stack, text: str) -> str | None:
    """The last line of Envoy's access log with ``text`` in it."""
    log = (stack.gateway.workdir / "envoy.log").read_text()
    return next((line for line in log.splitlines()[::-1] if text in line), None)


def _openai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def _chat(stack: Stack, key: str, model: str = "gpt-4o-mini") -> Any:
    return _openai(stack, key).chat.completions.create(model=model, messages=CHAT, timeout=10)


def test_a_verified_token_is_the_caller_and_never_reaches_the_provider(
    jwt_stack: Stack, idp: Issuer
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    token = idp.token(sub=user, org="acme", groups=["chat"])
    jwt_stack.clear_upstream_requests()
    assert _chat(jwt_stack, token).choices[0].message.content
    (seen,) = jwt_stack.upstream_requests()
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert token not in str(seen)
    assert seen["headers"]["x-tollway-tenant"] == "acme"  # the org claim
    line = eventually(lambda: _log_line(jwt_stack, f'"key_name":"{user}"'), 10, "access log")
    assert '"auth":"jwt"' in line and '"tenant":"acme"' in line
    assert f'"key_id":"jwt:corp:{user}"' in line  # limits by key count per user


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("wrong issuer", "issuer"),
        ("wrong audience", "audience"),
        ("bad signature", "verification fails"),
        ("alg none", ""),
    ],
)
def test_every_bad_token_is_a_401_in_the_providers_shape(
    jwt_stack: Stack, idp: Issuer, case: str, reason: str
) -> None:
    claims: dict[str, Any] = {"sub": "mallory", "groups": ["everything"]}
    token = {
        "expired": lambda: idp.token(lifetime_s=-60, **claims),
        "wrong issuer": lambda: idp.token(issuer="https://evil.example.test", **claims),
        "wrong audience": lambda: idp.token(audience="someone-else", **claims),
        "bad signature": lambda: idp.token(key=ec.generate_private_key(ec.SECP256R1()), **claims),
        "alg none": lambda: idp.token(alg="none", **claims),
    }[case]()
    with pytest.raises(openai.AuthenticationError) as caught:
        _chat(jwt_stack, token)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] in ("invalid_token", "invalid_api_key")
    assert reason.lower() in error["message"].lower()
    assert token not in error["message"]
    # Gemini's route answers in Google's shape.
    answer = httpx.post(
        f"{jwt_stack.url}/v1beta/models/gemini-2.0-flash:generateContent",
        headers={"x-goog-api-key": token},
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        timeout=10,
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["status"] == "UNAUTHENTICATED"


def test_roles_grant_routes_and_models(jwt_stack: Stack, idp: Issuer) -> None:
    chat_only = idp.token(sub="c1", groups=["chat"])
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'gpt-4o'"):
        _chat(jwt_stack, chat_only, model="gpt-4o")
    gemini = httpx.post(
        f"{jwt_stack.url}/v1beta/models/gemini-2.0-flash:generateContent",
        headers={"x-goog-api-key": chat_only},
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        timeout=10,
    )
    assert gemini.status_code == 403 and "no role for this route" in gemini.text
    no_roles = idp.token(sub="nobody")
    with pytest.raises(openai.PermissionDeniedError, match="no role for this route"):
        _chat(jwt_stack, no_roles)
    everything = idp.token(sub="e1", groups="everything other")  # a space-separated claim
    assert _chat(jwt_stack, everything, model="gpt-4o").choices


def test_a_token_only_counts_where_sdks_send_keys(jwt_stack: Stack, idp: Issuer) -> None:
    token = idp.token(sub="q1", groups=["everything"])
    in_query = httpx.post(
        f"{jwt_stack.url}/v1/chat/completions",
        params={"access_token": token},
        json={"model": "gpt-4o-mini", "messages": CHAT},
        timeout=10,
    )
    assert in_query.status_code == 401 and in_query.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError, match="no 'sub' claim"):
        _chat(jwt_stack, idp.token(groups=["everything"]))


def test_a_roles_limits_count_per_user(jwt_stack: Stack, idp: Issuer) -> None:
    first = idp.token(sub=f"t-{uuid.uuid4().hex[:8]}", groups=["tight"])
    second = idp.token(sub=f"t-{uuid.uuid4().hex[:8]}", groups=["tight"])
    assert _chat(jwt_stack, first).choices and _chat(jwt_stack, first).choices
    with pytest.raises(openai.RateLimitError):
        _chat(jwt_stack, first)
    assert _chat(jwt_stack, second).choices  # another user of the role: its own count


def test_keys_still_work_where_tokens_do_and_only_keys_where_not(
    jwt_stack: Stack, idp: Issuer
) -> None:
    assert _chat(jwt_stack, jwt_stack.keys["alice"]).choices
    token = idp.token(sub="a1", groups=["everything"])
    message = anthropic.Anthropic(
        base_url=jwt_stack.url, api_key=jwt_stack.keys["alice"], max_retries=0
    ).messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=CHAT, timeout=10)
    assert message.content
    with pytest.raises(anthropic.AuthenticationError):  # the Anthropic route takes keys only
        anthropic.Anthropic(base_url=jwt_stack.url, api_key=token, max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=16, messages=CHAT, timeout=10
        )
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        _chat(jwt_stack, "tw_000000000000_" + "x" * 43)


def test_a_token_from_a_remote_jwks(jwt_stack: Stack, remote_idp: tuple[Issuer, str]) -> None:
    remote, _ = remote_idp
    assert _chat(jwt_stack, remote.token(sub="p1", groups=["chat"])).choices


# --- client certificates at the front door -------------------------------------------


@pytest.fixture(scope="module")
def cert_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    workdir = tmp_path_factory.mktemp("identity-cert")
    tls = workdir / "tls"
    certs.make(tls)

    def with_certs(cfg: Config) -> Config:
        front = certs.files(tls, certs.FRONT_DOOR)
        return config.override(
            cfg,
            {
                "envoy": {
                    "tls": {
                        "cert_file": front.cert,
                        "key_file": front.key,
                        "client_ca_file": certs.files(tls, certs.CA).cert,
                    }
                },
                "identity": {
                    "certs": {
                        "spiffe://corp/ns/billing/sa/api": {"tenant": "billing", "roles": ["chat"]}
                    }
                },
                "roles": ROLES,
                "upstreams": {"openai": {"identities": ["key", "cert"]}},
            },
            "test",
        )

    stack = start_stack(workdir, customize=with_certs)
    try:
        yield stack, tls
    finally:
        stack.gateway.stop()


def _client_cert(tmp_path: Path, tls: Path, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = certs.files(tls, certs.CA)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    pair = issue(tmp_path, "client", ca_cert, ca_key, server=False, names=(name,))
    return str(pair.cert), str(pair.key)


def _https(tls: Path, cert: tuple[str, str] | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=certs.files(tls, certs.CA).cert)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(verify=context, timeout=10)


def test_a_client_certificate_is_the_caller(cert_stack: tuple[Stack, Path], tmp_path: Path) -> None:
    stack, tls = cert_stack
    billing = _client_cert(tmp_path, tls, BILLING)
    chat = {"model": "gpt-4o-mini", "messages": CHAT}
    with _https(tls, billing) as client:
        assert client.post(f"{stack.url}/v1/chat/completions", json=chat).status_code == 200
        denied = client.post(f"{stack.url}/v1/chat/completions", json={**chat, "model": "gpt-4o"})
        assert denied.status_code == 403 and "client certificate may not use" in denied.text
    line = eventually(lambda: _log_line(stack, '"auth":"cert"'), 10, "access log")
    assert '"tenant":"billing"' in line and f'"key_name":"{BILLING}"' in line
    stranger = _client_cert(tmp_path, tls, "spiffe://corp/ns/other/sa/x")
    with _https(tls, stranger) as client:
        refused = client.post(f"{stack.url}/v1/chat/completions", json=chat)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unknown_client_certificate"
    with _https(tls, None) as client:  # no certificate: a key, as before
        missing = client.post(f"{stack.url}/v1/chat/completions", json=chat)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        with_key = client.post(
            f"{stack.url}/v1/chat/completions",
            json=chat,
            headers={"authorization": f"Bearer {stack.keys['alice']}"},
        )
        assert with_key.status_code == 200
