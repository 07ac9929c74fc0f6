"""Envoy talks to Tollway over mutual TLS; a peer without a client certificate is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import envoyconf
from extproc.config import Config, ExtprocClientTLS, TLSFiles

from .certs import issue, make_ca
from .conftest import start_stack
from .test_front_door import post

pytestmark = pytest.mark.e2e


def test_envoy_to_tollway_over_mtls(tmp_path: Path) -> None:
    ca, ca_cert, ca_key = make_ca(tmp_path)
    server = issue(tmp_path, "tollway", ca_cert, ca_key, server=True)
    client = issue(tmp_path, "envoy", ca_cert, ca_key, server=False)
    _, s_cert, s_key = make_ca(tmp_path, "Other CA")
    stranger = issue(tmp_path, "stranger", s_cert, s_key, server=False)

    def with_mtls(config: Config) -> Config:
        return config.model_copy(
            update={
                "server": config.server.model_copy(
                    update={
                        "tls": TLSFiles(
                            cert_file=server.cert, key_file=server.key, client_ca_file=ca.cert
                        )
                    }
                ),
                "envoy": config.envoy.model_copy(
                    update={
                        "extproc_client_tls": ExtprocClientTLS(
                            ca_file=ca.cert, cert_file=client.cert, key_file=client.key
                        )
                    }
                ),
            }
        )

    stack = start_stack(tmp_path, customize=with_mtls)
    try:
        ok = post(stack, "/v1/chat/completions", {"authorization": f"Bearer {stack.keys['alice']}"})
        assert ok.status_code == 200, ok.text
        denied = post(stack, "/v1/chat/completions", {"authorization": "Bearer tw_nope"})
        assert denied.status_code == 401  # decided by Tollway over the TLS stream

        port = stack.gateway.config.server.port

        def check(cert: Path | None, key: Path | None) -> int:
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca.cert.read_bytes(),
                private_key=key.read_bytes() if key else None,
                certificate_chain=cert.read_bytes() if cert else None,
            )
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=envoyconf.SERVICE_NAME)
                return int(stub.Check(request, timeout=3).status)

        assert check(client.cert, client.key) == health_pb2.HealthCheckResponse.SERVING
        for cert, key in ((None, None), (stranger.cert, stranger.key)):
            with pytest.raises(grpc.RpcError) as caught:
                check(cert, key)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service=envoyconf.SERVICE_NAME), timeout=3
            )
    finally:
        stack.gateway.stop()
