"""Keys and provider keys from a Kubernetes Secret volume, reloaded by a running `serve`.

The kubelet writes a Secret's files into a timestamped folder, points the ``..data``
symlink at it and each file's name at ``..data/<name>``; an update writes a new folder
and renames a new ``..data`` over the old one (one atomic swap), then removes the old
folder. The files Tollway names never change themselves: only what they resolve to.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from extproc import keys, server
from extproc.config import Config, Credential, MetricsConfig, ServerConfig, Upstream
from extproc.runtime import Runtime

from .test_server import Harness, request_headers

RELOAD_INTERVAL_S = 0.2


class SecretVolume:
    """A folder laid out as the kubelet lays out a mounted Secret."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    def publish(self, files: dict[str, bytes]) -> None:
        """Write ``files`` as the Secret's new content, swapped in at once."""
        self.generation += 1
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime())
        folder = self.root / f"{stamp}.{self.generation:09d}"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
            (folder / name).chmod(0o444)  # defaultMode 0444; the folder is read-only too
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.rename(tmp, data)  # the one atomic step
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if old is not None:
            for stale in (self.root / old).iterdir():
                stale.unlink()
            (self.root / old).rmdir()


def keys_file_with(*records: keys.KeyRecord, scratch: Path) -> bytes:
    """A keys file's bytes as `tollway keys create` writes them (what goes into the Secret)."""
    scratch.unlink(missing_ok=True)
    keys.write_records(scratch, records)
    return scratch.read_bytes()


@asynccontextmanager
async def serving(volume: SecretVolume) -> AsyncIterator[Harness]:
    config = Config(
        server=ServerConfig(port=0, drain_delay_s=0, reload_interval_s=RELOAD_INTERVAL_S),
        metrics=MetricsConfig(enabled=False),
        auth={"keys_file": volume.root / "keys.yaml"},  # type: ignore[arg-type]
        upstreams={
            "openai": Upstream(
                url="https://api.openai.com", credential=Credential(file=volume.root / "openai")
            )
        },
    )
    runtime = Runtime(config)
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        server.serve(config, runtime=runtime, stop=stop, on_ready=ready.set_result)
    )
    h = Harness(runtime, await asyncio.wait_for(ready, 10))
    try:
        yield h
    finally:
        stop.set()
        await h.channel.close()
        await asyncio.wait_for(task, 10)


async def answer(h: Harness, key: str) -> str:
    """``denied:<status>`` or the provider key Tollway would send upstream."""
    (reply,) = await h.exchange(request_headers(key, "/v1/models"))
    if reply.HasField("immediate_response"):
        return f"denied:{reply.immediate_response.status.code}"
    mutation = reply.request_headers.response.header_mutation
    sent = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    return sent["authorization"]


async def until(h: Harness, key: str, wanted: str, within_s: float) -> float:
    """Seconds until ``key`` gets ``wanted``; fails after ``within_s``."""
    start = time.monotonic()
    while (got := await answer(h, key)) != wanted:
        assert time.monotonic() - start < within_s, f"still {got!r} after {within_s}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_swapped_secret_is_served_within_the_reload_interval(tmp_path: Path) -> None:
    rounds = 3
    volume = SecretVolume(tmp_path / "secret")
    scratch = tmp_path / "scratch.yaml"
    old_key, old_record = keys.generate(name="old")
    volume.publish(
        {"keys.yaml": keys_file_with(old_record, scratch=scratch), "openai": b"sk-provider-1\n"}
    )
    async with serving(volume) as h:
        assert await answer(h, old_key) == "Bearer sk-provider-1"
        current = old_key
        for n in range(2, rounds + 2):  # each swap seen, not just the first
            new_key, new_record = keys.generate(name=f"key-{n}")
            content = {
                "keys.yaml": keys_file_with(new_record, scratch=scratch),
                "openai": f"sk-provider-{n}\n".encode(),
            }
            volume.publish(content)
            # One check of the files, then the next one: within two intervals and a margin.
            within = 2 * RELOAD_INTERVAL_S + 1.0
            await until(h, new_key, f"Bearer sk-provider-{n}", within)
            assert await answer(h, current) == "denied:401"
            current = new_key
        ok = h.metric("tollway_reloads_total", {"file": "keys", "result": "ok"})
        assert ok == rounds


def test_the_volume_is_laid_out_as_the_kubelet_does(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish({"keys.yaml": b"keys: []\n"})
    first = os.readlink(volume.root / "..data")
    volume.publish({"keys.yaml": b"keys: []\n# two\n"})
    names = sorted(p.name for p in volume.root.iterdir())
    assert names == sorted(["..data", os.readlink(volume.root / "..data"), "keys.yaml"])
    assert os.readlink(volume.root / "keys.yaml") == "..data/keys.yaml"
    assert not (volume.root / first).exists()
    assert (volume.root / "keys.yaml").read_bytes().endswith(b"# two\n")
