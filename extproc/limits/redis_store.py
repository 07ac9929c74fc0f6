"""The shared quota backend: Redis (single node, Sentinel or Cluster).

A take is one EVALSHA of ``TAKE_LUA`` for all of a request's counters (checked
and reserved atomically: nothing reserved unless all enforced counters
admit); a settle is one EVALSHA of ``SETTLE_LUA``, queued and written by one
writer task (store/writer.py). redis-py's registered scripts reload
themselves after NOSCRIPT (a restarted Redis). The scripts mirror quota.py's
functions; floats cross as "%.17g" text so both backends compute the same
doubles.

Clock: by default the scripts read Redis's ``TIME`` (``clock: server``), so
replicas whose clocks differ still share one timeline for rates and leases;
``clock: caller`` uses ``Take.now`` instead (tests with an injected clock).
Calendar windows are always the caller's (the window id is in the key).

Failure, bounded: every call has a deadline (``timeout_ms``, default 20).
After ``breaker_failures`` failures in a row a breaker opens: ``take`` then
raises StoreUnavailable("breaker_open") at once, without I/O, and the stage's
fail-open/fail-closed policy decides; every ``breaker_cool_down_s`` one call
probes, and its success closes the breaker. redis-py's own retries are off:
a take must never run twice. Settlements are idempotent (a request's
reservation record becomes a "settled" mark inside the same script), so the
writer retries them for ``settle_retry_for_s`` and nothing is charged twice.

Keys (quota.Keys) share one hash tag, so a request's keys, its reservation
record included, are in one Cluster slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..store import NO_OBSERVER, StoreObserver
from ..store.breaker import Breaker
from ..store.writer import Writer
from .quota import (
    BUDGET_KEEP_S,
    RESERVATION_TTL_S,
    Counter,
    Keys,
    Level,
    Settle,
    StoreUnavailable,
    Take,
    Verdict,
)

log = logging.getLogger("tollway")

Client = aioredis.Redis | RedisCluster
_KIND = {"rate": "r", "concurrent": "c", "budget": "b"}

# Both scripts: ARGV[1] is the caller's clock, or "" for Redis TIME (replicas agree).
_NOW_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# ARGV: now ("" = server TIME), request id, reservation ttl (s), peek ("1": read only),
# then 6 per counter: kind (r|c|b), limit, period_s, window_end, amount, shadow (1|0).
# KEYS: the request's record, then one per counter.
# Returns: allowed, denied_by (0-based, -1), retry_after, shadow_denied ("i,j"),
# then 3 per counter: remaining, reset_s, used.
TAKE_LUA = (
    _NOW_LUA
    + """
local rid, record_ttl, peek = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local n = #KEYS - 1
local INF = math.huge
local KEEP = tonumber(ARGV[5 + n * 6]) -- budgets outlive their window
-- '%.17g' round-trips a double; tostring would keep only 14 digits.
local function fmt(x) return string.format('%.17g', x) end
local function ms(s) return math.max(1000, math.ceil(s * 1000) + 1000) end
local function rate_remaining(period, t, ahead)
  return math.max(0, math.floor((period - ahead) / t))
end

