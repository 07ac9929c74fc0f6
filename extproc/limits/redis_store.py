"""The shared quota backend: Redis (single node, Sentinel or Cluster).

A take is one EVALSHA of ``TAKE_LUA`` for all of a request's counters (checked
and reserved atomically: nothing reserved unless all enforced counters
admit); a settle is one EVALSHA of ``SETTLE_LUA``, queued and written by one
writer task (store/writer.py). The scripts mirror quota.py's functions;
numbers cross as text that round-trips (a float's repr in, "%.17g" out), so
both backends compute the same doubles.

On the wire: a single node is one pipelined connection of our own (resp.py; no
pool and no redis-py pipeline objects, which were ~14% of a request's
instructions). The takes of one turn of the event loop go as raw EVALSHA in
one write (at most TAKE_BATCH), batches pipelined, none waiting for another's
round trip; so does each batch of settlements the writer hands over. NOSCRIPT
(a restarted Redis: that command did not run) loads the script and resends
only those commands, in the same deadline. Cluster (one call per take) and
Sentinel (pipelines) stay on redis-py. Measured (NOTES.md, "Limits: what they
cost"): what Redis costs over the memory store fell from ~222 k to ~25 k
instructions a request (valgrind of bench/limits_driver.py; ~46 → ~5 µs of
user CPU), plus the kernel's share of one write and one read per ~16 commands.

Clock: by default the scripts read Redis's ``TIME`` (``clock: server``), so
replicas whose clocks differ still share one timeline for rates and leases;
``clock: caller`` uses ``Take.now`` instead (tests with an injected clock).
Calendar windows are always the caller's (the window id is in the key).

Failure, bounded: every call has a deadline (``timeout_ms``, default 100),
connecting included. After ``breaker_failures`` failures in a row a breaker
opens: ``take`` then raises StoreUnavailable("breaker_open") at once, without
I/O, and the stage's fail-open/fail-closed policy decides; the single-node
connection is dropped (a stalled Redis keeps no socket with a growing queue
of replies owed); every ``breaker_cool_down_s`` one call probes (connecting
anew), and its success closes the breaker. A take must never run twice: it is
resent only after NOSCRIPT (it did not run). Settlements are idempotent (a request's
reservation record becomes a "settled" mark inside the same script), so the
writer retries them for ``settle_retry_for_s`` and nothing is charged twice.

Keys (quota.Keys) share one hash tag, so a request's keys, its reservation
record included, are in one Cluster slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

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
from .resp import Connection, ReplyError

log = logging.getLogger("tollway")

Client = Connection | aioredis.Redis | RedisCluster
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
# then 3 per counter: remaining, reset_s, used (remaining and used are whole numbers:
# integer replies, no string.format; reset_s is a float, so "%.17g" text).
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
    out[#out + 1], out[#out + 2] = c.rem_t, fmt(c.reset_t)
  else
    out[#out + 1], out[#out + 2] = c.rem_n, fmt(c.reset_n)
  end
  out[#out + 1] = c.used
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


@dataclass(frozen=True, slots=True)
class Script:
    text: str
    sha: str  # what EVALSHA calls it


def _script(text: str) -> Script:
    return Script(text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())


TAKE = _script(TAKE_LUA)
SETTLE = _script(SETTLE_LUA)
Args: TypeAlias = tuple[list[str], list[str | int | float]]  # keys, then script arguments


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
    timeout_s: float = 0.1,
) -> Client:
    """A client for a single node (resp.py: one pipelined connection), a Cluster
    (``url`` names any node) or a Sentinel master (``url`` gives the credentials,
    database and TLS; sentinels are ``sentinel_nodes``); the last two are redis-py's,
    with ``max_connections``. redis-py's retries are off: a take must not run twice.
    ``password`` (from the environment or a file) overrides the URL's."""
    backstop = max(timeout_s * 5, 1.0)  # calls have their own deadline
    if not cluster and sentinel_master is None:  # a single node
        return Connection.from_url(url, password=password, connect_timeout_s=backstop)
    extra: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": backstop,
        "socket_connect_timeout": backstop,
        "max_connections": max_connections,
    }
    if password is not None:
        extra["password"] = password
        url = redact_url(url, "")  # the URL's own would win over the keyword
    if cluster or sentinel_master is None:  # (a single node returned above)
        return RedisCluster.from_url(url, **extra)
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


