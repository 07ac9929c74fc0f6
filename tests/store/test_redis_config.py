"""The store section of the config builds the backend; secrets stay out of logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.config import Config, RedisConfig, StoreConfig
from extproc.limits.backend import open_quota
from extproc.limits.memory import MemoryQuota
from extproc.limits.quota import Counter, Take
from extproc.limits.redis_store import RedisQuota
from tests.redis_server import RedisServer


def test_without_redis_the_embedded_store_saves_next_to_the_keys_file(tmp_path: Path) -> None:
    quota = open_quota(StoreConfig(), tmp_path / "tollway-keys.yaml")
    assert isinstance(quota, MemoryQuota) and quota.path == tmp_path / "tollway-budgets.json"
    assert Config().store.redis is None


@pytest.mark.parametrize(
    "bad",
    [
        {"url": "http://127.0.0.1:6379"},
        {"cluster": True, "sentinel": {"master": "m", "nodes": ["h:26379"]}},
        {"hash_tag": "a}b"},
        {"url": "unix:///run/redis.sock", "cluster": True},
        {"sentinel": {"master": "m", "nodes": ["no-port"]}},
    ],
)
def test_bad_redis_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RedisConfig.model_validate(bad)


async def test_password_from_the_environment_and_a_redacted_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path, None, "--requirepass", "s3cret-pw")
    server.start()
    try:
        monkeypatch.setenv("TW_REDIS_PASSWORD", "s3cret-pw")
        cfg = StoreConfig(
            redis=RedisConfig(
                url=f"redis://default:wrong@127.0.0.1:{server.port}/0",
                password_env="TW_REDIS_PASSWORD",
                timeout_ms=2000,
                hash_tag="gw1",
            )
        )
        quota = open_quota(cfg, tmp_path / "keys.yaml")
        assert isinstance(quota, RedisQuota)
        assert "wrong" not in quota.name and "s3cret" not in quota.name
        counter = Counter("r", quota.keys.rate("r", "k"), "rate", 5, 60.0, 0.0, 1)
        assert quota.keys.prefix == "tw:{gw1}:"
        assert (await quota.take(Take("q", 0.0, (counter,)))).remaining == (4,)
        await quota.aclose()
    finally:
        server.stop()


async def test_a_local_server_on_a_unix_socket(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, None, "--unixsocket", str(socket), "--unixsocketperm", "700")
    server.start()
    try:
        cfg = StoreConfig(redis=RedisConfig(url=f"unix://{socket}?db=2", timeout_ms=2000))
        quota = open_quota(cfg, tmp_path / "keys.yaml")
        assert isinstance(quota, RedisQuota)
        counter = Counter("r", quota.keys.rate("r", "k"), "rate", 5, 60.0, 0.0, 1)
        assert (await quota.take(Take("q", 0.0, (counter,)))).remaining == (4,)
        assert (await quota.take(Take("q2", 0.0, (counter,)))).remaining == (3,)
        await quota.aclose()
    finally:
        server.stop()