-- Check every counter (quota.py: rate_check, concurrent_check, budget_check).
local cs = {}
for i = 1, n do
  local a = 4 + (i - 1) * 6
  local c = {key = KEYS[i + 1], kind = ARGV[a + 1], limit = tonumber(ARGV[a + 2]),
             period = tonumber(ARGV[a + 3]), window_end = tonumber(ARGV[a + 4]),
             amount = tonumber(ARGV[a + 5]), amount_s = ARGV[a + 5], shadow = ARGV[a + 6] == '1'}
  if c.kind == 'r' then
    local tat = tonumber(redis.call('GET', c.key))
    if c.limit <= 0 then
      c.ok, c.retry, c.rem_t, c.rem_n, c.reset_t, c.reset_n = false, INF, 0, 0, 0, 0
    else
      local t = c.period / c.limit
      local base = now
      if tat and tat > now then base = tat end
      c.new_tat = base + c.amount * t
      c.ok = c.new_tat - now <= c.period
      if c.ok then c.retry = 0
      elseif c.amount > c.limit then c.retry = INF
      else c.retry = c.new_tat - c.period - now end
      c.rem_t = rate_remaining(c.period, t, c.new_tat - now)
      c.rem_n = rate_remaining(c.period, t, base - now)
      c.reset_t, c.reset_n = c.new_tat - now, base - now
    end
    c.used = math.max(0, c.limit - c.rem_n)
  elseif c.kind == 'c' then
    local live = redis.call('ZCOUNT', c.key, '(' .. fmt(now), '+inf')
    local held = 0
    local earliest = 0
    if live > 0 then
      earliest = tonumber(redis.call('ZRANGEBYSCORE', c.key, '(' .. fmt(now), '+inf',
                                     'WITHSCORES', 'LIMIT', 0, 1)[2])
      local latest = tonumber(redis.call('ZREVRANGEBYSCORE', c.key, '+inf', '(' .. fmt(now),
                                         'WITHSCORES', 'LIMIT', 0, 1)[2])
      held = math.max(0, latest - now)
    end
    c.ok = live + 1 <= c.limit
    if c.ok then c.retry = 0
    elseif c.limit <= 0 then c.retry = INF
    else c.retry = math.max(0, earliest - now) end
    c.rem_t, c.rem_n = math.max(0, c.limit - live - 1), math.max(0, c.limit - live)
    c.reset_t, c.reset_n = math.max(held, c.period), held
    c.used = live
  else
    local used = tonumber(redis.call('GET', c.key)) or 0
    local reset = math.max(0, c.window_end - now)
    c.ok = used + c.amount <= c.limit
    if c.ok then c.retry = 0
    elseif c.amount > c.limit then c.retry = INF
    else c.retry = reset end
    c.rem_t, c.rem_n = math.max(0, c.limit - used - c.amount), math.max(0, c.limit - used)
    c.reset_t, c.reset_n = reset, reset
    c.used = used
  end
  cs[i] = c
end

