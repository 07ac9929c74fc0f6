"""The pipelined RESP client (extproc/limits/resp.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.limits.resp import Connection, Endpoint, ReplyError
from tests.e2e.certs import issue, make_ca
from tests.redis_server import RedisServer, free_port


@pytest.fixture
async def conn(shared_redis: RedisServer) -> AsyncIterator[Connection]:
    connection = Connection.from_url(shared_redis.url)
    yield connection
    await connection.aclose()


def started(tmp_path: Path, *extra: str) -> RedisServer:
    server = RedisServer(tmp_path, None, *extra)
    server.start()
    return server


async def test_pipelined_replies_come_back_in_order(conn: Connection) -> None:
    commands = [("SET", "resp:n", 0)] + [("INCR", "resp:n") for _ in range(300)]
    commands += [("ECHO", f"e{i}") for i in range(300)]
    got = await conn.execute(commands)
    assert got[:301] == [b"OK", *range(1, 301)]
    assert got[301:] == [f"e{i}".encode() for i in range(300)]
    # Many callers at once, each a pipeline of its own, on the one connection.
    many = await asyncio.gather(*(conn.execute([("ECHO", i), ("ECHO", -i)]) for i in range(100)))
    assert many == [[str(i).encode(), str(-i).encode()] for i in range(100)]


async def test_an_error_reply_is_that_commands_value_only(conn: Connection) -> None:
    got = await conn.execute(
        [
            ("SET", "resp:s", "text"),
            ("INCR", "resp:s"),  # not an integer
            ("EVALSHA", "0" * 40, 0),  # no such script
            ("NOSUCHCOMMAND",),
            ("GET", "resp:s"),
        ]
    )
    assert got[0] == b"OK" and got[4] == b"text"
    assert [type(e) for e in got[1:4]] == [ReplyError] * 3
    assert [e.code for e in got[1:4]] == ["ERR", "NOSCRIPT", "ERR"]


async def test_a_password_a_user_and_a_wrong_password(tmp_path: Path) -> None:
    server = started(
        tmp_path, "--requirepass", "s3cret", "--user", "tw", "on", ">tw-pw", "~*", "&*", "+@all"
    )
    base = f"127.0.0.1:{server.port}"
    try:
        for url, password in [
            (f"redis://:s3cret@{base}/0", None),
            (f"redis://tw:tw-pw@{base}/0", None),
            (f"redis://:wrong@{base}/0", "s3cret"),  # from the environment: it wins
        ]:
            connection = Connection.from_url(url, password=password)
            assert await connection.execute([("PING",)]) == [b"PONG"]
            await connection.aclose()

        wrong = Connection.from_url(f"redis://:wrong@{base}/0")
        with pytest.raises(ConnectionError, match=r"refused AUTH: WRONGPASS"):
            await wrong.execute([("PING",)])
        assert not wrong.connected
        none = Connection.from_url(f"redis://{base}/0")
        assert [type(r) for r in await none.execute([("PING",)])] == [ReplyError]  # NOAUTH
        await none.aclose()
    finally:
        server.stop()


async def test_the_database_is_selected(shared_redis: RedisServer) -> None:
    port = shared_redis.port
    admin = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/3")
    await admin.delete("resp:db")
    connection = Connection.from_url(f"redis://127.0.0.1:{port}/3")
    try:
        assert await connection.execute([("SET", "resp:db", "three")]) == [b"OK"]
        assert await admin.get("resp:db") == b"three"
        (info,) = await connection.execute([("CLIENT", "INFO")])
        assert b" db=3 " in info
    finally:
        await admin.delete("resp:db")
        await admin.aclose()
        await connection.aclose()


async def test_a_killed_connection_fails_what_is_pending_and_the_next_call_reconnects(
    shared_redis: RedisServer, conn: Connection
) -> None:
    admin = aioredis.Redis.from_url(shared_redis.url)
    try:
        (first,) = await conn.execute([("CLIENT", "ID")])
        pending = await conn.send([("BLPOP", "resp:never", 10), ("PING",)])
        await admin.client_kill_filter(_id=first)
        for future in pending:
            with pytest.raises(OSError):
                await asyncio.wait_for(future, 2.0)
        assert not conn.connected
        (second,) = await conn.execute([("CLIENT", "ID")])
        assert second != first and conn.connected
    finally:
        await admin.aclose()


async def test_a_stopped_server_fails_what_is_pending_and_a_restarted_one_answers(
    own_redis: RedisServer,
) -> None:
    connection = Connection.from_url(own_redis.url)
    try:
        pending = await connection.send([("BLPOP", "resp:never", 10)])
        own_redis.stop()
        with pytest.raises(OSError):
            await asyncio.wait_for(pending[0], 2.0)
        with pytest.raises(OSError):  # refused: nobody listens
            await connection.execute([("PING",)])
        own_redis.start()
        assert await connection.execute([("PING",)]) == [b"PONG"]
    finally:
        await connection.aclose()


async def test_a_late_reply_is_dropped_and_later_ones_reach_their_callers(
    conn: Connection,
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await conn.execute([("BLPOP", "resp:empty", 0.3)])  # answers nil at 0.3 s
    assert await conn.execute([("ECHO", "after")]) == [b"after"]  # not the BLPOP's nil

    futures = await conn.send([("ECHO", "a"), ("ECHO", "b"), ("ECHO", "c")])
    futures[1].cancel()  # its caller gave up
    assert [await futures[0], await futures[2]] == [b"a", b"c"]
    assert await conn.execute([("ECHO", "d")]) == [b"d"]


async def test_callers_arriving_while_it_connects_share_one_connection(conn: Connection) -> None:
    ids = await asyncio.gather(*(conn.execute([("CLIENT", "ID")]) for _ in range(50)))
    assert len({i for (i,) in ids}) == 1


async def test_setting_up_is_bounded_by_the_callers_deadline(tmp_path: Path) -> None:
    server = started(tmp_path, "--requirepass", "pw")
    connection = Connection.from_url(f"redis://:pw@127.0.0.1:{server.port}/2")
    try:
        server.pause()  # it accepts (the kernel does) but never answers AUTH
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await connection.execute([("PING",)])
        assert time.monotonic() - began < 0.05 + 0.2
        server.resume()
        assert await connection.execute([("PING",)]) == [b"PONG"]
    finally:
        server.resume()
        server.stop()
        await connection.aclose()


async def test_close_fails_what_is_pending_at_once_and_the_next_call_reconnects(
    own_redis: RedisServer,
) -> None:
    connection = Connection.from_url(own_redis.url)
    try:
        assert await connection.execute([("PING",)]) == [b"PONG"]
        own_redis.pause()
        pending = await connection.send([("PING",), ("PING",)])
        connection.close()
        assert all(isinstance(f.exception(), ConnectionError) for f in pending)
        own_redis.resume()
        assert await connection.execute([("PING",)]) == [b"PONG"]
    finally:
        own_redis.resume()
        await connection.aclose()


async def test_tls_verifies_the_server_and_can_present_a_client_certificate(
    tmp_path: Path,
) -> None:
    ca, ca_cert, ca_key = make_ca(tmp_path)
    server_pair = issue(tmp_path, "redis", ca_cert, ca_key, server=True)
    client_pair = issue(tmp_path, "client", ca_cert, ca_key, server=False)
    tls_port = free_port()
    server = started(
        tmp_path,
        *("--tls-port", str(tls_port), "--tls-ca-cert-file", str(ca.cert)),
        *("--tls-cert-file", str(server_pair.cert), "--tls-key-file", str(server_pair.key)),
    )
    base = f"rediss://127.0.0.1:{tls_port}/0"
    client = f"ssl_certfile={client_pair.cert}&ssl_keyfile={client_pair.key}"
    try:
        trusted = Connection.from_url(f"{base}?ssl_ca_certs={ca.cert}&{client}")
        assert await trusted.execute([("PING",)]) == [b"PONG"]
        await trusted.aclose()

        unknown_ca = Connection.from_url(f"{base}?{client}")
        with pytest.raises(ssl.SSLCertVerificationError):
            await unknown_ca.execute([("PING",)])

        unchecked = Connection.from_url(f"{base}?ssl_cert_reqs=none&{client}")
        assert await unchecked.execute([("PING",)]) == [b"PONG"]
        await unchecked.aclose()

        no_client_cert = Connection.from_url(f"{base}?ssl_ca_certs={ca.cert}")
        with pytest.raises(OSError):  # the server asks for one (tls-auth-clients yes)
            await no_client_cert.execute([("PING",)])
    finally:
        server.stop()


async def test_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = started(tmp_path, "--unixsocket", str(path), "--unixsocketperm", "700")
    connection = Connection.from_url(f"unix://{path}?db=1")
    try:
        pong, info = await connection.execute([("PING",), ("CLIENT", "INFO")])
        assert pong == b"PONG" and b" db=1 " in info
    finally:
        await connection.aclose()
        server.stop()


@pytest.mark.parametrize(
    ("url", "password", "expect"),
    [
        ("redis://127.0.0.1:6379/0", None, Endpoint()),
        ("redis://redis.internal", None, Endpoint(host="redis.internal")),
        ("redis://:pw@h:7000/4", None, Endpoint(host="h", port=7000, password="pw", db=4)),
        ("redis://u:pw@h/1", "env", Endpoint(host="h", username="u", password="env", db=1)),
        ("unix:///run/redis.sock?db=2", None, Endpoint(path="/run/redis.sock", db=2)),
    ],
)
def test_endpoints_from_urls(url: str, password: str | None, expect: Endpoint) -> None:
    assert Endpoint.from_url(url, password) == expect


def test_tls_settings_from_the_url() -> None:
    default = Endpoint.from_url("rediss://h:6380").tls
    assert default is not None
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    off = Endpoint.from_url("rediss://h?ssl_cert_reqs=none").tls
    assert off is not None and off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    no_name = Endpoint.from_url("rediss://h?ssl_check_hostname=false").tls
    assert no_name is not None and no_name.verify_mode == ssl.CERT_REQUIRED
    assert not no_name.check_hostname
    with pytest.raises(ValueError):
        Endpoint.from_url("rediss://h?ssl_cert_reqs=maybe")
    with pytest.raises(ValueError):
        Endpoint.from_url("http://h")


def test_setup_commands() -> None:
    assert Endpoint().setup() == []
    assert Endpoint(password="p", db=3).setup() == [("AUTH", "p"), ("SELECT", "3")]
    assert Endpoint(username="u", password="p").setup() == [("AUTH", "u", "p")]


async def test_a_reply_read_in_the_turn_its_deadline_passes_still_counts(conn: Connection) -> None:
    """Under load one turn of the loop can outlast a deadline: a reply that arrived in
    time is read in the same turn as the deadline's timer, and must win."""
    await conn.execute([("PING",)])  # connected
    loop = asyncio.get_running_loop()
    loop.call_soon(time.sleep, 0.05)  # the loop is busy past the deadline; Redis answers
    assert await conn.execute([("PING",)], loop.time() + 0.01) == [b"PONG"]


async def test_no_reply_by_the_deadline_is_a_timeout_and_later_replies_are_not_shifted(
    conn: Connection,
) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await conn.execute([("BLPOP", "resp:empty", 0.3)], loop.time() + 0.05)
    assert await conn.execute([("ECHO", "after")], loop.time() + 2) == [b"after"]
