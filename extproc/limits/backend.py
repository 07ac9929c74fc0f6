"""The quota backend a process runs with, from the ``store`` config section.

With ``store.redis`` every replica shares Redis; without it this process keeps
the counters (one replica) and saves budget spend next to the keys file.
There is no silent fallback from one to the other: a Redis that is down is a
backend failure, decided by each stage's fail-open/fail-closed policy.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import RedisConfig, StoreConfig
from ..store import NO_OBSERVER, StoreObserver
from ..store.breaker import Breaker
from .memory import MemoryQuota
from .quota import Keys
from .redis_store import RedisQuota, connect, redact_url

BUDGETS_FILE = "tollway-budgets.json"


def open_quota(
    store: StoreConfig, keys_file: Path, observer: StoreObserver = NO_OBSERVER
) -> MemoryQuota | RedisQuota:
    if store.redis is None:
        path = store.budgets_file or keys_file.parent / BUDGETS_FILE
        return MemoryQuota(path, persist_every_s=store.persist_every_s)
    return redis_quota(store.redis, observer)


def redis_quota(cfg: RedisConfig, observer: StoreObserver = NO_OBSERVER) -> RedisQuota:
    timeout_s = cfg.timeout_ms / 1000
    password = os.environ.get(cfg.password_env) if cfg.password_env else None
    nodes = []
    if cfg.sentinel is not None:
        for node in cfg.sentinel.nodes:
            host, _, port = node.rpartition(":")
            nodes.append((host, int(port)))
    client = connect(
        cfg.url,
        cluster=cfg.cluster,
        sentinel_master=cfg.sentinel.master if cfg.sentinel is not None else None,
        sentinel_nodes=nodes,
        password=password,
        max_connections=cfg.max_connections,
        timeout_s=timeout_s,
    )
    return RedisQuota(
        client,
        keys=Keys(cfg.hash_tag),
        timeout_s=timeout_s,
        clock=cfg.clock,
        breaker=Breaker(cfg.breaker_failures, cfg.breaker_cool_down_s),
        observer=observer,
        name=redact_url(cfg.url),
    )
