"""`tollway certs` then `tollway up --tls`: an HTTPS front door and mTLS to Tollway.

The real commands, as the README shows them: the SDKs reach the front door over
HTTPS when they trust the CA `tollway certs` made, and fail without it; Tollway's
gRPC port accepts Envoy's client certificate only (not another name signed by the
same CA, not no certificate, not TLS 1.2).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anthropic
import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google import genai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import certs, envoyconf
from extproc import up as up_module

from ..tollway_up import UpRun, tollway
from .certs import issue

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpRun]:
    workdir = tmp_path_factory.mktemp("tls-up")
    tollway("certs", cwd=workdir, check=True)  # into ./tls, where `up --tls` looks
    run = UpRun([sys.executable, "-m", "extproc", "up", "--demo", "--tls", "--port", "0"], workdir)
    try:
        run.wait_banner()
        yield run
    finally:
        run.kill()


def _workdir(run: UpRun) -> Path:
    return Path(run.keys_file).parent


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(getattr(n, "value", n)) for n in names]


def test_certs_are_private_and_name_each_side(up: UpRun) -> None:
    tls = _workdir(up) / "tls"
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    made = sorted(p.name for p in tls.iterdir())
    assert made == sorted(p.name for p in [*up_module.tls_files(tls), tls / "ca-key.pem"])
    for path in tls.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert _sans(tls / "front-door.pem") == ["localhost", "127.0.0.1"]
    assert _sans(tls / "tollway.pem") == ["tollway", "localhost", "127.0.0.1"]
    assert _sans(tls / "envoy-client.pem") == ["envoy"]


def test_the_three_sdks_over_https_trusting_the_ca(up: UpRun) -> None:
    assert up.url.startswith("https://127.0.0.1:")
    ca_file = _workdir(up) / "tls" / "ca.pem"
    ca = ssl.create_default_context(cafile=ca_file)  # as the banner shows
    client = openai.OpenAI(
        base_url=f"{up.url}/v1",
        api_key=up.key,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=ca),
    )
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], timeout=10
    )
    assert reply.choices[0].message.content
    message = anthropic.Anthropic(
        base_url=up.url,
        api_key=up.key,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(verify=ca),
    ).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=32,
        messages=[{"role": "user", "content": "Hello"}],
        timeout=10,
    )
    assert message.content
    gemini = genai.Client(
        api_key=up.key, http_options={"base_url": up.url, "client_args": {"verify": ca}}
    )
    assert gemini.models.generate_content(model="gemini-2.0-flash", contents="Hello").text
    # Both protocols by ALPN, and TLS 1.2 still accepted at the front door.
    with httpx.Client(verify=ca, http2=True) as h2:
        assert h2.get(f"{up.url}/healthz").http_version == "HTTP/2"
    tls12 = ssl.create_default_context(cafile=ca_file)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with urllib.request.urlopen(f"{up.url}/healthz", context=tls12, timeout=5) as answer:
        assert answer.status == 200


def test_a_client_without_the_ca_is_refused(up: UpRun) -> None:
    client = openai.OpenAI(base_url=f"{up.url}/v1", api_key=up.key, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.models.list(timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{up.url}/healthz", timeout=5)


def _extproc_port(up: UpRun) -> int:
    admin = re.search(r"envoy admin\s+(http://\S+)", up.stdout())
    assert admin, up.stdout()
    with urllib.request.urlopen(f"{admin[1]}/clusters", timeout=5) as answer:
        clusters = answer.read().decode()
    found = re.search(rf"^{envoyconf.EXTPROC_CLUSTER}::127\.0\.0\.1:(\d+)::", clusters, re.M)
    assert found, clusters
    return int(found[1])


def _health(port: int, tls: Path, cert: Path | None, key: Path | None) -> int:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.pem").read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=envoyconf.SERVICE_NAME), timeout=3
        )
        return int(answer.status)


def test_tollway_accepts_envoys_certificate_only(up: UpRun, tmp_path: Path) -> None:
    tls = _workdir(up) / "tls"
    port = _extproc_port(up)
    envoy = certs.files(tls, certs.ENVOY_CLIENT)
    assert _health(port, tls, envoy.cert, envoy.key) == health_pb2.HealthCheckResponse.SERVING

    ca = certs.files(tls, certs.CA)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    # Signed by the same CA, for another workload: refused by name.
    other = issue(tmp_path, "billing", ca_cert, ca_key, server=False, names=("billing",))
    for cert, key in ((other.cert, other.key), (None, None)):
        with pytest.raises(grpc.RpcError) as refused:
            _health(port, tls, cert, key)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused a client certificate for billing" in up.stderr()

    # TLS 1.3 only on Tollway's port (Envoy speaks it).
    old = ssl.create_default_context(cafile=ca.cert)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_cert_chain(envoy.cert, envoy.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")


def test_certs_again_keeps_the_ca(tmp_path: Path) -> None:
    tollway(
        "certs", "--dir", "out", "--hosts", "gateway.internal", "10.0.0.7", cwd=tmp_path, check=True
    )
    out = tmp_path / "out"
    ca, leaf = (out / "ca.pem").read_bytes(), (out / "front-door.pem").read_bytes()
    again = tollway(
        "certs", "--dir", "out", "--tollway-hosts", "tollway.svc", cwd=tmp_path, check=True
    )
    assert "kept the CA" in again.stderr
    assert (out / "ca.pem").read_bytes() == ca  # clients that trust it keep working
    assert (out / "front-door.pem").read_bytes() != leaf
    assert _sans(out / "tollway.pem") == ["tollway", "localhost", "127.0.0.1", "tollway.svc"]
    assert os.stat(out / "ca-key.pem").st_mode & 0o077 == 0


def test_up_tls_without_certificates_says_how_to_make_them(tmp_path: Path) -> None:
    done = tollway("up", "--tls", "--port", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "tollway certs --dir tls" in done.stderr
