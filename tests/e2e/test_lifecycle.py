"""Start-up, drain and shutdown of the real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import envoyconf, up

from .conftest import Stack
from .test_front_door import CHAT, eventually, post

pytestmark = pytest.mark.e2e


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=envoyconf.SERVICE_NAME)
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status)
        except grpc.RpcError:
            return -1  # unreachable


def test_sigterm_drains_then_envoy_fails_closed(fresh_stack: Stack) -> None:
    stack, port = fresh_stack, fresh_stack.gateway.config.server.port
    alice = {"authorization": f"Bearer {fresh_stack.keys['alice']}"}
    assert health(port) == health_pb2.HealthCheckResponse.SERVING

    fresh_stack.tollway.send_signal(signal.SIGTERM)
    eventually(lambda: health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=2)
    admin = stack.gateway.config.envoy.admin_port
    eventually(lambda: not up.extproc_healthy(admin), timeout=3)

    # The only replica is out: Envoy fails closed rather than sending it traffic in panic
    # mode (healthy_panic_threshold 0); with other replicas, traffic moves to them. The
    # workers see the health change a moment after the admin endpoint does.
    def refused() -> httpx.Response | None:
        r = post(stack, "/v1/chat/completions", alice)
        return r if r.status_code == 503 else None

    assert eventually(refused, timeout=3).json()["error"]["code"] == "service_unavailable"

    assert fresh_stack.tollway.wait(timeout=15) == 0
    r = post(stack, "/v1/chat/completions", alice)
    assert r.status_code == 503  # fail closed, as an OpenAI-style error
    assert r.json()["error"]["code"] == "service_unavailable"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_tollway_up_demo_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        text=True,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        eventually(lambda: any("Ctrl-C" in line for line in lines) or proc.poll() is not None, 60)
        out = "".join(lines)
        url = re.search(r"front door\s+(http://\S+)", out)
        key = re.search(r"demo key\s+(tw_\S+)", out)
        assert url and key, out
        assert f"curl -s {url[1]}/v1/chat/completions" in out

        client = openai.OpenAI(base_url=f"{url[1]}/v1", api_key=key[1], max_retries=0, timeout=10)
        assert client.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
        streamed = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        wrong = httpx.post(
            f"{url[1]}/v1/chat/completions",
            json=CHAT,
            timeout=10,
            headers={"authorization": "Bearer tw_wrong"},
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

        children = _children(proc.pid)
        assert len(children) == 3  # demo upstream, tollway serve, envoy
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        for pid in children:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even SIGKILL of `tollway up` leaves no orphans (PR_SET_PDEATHSIG)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        children = eventually(
            lambda: len(_children(proc.pid)) == 3 and _children(proc.pid), timeout=30
        )
    finally:
        proc.kill()
        proc.wait()
    eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=15)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_child_whose_supervisor_died_before_it_started_never_runs() -> None:
    """`tollway up` killed between fork and PR_SET_PDEATHSIG: the signal would never come."""
    gone = os.getpid() + 1  # stands for a parent that is no longer ours
    child = subprocess.Popen(["sleep", "30"], preexec_fn=up._die_with(gone))
    try:
        assert child.wait(timeout=10) == 1
    finally:
        child.kill()
