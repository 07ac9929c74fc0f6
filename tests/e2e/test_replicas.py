"""`tollway up --replicas 2`: two `tollway serve` processes behind the one real Envoy."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..tollway_up import UpRun, children, eventually, gone
from .test_front_door import chat_status

pytestmark = pytest.mark.e2e

REPLICA_LINE = re.compile(
    r"http://127\.0\.0\.1:(\d+)/metrics  \(tollway serve #(\d+), ext_proc 127\.0\.0\.1:(\d+)\)"
)


@dataclass(frozen=True)
class Replica:
    number: int
    port: int
    metrics_port: int

    def streams(self) -> float:
        """Its `tollway_extproc_streams_total` (0 while it is down or has served nothing)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        found = re.search(r"^tollway_extproc_streams_total (\S+)$", text, re.M)
        return float(found[1]) if found else 0.0

    def pid(self, run: UpRun) -> int:
        """The process listening on its port, told by the environment `tollway up` gave it
        (0 between a crash and the restart)."""
        wanted = f"TOLLWAY__SERVER__PORT={self.port}".encode()
        for pid in children(run.proc.pid):
            try:
                if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
            except OSError:  # gone, or a zombie
                continue
        return 0


@dataclass
class Replicated:
    run: UpRun
    replicas: list[Replica]

    def chat(self) -> int:
        return chat_status(self.run.url, self.run.key)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    argv = [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0", "--replicas", "2"]
    run = UpRun(argv, cwd=tmp_path_factory.mktemp("replicas"))
    try:
        out = run.wait_banner()
        replicas = [
            Replica(int(number), int(port), int(metrics))
            for metrics, number, port in REPLICA_LINE.findall(out)
        ]
        assert [r.number for r in replicas] == [1, 2], out
        yield Replicated(run, replicas)
    finally:
        run.kill()


def test_both_replicas_start_and_serve_traffic(replicated: Replicated) -> None:
    run, replicas = replicated.run, replicated.replicas
    assert len(children(run.proc.pid)) == 4  # demo upstream, two tollway serve, envoy
    assert len({r.port for r in replicas} | {r.metrics_port for r in replicas}) == 4
    assert all(r.pid(run) for r in replicas)
    # Envoy picks a replica per stream: a few requests reach both.
    for _ in range(40):
        assert replicated.chat() == 200
        if all(r.streams() for r in replicas):
            break
    assert all(r.streams() for r in replicas), [r.streams() for r in replicas]


def test_a_killed_replica_is_restarted_alone_while_the_other_keeps_answering(
    replicated: Replicated,
) -> None:
    run, (first, second) = replicated.run, replicated.replicas
    survivor = first.pid(run)
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:  # one request at a time: at most one in flight on the killed one
        while not done.is_set():
            statuses.append(replicated.chat())

    loader = threading.Thread(target=load)
    loader.start()
    try:
        eventually(lambda: len(statuses) >= 5, 10, "requests before the kill")
        killed = second.pid(run)
        os.kill(killed, signal.SIGKILL)
        at_kill = len(statuses)
        eventually(lambda: second.pid(run) not in (0, killed), 5, "replica #2 restarted")
        answered_meanwhile = len(statuses) - at_kill
        # The restarted replica is healthy again when Envoy sends it streams.
        eventually(lambda: second.streams() > 0, 10, "traffic on the restarted replica")
    finally:
        done.set()
        loader.join(timeout=10)
    failed = [s for s in statuses if s != 200]
    assert len(failed) <= 1, f"{len(failed)} of {len(statuses)} failed: {failed}"
    assert answered_meanwhile >= 3  # while #2 was down (0.5 s at least), #1 answered
    assert first.pid(run) == survivor  # the other one was never touched
    log = run.stderr()
    assert "tollway up: tollway serve #2 exited with code -9; restart 1 in 0.5s" in log, log
    assert "tollway up: tollway serve #2 restarted (restart 1)" in log
    assert "tollway serve #1 exited" not in log
    assert len(children(run.proc.pid)) == 4


def test_ctrl_c_stops_every_replica(replicated: Replicated) -> None:
    kids = eventually(
        lambda: len(children(replicated.run.proc.pid)) == 4 and children(replicated.run.proc.pid),
        10,
        "four children",
    )
    assert replicated.run.interrupt() == 0
    eventually(lambda: all(gone(pid) for pid in kids), 15, "every child gone")