T = TypeVar("T")
SETTLE_BATCH = 64  # settlements written in one round trip, at most
TAKE_BATCH = 64  # takes sent in one round trip, at most


class RedisQuota:
    def __init__(
        self,
        client: Client,
        *,
        keys: Keys | None = None,
        timeout_s: float = 0.1,
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
        self._cluster = isinstance(client, RedisCluster)  # once: a Protocol isinstance is slow
        self.keys = keys or Keys()
        self.timeout_s = timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.server_time = clock == "server"
        self.observer = observer
        self.breaker = breaker or Breaker()
        self.breaker.on_change = self._breaker_changed  # metrics, one log line, a reconnect
        self.reservation_ttl_s = float(reservation_ttl_s)
        self.settled_ttl_s = float(settled_ttl_s)
        self.drain_s = drain_s
        self.name = name
        # Takes that arrive while a batch is on the wire go together in the next one.
        self._queued: list[tuple[float, Take, asyncio.Future[Verdict]]] = []
        self._flushing = False
        self._batches: set[asyncio.Task[None]] = set()  # held: tasks are weakly kept
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
        if self._cluster:  # its pipelines route EVALSHA poorly
            return self._take_one(take)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Verdict] = loop.create_future()
        self._queued.append((time.monotonic(), take, answer))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush_takes)
        return answer

    def settle(self, settle: Settle) -> None:
        self.writer.put(settle)

    async def usage(self, counters: Sequence[Counter], now: float) -> tuple[Level, ...]:
        self._admit("usage")
        call = [self._take_args("", now, counters, peek=True)]
        (raw,) = await self._guarded(
            "usage", self.timeout_s, lambda deadline: self._eval(TAKE, call, deadline)
        )
        return tuple(
            Level(int(raw[6 + 3 * i]), int(raw[4 + 3 * i]), float(raw[5 + 3 * i]))
            for i in range(len(counters))
        )

    async def aclose(self) -> None:
        await self.writer.drain(self.drain_s)
        await self.client.aclose()

    async def ping(self, timeout_s: float) -> None:
        """Redis answers PING within ``timeout_s``, or StoreUnavailable: for readiness
        probes. Not counted by the breaker or the store metrics (a probe is not a request);
        while the breaker is open this connects anew, as its probe would."""
        try:
            if isinstance(self.client, Connection):
                deadline = asyncio.get_running_loop().time() + timeout_s
                (reply,) = await self.client.execute([("PING",)], deadline)
                if isinstance(reply, ReplyError):
                    raise reply
            else:
                async with asyncio.timeout(timeout_s):
                    await self.client.ping()
        except TimeoutError:
            raise StoreUnavailable("timeout") from None
        except (RedisError, ReplyError, OSError) as e:
            raise StoreUnavailable("error") from e

    # Internals ------------------------------------------------------------------

    def _flush_takes(self) -> None:
        """The takes asked for in this turn of the loop, in one write (at most
        TAKE_BATCH each). Batches are pipelined on the one connection: a take never
        waits for another's round trip, so its deadline is its own."""
        self._flushing = False
        queued, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(queued), TAKE_BATCH):
            task = loop.create_task(self._take_batch(queued[i : i + TAKE_BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _take_batch(self, batch: list[tuple[float, Take, asyncio.Future[Verdict]]]) -> None:
        left = batch[0][0] + self.timeout_s - time.monotonic()  # the oldest's deadline
        args = self._take_args
        try:
            calls = [args(t.request_id, t.now, t.counters, peek=False) for _, t, _ in batch]
            raws = await self._guarded(
                "take", left, lambda deadline: self._eval(TAKE, calls, deadline)
            )
            verdicts = [self._verdict(raw) for raw in raws]
        except Exception as failure:  # StoreUnavailable; or a bug, told rather than hung
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(failure)
            return
        for (_, _, answer), verdict in zip(batch, verdicts, strict=True):
            if not answer.done():
                answer.set_result(verdict)

    async def _take_one(self, take: Take) -> Verdict:
        call = [self._take_args(take.request_id, take.now, take.counters, peek=False)]
        (raw,) = await self._guarded(
            "take", self.timeout_s, lambda deadline: self._eval(TAKE, call, deadline)
        )
        return self._verdict(raw)

    def _verdict(self, raw: list[bytes]) -> Verdict:
        shadow = raw[3]
        return Verdict(
            allowed=raw[0] == b"1",
            denied_by=None if raw[1] == b"-1" else int(raw[1]),
            shadow_denied=tuple(map(int, shadow.split(b","))) if shadow else (),
            retry_after_s=float(raw[2]),
            remaining=tuple(map(int, raw[4::3])),  # then 3 per counter
            reset_s=tuple(map(float, raw[5::3])),
        )

    # Script arguments: numbers go as they are (hiredis and redis-py write a float
    # as its repr, which round-trips; so does Lua's tonumber).

    def _take_args(
        self, request_id: str, now: float, counters: Sequence[Counter], *, peek: bool
    ) -> Args:
        keys = [self.keys.request(request_id)]
        args: list[str | int | float] = [
            "" if self.server_time else now,
            request_id,
            self.reservation_ttl_s,
            "1" if peek else "0",
        ]
        for c in counters:
            keys.append(c.key)
            args += (
                _KIND[c.kind],
                c.limit,
                c.period_s,
                c.window_end,
                c.amount,
                "1" if c.shadow else "0",
            )
        args.append(BUDGET_KEEP_S)
        return keys, args

    def _settle_args(self, settle: Settle) -> Args:
        keys = [self.keys.request(settle.request_id)]
        args: list[str | int | float] = [
            "" if self.server_time else settle.now,
            settle.request_id,
            self.settled_ttl_s,
        ]
        for c, actual in zip(settle.counters, settle.actual, strict=True):
            keys.append(c.key)
            args += (_KIND[c.kind], c.limit, c.period_s, c.window_end, actual)
        args.append(BUDGET_KEEP_S)
        return keys, args

    async def _write_settles(self, settles: list[Settle]) -> None:
        """What the writer has queued, in one round trip."""
        self._admit("settle")
        calls = [self._settle_args(settle) for settle in settles]
        await self._guarded(
            "settle", self.settle_timeout_s, lambda deadline: self._eval(SETTLE, calls, deadline)
        )

    async def _eval(self, script: Script, calls: list[Args], deadline: float) -> list[Any]:
        """EVALSHA of ``script`` once per call, pipelined; their replies in order, by
        ``deadline`` (loop time). NOSCRIPT (a restarted Redis: that call did not run)
        loads it and retries."""
        client = self.client
        if not isinstance(client, Connection):
            async with asyncio.timeout_at(deadline):
                return await self._eval_redis_py(client, script, calls)
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await client.execute(commands, deadline)
        missing = [
            i for i, r in enumerate(replies) if isinstance(r, ReplyError) and r.code == "NOSCRIPT"
        ]
        if missing:
            retried = [commands[i] for i in missing]
            again = await client.execute([("SCRIPT", "LOAD", script.text), *retried], deadline)
            for i, reply in zip(missing, again[1:], strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply
        return replies

    async def _eval_redis_py(
        self, client: aioredis.Redis | RedisCluster, script: Script, calls: list[Args]
    ) -> list[Any]:
        for attempt in (1, 2):
            try:
                if isinstance(client, RedisCluster):  # its pipelines route EVALSHA poorly
                    return [await client.evalsha(script.sha, len(k), *k, *a) for k, a in calls]
                pipe = client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return await pipe.execute()
            except NoScriptError:  # Redis restarted: its scripts are gone
                if attempt == 2:
                    raise
                await client.script_load(script.text)
        raise AssertionError("unreachable")

    def _admit(self, op: str) -> None:
        if not self.breaker.allow():
            self.observer.error(op, "breaker_open")
            raise StoreUnavailable("breaker_open")

    async def _guarded(self, op: str, timeout_s: float, call: Callable[[float], Awaitable[T]]) -> T:
        """``call(deadline)`` (loop time, ``timeout_s`` from now), told to the breaker and
        the metrics; a failure is StoreUnavailable with its reason."""
        started = time.perf_counter()
        try:
            if timeout_s <= 0:
                raise TimeoutError  # its deadline passed while it waited for its turn
            result = await call(asyncio.get_running_loop().time() + timeout_s)
        except TimeoutError:
            self._failed(op, "timeout")
            raise StoreUnavailable("timeout") from None
        except (RedisError, ReplyError, OSError) as e:
            self._failed(op, "error")
            log.debug("%s %s failed: %s: %s", self.name, op, type(e).__name__, e)
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
            if isinstance(self.client, Connection):
                self.client.close()  # a stalled server: no growing FIFO; the probe reconnects
        else:
            log.warning("store %s answers again: breaker closed", self.name)