-- All or nothing (quota.verdict): any enforced denial reserves nothing anywhere.
local denied_by, retry, shadow_denied = -1, 0, {}
for i = 1, n do
  local c = cs[i]
  if not c.ok then
    if c.shadow then
      shadow_denied[#shadow_denied + 1] = tostring(i - 1)
    else
      if denied_by < 0 then denied_by = i - 1 end
      retry = math.max(retry, c.retry)
    end
  end
end
local allowed = denied_by < 0

local out = {allowed and '1' or '0', tostring(denied_by), fmt(retry),
             table.concat(shadow_denied, ',')}
local reserved = {}
for i = 1, n do
  local c = cs[i]
  local took = allowed and c.ok and not peek
  if took then
    if c.kind == 'r' then
      redis.call('SET', c.key, fmt(c.new_tat), 'PX', ms(c.new_tat - now))
    elseif c.kind == 'c' then
      redis.call('ZREMRANGEBYSCORE', c.key, '-inf', fmt(now))
      redis.call('ZADD', c.key, fmt(now + c.period), rid)
      redis.call('PEXPIRE', c.key, ms(c.reset_t))
    else
      redis.call('INCRBY', c.key, c.amount_s)
      redis.call('PEXPIRE', c.key, ms(c.window_end + KEEP - now))
    end
  end
  reserved[i] = took and c.amount_s or '-1'
  if took then
    out[#out + 1], out[#out + 2] = fmt(c.rem_t), fmt(c.reset_t)
  else
    out[#out + 1], out[#out + 2] = fmt(c.rem_n), fmt(c.reset_n)
  end
  out[#out + 1] = fmt(c.used)
end
if allowed and not peek then
  redis.call('SET', KEYS[1], table.concat(reserved, ','), 'PX', ms(record_ttl))
end
return out
"""
)

# ARGV: now ("" = server TIME), request id, settled-mark ttl (s), then 5 per counter:
# kind, limit, period_s, window_end, actual. KEYS: the request's record, one per counter.
# Returns 1 when applied, 0 when this request was settled already.
SETTLE_LUA = (
    _NOW_LUA
    + """
local rid, mark_ttl = ARGV[2], tonumber(ARGV[3])
local n = #KEYS - 1
local KEEP = tonumber(ARGV[4 + n * 5])
local function fmt(x) return string.format('%.17g', x) end
local function ms(s) return math.max(1000, math.ceil(s * 1000) + 1000) end

local record = redis.call('GET', KEYS[1])
if record == 'S' then return 0 end
-- No record: the take never ran (the stage failed open): charge the actual amounts.
local held = {}
if record then
  for v in string.gmatch(record, '[^,]+') do held[#held + 1] = tonumber(v) end
end

for i = 1, n do
  local a = 3 + (i - 1) * 5
  local key, kind = KEYS[i + 1], ARGV[a + 1]
  local limit, period = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local window_end, actual = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local h = held[i] or 0
  if kind == 'c' then
    redis.call('ZREM', key, rid)
  elseif h ~= -1 and actual - h ~= 0 then
    local delta = actual - h
    if kind == 'r' then
      -- quota.rate_settle: over-use moves the TAT on; under-use never below now.
      if limit > 0 then
        local tat = tonumber(redis.call('GET', key))
        local base = now
        if tat and tat > now then base = tat end
        local moved = base + delta * (period / limit)
        if moved > now then
          redis.call('SET', key, fmt(moved), 'PX', ms(moved - now))
        else
          redis.call('DEL', key)
        end
      end
    else
      local used = tonumber(redis.call('GET', key)) or 0
      redis.call('SET', key, fmt(math.max(0, used + delta)), 'PX', ms(window_end + KEEP - now))
    end
  end
end
redis.call('SET', KEYS[1], 'S', 'PX', ms(mark_ttl))
return 1
"""
)


class _HiredisPacking:
    """Commands packed by hiredis in C: redis-py's asyncio connections pack in Python
    (its sync ones already use hiredis), about a third of a take's CPU here."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: "SCRIPT LOAD" is two words. Arguments are str, bytes or int
        # here (floats are sent as text, see _num).
        name = args[0]
        if isinstance(name, str) and " " in name:
            args = (*name.split(), *args[1:])
        return [hiredis.pack_command(args)]


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def _num(x: float | int) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def redact_url(url: str, mask: str = "***") -> str:
    """The URL with its password replaced by ``mask`` (for logs), or without one."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    auth = f"{user}:{mask}@" if mask else (f"{user}@" if user else "")
    return urlunsplit(parts._replace(netloc=f"{auth}{host}"))


def connect(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    cluster: bool = False,
    sentinel_master: str | None = None,
    sentinel_nodes: Sequence[tuple[str, int]] = (),
    password: str | None = None,
    max_connections: int = 64,
    timeout_s: float = 0.02,
) -> Client:
    """A client for a single node, a Cluster (``url`` names any node) or a Sentinel
    master (``url`` gives the credentials, database and TLS; sentinels are
    ``sentinel_nodes``). redis-py's retries are off: a take must not run twice.
    ``password`` (from the environment or a file) overrides the URL's."""
    extra: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": max(timeout_s * 5, 1.0),  # a backstop; calls have their own deadline
        "socket_connect_timeout": max(timeout_s * 5, 1.0),
        "max_connections": max_connections,
    }
    if password is not None:
        extra["password"] = password
        url = redact_url(url, "")  # the URL's own would win over the keyword
    if cluster:
        return RedisCluster.from_url(url, **extra)
    if sentinel_master is not None:
        kwargs = cast(dict[str, Any], parse_url(url))
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        # Not rediss://'s SSLConnection: the sentinel pool's own connections ask the
        # sentinels where the master is, and ``ssl`` picks their TLS variant.
        kwargs.pop("connection_class", None)
        kwargs["ssl"] = urlsplit(url).scheme == "rediss"
        kwargs.update(extra)
        # Each sentinel is asked once, in turn, within a share of the call's deadline.
        # Else redis-py's retries, or a sentinel that hangs, outlast every call: each
        # call's deadline ends while one asks it, and the next asks it first again.
        share = timeout_s / (len(sentinel_nodes) + 1)
        asks = {"socket_timeout": share, "socket_connect_timeout": share}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinel_nodes), sentinel_kwargs={**asks, "retry": Retry(NoBackoff(), 0)}, **kwargs
        )
        return cast(aioredis.Redis, sentinel.master_for(sentinel_master))
    # A full pool waits for a connection (within the call's deadline) rather than failing.
    tls = urlsplit(url).scheme == "rediss"
    extra["connection_class"] = _SSLConnection if tls else _Connection
    pool = aioredis.BlockingConnectionPool.from_url(url, timeout=None, **extra)
    return aioredis.Redis.from_pool(pool)


T = TypeVar("T")
SETTLE_BATCH = 64  # settlements written in one round trip, at most
TAKE_BATCH = 64  # takes sent in one round trip, at most


class RedisQuota:
    def __init__(
        self,
        client: Client,
        *,
        keys: Keys | None = None,
        timeout_s: float = 0.02,
        settle_timeout_s: float = 0.25,
        clock: Literal["server", "caller"] = "server",
        breaker: Breaker | None = None,
        observer: StoreObserver = NO_OBSERVER,
        reservation_ttl_s: float = RESERVATION_TTL_S,
        settled_ttl_s: float = 600.0,  # longer than the writer retries a settlement
        settle_retry_for_s: float = 30.0,
        queue_size: int = 10_000,
        drain_s: float = 5.0,
        name: str = "redis",  # for logs: a redacted URL
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.timeout_s = timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.server_time = clock == "server"
        self.observer = observer
        self.breaker = breaker or Breaker()
        self.breaker.on_change = self._breaker_changed  # metrics and one log line
        self.reservation_ttl_s = reservation_ttl_s
        self.settled_ttl_s = settled_ttl_s
        self.drain_s = drain_s
        self.name = name
        self._take = client.register_script(TAKE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        # Takes that arrive while a batch is on the wire go together in the next one.
        self._queued: list[tuple[float, Take, asyncio.Future[Verdict]]] = []
        self._sending = False
        self._sender: asyncio.Task[None] | None = None
        self.writer: Writer[Settle] = Writer(
            self._write_settles,
            batch=SETTLE_BATCH,
            maxsize=queue_size,
            retry_for_s=settle_retry_for_s,
            on_drop=observer.settlement_dropped,
        )

    # The Quota protocol ---------------------------------------------------------

    def take(self, take: Take) -> Awaitable[Verdict]:
        """An awaitable verdict; raises StoreUnavailable at once while the breaker is open."""
        self._admit("take")
        if isinstance(self.client, RedisCluster):  # its pipelines route EVALSHA poorly
            return self._take_verdict(take)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Verdict] = loop.create_future()
        self._queued.append((time.monotonic(), take, answer))
        if not self._sending:
            self._sending = True
            self._sender = loop.create_task(self._send_takes())  # held: tasks are weakly kept
        return answer

    def settle(self, settle: Settle) -> None:
        self.writer.put(settle)

    async def usage(self, counters: Sequence[Counter], now: float) -> tuple[Level, ...]:
        self._admit("usage")
        raw = await self._call("usage", self._take, *self._take_args("", now, counters, peek=True))
        return tuple(
            Level(int(raw[6 + 3 * i]), int(raw[4 + 3 * i]), float(raw[5 + 3 * i]))
            for i in range(len(counters))
        )

    async def aclose(self) -> None:
        await self.writer.drain(self.drain_s)
        await self.client.aclose()

    # Internals ------------------------------------------------------------------

    async def _send_takes(self) -> None:
        """One pipeline of EVALSHA at a time, of every take queued meanwhile (at most
        TAKE_BATCH), each within its deadline from when it was asked for."""
        try:
            while self._queued:
                batch, self._queued = self._queued[:TAKE_BATCH], self._queued[TAKE_BATCH:]
                await self._take_batch(batch)
        finally:
            self._sending = False

    async def _take_batch(self, batch: list[tuple[float, Take, asyncio.Future[Verdict]]]) -> None:
        left = batch[0][0] + self.timeout_s - time.monotonic()  # the oldest's deadline
        try:
            takes = [take for _, take, _ in batch]
            raws = await self._guarded("take", left, lambda: self._take_pipeline(takes))
        except StoreUnavailable as failure:
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(failure)
            return
        for (_, take, answer), raw in zip(batch, raws, strict=True):
            if not answer.done():
                answer.set_result(self._verdict(take, raw))

    async def _take_pipeline(self, takes: list[Take]) -> list[list[bytes]]:
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for take in takes:
                keys, args = self._take_args(take.request_id, take.now, take.counters, peek=False)
                pipe.evalsha(self._take.sha, len(keys), *keys, *args)
            try:
                return cast(list[list[bytes]], await pipe.execute())
            except NoScriptError:  # Redis restarted: its scripts are gone (none ran)
                if attempt == 2:
                    raise
                await self.client.script_load(TAKE_LUA)
        raise AssertionError("unreachable")

    async def _take_verdict(self, take: Take) -> Verdict:
        keys, args = self._take_args(take.request_id, take.now, take.counters, peek=False)
        return self._verdict(take, await self._call("take", self._take, keys, args))

    def _verdict(self, take: Take, raw: list[bytes]) -> Verdict:
        n = len(take.counters)
        shadow = raw[3].decode()
        return Verdict(
            allowed=raw[0] == b"1",
            denied_by=None if raw[1] == b"-1" else int(raw[1]),
            shadow_denied=tuple(int(i) for i in shadow.split(",")) if shadow else (),
            retry_after_s=float(raw[2]),
            remaining=tuple(int(raw[4 + 3 * i]) for i in range(n)),
            reset_s=tuple(float(raw[5 + 3 * i]) for i in range(n)),
        )

    def _take_args(
        self, request_id: str, now: float, counters: Sequence[Counter], *, peek: bool
    ) -> tuple[list[str], list[str]]:
        keys = [self.keys.request(request_id)]
        args = [
            "" if self.server_time else _num(float(now)),
            request_id,
            _num(self.reservation_ttl_s),
            "1" if peek else "0",
        ]
        for c in counters:
            keys.append(c.key)
            args += (
                _KIND[c.kind],
                str(c.limit),
                _num(float(c.period_s)),
                _num(float(c.window_end)),
                str(c.amount),
                "1" if c.shadow else "0",
            )
        args.append(_num(BUDGET_KEEP_S))
        return keys, args

    def _settle_args(self, settle: Settle) -> tuple[list[str], list[str]]:
        keys = [self.keys.request(settle.request_id)]
        args = [
            "" if self.server_time else _num(float(settle.now)),
            settle.request_id,
            _num(self.settled_ttl_s),
        ]
        for c, actual in zip(settle.counters, settle.actual, strict=True):
            keys.append(c.key)
            args += (
                _KIND[c.kind],
                str(c.limit),
                _num(float(c.period_s)),
                _num(float(c.window_end)),
                str(actual),
            )
        args.append(_num(BUDGET_KEEP_S))
        return keys, args

    async def _write_settles(self, settles: list[Settle]) -> None:
        """What the writer has queued, in one round trip (a pipeline of EVALSHA)."""
        self._admit("settle")
        await self._guarded("settle", self.settle_timeout_s, lambda: self._settles_once(settles))

    async def _settles_once(self, settles: list[Settle]) -> None:
        try:
            await self._pipeline(settles)
        except NoScriptError:  # Redis restarted: its scripts are gone
            await self.client.script_load(SETTLE_LUA)
            await self._pipeline(settles)

    async def _pipeline(self, settles: list[Settle]) -> None:
        if isinstance(self.client, RedisCluster):  # its pipelines route EVALSHA poorly
            for settle in settles:
                keys, args = self._settle_args(settle)
                await self._settle(keys=keys, args=args)
            return
        pipe = self.client.pipeline(transaction=False)
        sha = self._settle.sha
        for settle in settles:
            keys, args = self._settle_args(settle)
            pipe.evalsha(sha, len(keys), *keys, *args)
        await pipe.execute()

    def _admit(self, op: str) -> None:
        if not self.breaker.allow():
            self.observer.error(op, "breaker_open")
            raise StoreUnavailable("breaker_open")

    async def _call(
        self,
        op: str,
        script: Any,
        keys: list[str],
        args: list[str],
        timeout_s: float | None = None,
    ) -> list[bytes]:
        limit = self.timeout_s if timeout_s is None else timeout_s
        raw = await self._guarded(op, limit, lambda: script(keys=keys, args=args))
        return cast(list[bytes], raw)

    async def _guarded(self, op: str, timeout_s: float, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within ``timeout_s``, told to the breaker and the metrics; a failure
        is StoreUnavailable with its reason."""
        started = time.perf_counter()
        try:
            if timeout_s <= 0:
                raise TimeoutError  # its deadline passed while it waited for its turn
            async with asyncio.timeout(timeout_s):
                result = await call()
        except TimeoutError:
            self._failed(op, "timeout")
            raise StoreUnavailable("timeout") from None
        except (RedisError, OSError) as e:
            self._failed(op, "error")
            log.debug("%s %s failed: %s", self.name, op, type(e).__name__)
            raise StoreUnavailable("error") from e
        except asyncio.CancelledError:
            self.breaker.failure()  # a probe must not stay out for ever
            raise
        self.breaker.success()
        self.observer.latency(op, time.perf_counter() - started)
        return result

    def _failed(self, op: str, reason: Literal["timeout", "error"]) -> None:
        self.breaker.failure()
        self.observer.error(op, reason)

    def _breaker_changed(self, is_open: bool) -> None:
        self.observer.breaker_open(is_open)
        if is_open:
            log.warning("store %s unavailable: breaker open, limits answer at once", self.name)
        else:
            log.warning("store %s answers again: breaker closed", self.name)
