"""A real redis-server (the Debian package) on a free loopback port, for tests.

Started with no persistence; ``pause``/``resume`` (SIGSTOP/SIGCONT) and
``restart`` (same port, empty: scripts are gone) make faults on demand.
``start_cluster`` and ``start_sentinel_group`` start the other topologies.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.e2e import certs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (maybe with a password)
    except OSError:
        return False


@dataclass(frozen=True)
class Tls:
    """A throwaway CA and a certificate for 127.0.0.1 that it signed."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> Tls:
        ca, ca_cert, ca_key = certs.make_ca(folder)
        server = certs.issue(folder, "redis", ca_cert, ca_key, server=True)
        return cls(ca.cert, server.cert, server.key)

    def args(self, port: int) -> tuple[str, ...]:
        """A TLS port besides the plain one (kept for readiness and admin); replicas
        and sentinels talk to each other over TLS."""
        return (
            *("--tls-port", str(port), "--tls-cert-file", str(self.cert)),
            *("--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca)),
            *("--tls-auth-clients", "no", "--tls-replication", "yes"),
        )


class RedisServer:
    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        *extra: str,
        config: Path | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.extra = (*extra, *(tls.args(self.tls_port) if tls and self.tls_port else ()))
        self.config = config  # a file read first (a sentinel's; it is rewritten by it)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def service_port(self) -> int:
        """The port clients and replicas use: the TLS one when there is one."""
        return self.tls_port or self.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, deadline_s: float = 10.0) -> None:
        binary = redis_server_binary()
        assert binary is not None, "redis-server is not installed (apt-get install redis-server)"
        log = (self.folder / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                *([str(self.config)] if self.config else []),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        end = time.monotonic() + deadline_s
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must hear the kill
            self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port < 55000 and _free(port + 10000):
            return port


def start_cluster(folder: Path, nodes: int = 3, deadline_s: float = 20.0) -> list[RedisServer]:
    """A local Redis Cluster of masters only, every slot assigned, state ok."""
    servers = []
    try:
        for _ in range(nodes):
            port = cluster_port()
            server = RedisServer(
                folder,
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "2000",
            )
            server.start()
            servers.append(server)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=deadline_s,
        )
        end = time.monotonic() + deadline_s
        while True:
            states = [
                subprocess.run(
                    ["redis-cli", "-p", str(s.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for s in servers
            ]
            if all("cluster_state:ok" in state for state in states):
                return servers
            if time.monotonic() > end:
                raise RuntimeError("the local Redis Cluster did not reach state ok")
            time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.stop()
        raise


def _until(what: str, check: Callable[[], bool], deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {deadline_s} s")
        time.sleep(0.02)


@dataclass
class SentinelGroup:
    """A master, one replica and one sentinel (quorum 1) that fails over in about
    a second or two: the master is down after 500 ms without an answer."""

    name: str
    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer
    password: str | None
    tls: Tls | None

    def admin(self, server: RedisServer) -> redis.Redis:
        """A client on ``server``'s plain port."""
        password = None if server is self.sentinel else self.password
        return redis.Redis(port=server.port, password=password, socket_timeout=5)

    def master_port(self) -> int:
        """The master's port as the sentinel names it now."""
        with self.admin(self.sentinel) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


def start_sentinel(
    folder: Path,
    name: str,
    master: RedisServer,
    *,
    password: str | None = None,
    tls: Tls | None = None,
) -> RedisServer:
    """A sentinel (quorum 1) of ``master``, which it calls down after 500 ms."""
    port = free_port()
    config = folder / f"sentinel-{port}.conf"
    lines = [
        f"sentinel monitor {name} 127.0.0.1 {master.service_port} 1",
        f"sentinel down-after-milliseconds {name} 500",
        f"sentinel failover-timeout {name} 2000",
        *([f"sentinel auth-pass {name} {password}"] if password else []),
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentinel = RedisServer(folder, port, "--sentinel", config=config, tls=tls)
    sentinel.start()
    return sentinel


def start_sentinel_group(
    folder: Path,
    name: str = "tollway",
    *,
    password: str | None = None,
    tls: Tls | None = None,
    deadline_s: float = 10.0,
) -> SentinelGroup:
    """A Sentinel-managed master on loopback, its replica in sync and known to the
    sentinel (it fails over only to a replica it has seen)."""
    auth = ("--requirepass", password, "--masterauth", password) if password else ()
    servers: list[RedisServer] = []
    try:
        master = RedisServer(folder, None, "--repl-diskless-sync-delay", "0", *auth, tls=tls)
        master.start()
        servers.append(master)
        follow = ("--replicaof", "127.0.0.1", str(master.service_port))
        replica = RedisServer(folder, None, *follow, *auth, tls=tls)
        replica.start()
        servers.append(replica)
        with redis.Redis(port=replica.port, password=password, socket_timeout=5) as r:
            _until(
                "the replica's link to its master",
                lambda: r.info("replication")["master_link_status"] == "up",
                deadline_s,
            )
        sentinel = start_sentinel(folder, name, master, password=password, tls=tls)
        servers.append(sentinel)
        group = SentinelGroup(name, master, replica, sentinel, password, tls)
        with group.admin(sentinel) as s:

            def replica_known() -> bool:
                known = s.sentinel_slaves(name)
                return len(known) == 1 and known[0]["master-link-status"] == "ok"

            _until("the sentinel's view of the replica", replica_known, deadline_s)
        return group
    except BaseException:
        for server in reversed(servers):
            server.stop()
        raise
