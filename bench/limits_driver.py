"""In-process driver for the cost of limits: ext_proc messages straight into
``extproc.processor.StreamProcessor``, no Envoy, no sockets but Redis's.

Each request is the bench's `chat` (request headers, buffered body, response
headers, buffered JSON body, end of stream), ``--concurrency`` of them in flight
on one (uv)loop, through a Runtime built from bench/run.py's config for each
stack: no limits, limits on the memory store, limits on a real redis-server.
Prints the process CPU per request for each, and with ``--profile STACK`` the
cProfile of that stack's run (sorted by own time). Run:
.venv/bin/python bench/limits_driver.py [--requests 20000] [--profile limits-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
import run as bench

from extproc import keys, up
from extproc.processor import StreamProcessor
from extproc.runtime import Runtime


def _headers(pairs: dict[str, str], end: bool = False) -> pb.HttpHeaders:
    values = [HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=end)


def messages(key: str) -> list[pb.ProcessingRequest]:
    request = {
        ":authority": "127.0.0.1",
        ":path": bench.PATH,
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "authorization": f"Bearer {key}",
        "content-length": str(len(bench.REQUEST_BODY)),
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-request-id": "5f1d4c0e-0000-4000-8000-000000000000",
    }
    response = {
        ":status": "200",
        "content-type": "application/json",
        "content-length": str(len(bench.CHAT_COMPLETION)),
    }
    return [
        pb.ProcessingRequest(request_headers=_headers(request)),
        pb.ProcessingRequest(
            request_body=pb.HttpBody(body=bench.REQUEST_BODY.encode(), end_of_stream=True)
        ),
        pb.ProcessingRequest(response_headers=_headers(response)),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=bench.CHAT_COMPLETION.encode(), end_of_stream=True)
        ),
    ]


async def one_request(runtime: Runtime, msgs: list[pb.ProcessingRequest]) -> bool:
    """True when every message was answered with "continue" (False: refused)."""
    processor = StreamProcessor(runtime.pipeline, runtime.metrics)
    try:
        for msg in msgs:
            reply: Any = processor.handle(msg)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply is None or reply.WhichOneof("response") == "immediate_response":
                return False
        return True
    finally:
        processor.close()


async def drive(
    runtime: Runtime, msgs: list[pb.ProcessingRequest], count: int, inflight: int
) -> int:
    """``count`` requests, ``inflight`` at a time; returns how many were refused."""
    left, refused = count, 0

    async def worker() -> None:
        nonlocal left, refused
        while left > 0:
            left -= 1
            refused += not await one_request(runtime, msgs)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return refused


async def measure(
    stack: str, workdir: Path, key: str, redis_url: str | None, args: argparse.Namespace
) -> float:
    config = bench.bench_config(1, workdir / "keys.yaml", stack, redis_url)
    runtime = Runtime(config)
    msgs = messages(key)
    try:
        await drive(runtime, msgs, args.requests // 10, args.concurrency)  # warm up
        profile = cProfile.Profile() if args.profile == stack else None
        start = time.process_time()
        if profile is not None:
            profile.enable()
        refused = await drive(runtime, msgs, args.requests, args.concurrency)
        if profile is not None:
            profile.disable()
        used = time.process_time() - start
        if refused:
            print(f"{stack}: {refused} of {args.requests} refused", file=sys.stderr)
    finally:
        await runtime.aclose()
    if profile is not None:
        stats = pstats.Stats(profile).sort_stats("tottime")
        stats.print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    return float(used * 1e6 / args.requests)


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tollway-limits-driver-"))
    key, record = keys.generate(name="bench", tenant="bench")
    keys.add(workdir / "keys.yaml", record)
    procs: list[bench.Proc] = []
    try:
        redis_url = None
        if "limits-redis" in args.stacks:
            _, redis_url = bench.start_redis(workdir, procs)
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for stack in args.stacks:
                results.setdefault(stack, []).append(
                    await measure(stack, workdir, key, redis_url, args)
                )
    finally:
        up.stop_all(procs)
    base = min(results.get(bench.BASE, [0.0]))
    for stack, values in results.items():
        best = min(values)
        added = f"  added {best - base:+.1f}" if stack != bench.BASE and base else ""
        runs = " ".join(f"{v:.1f}" for v in values)
        print(f"{stack:<15} cpu us/request: best {best:.1f}{added}   (runs: {runs})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stacks", nargs="+", default=list(bench.STACKS), choices=bench.STACKS)
    p.add_argument("--profile", choices=bench.STACKS, help="cProfile this stack's runs")
    p.add_argument("--top", type=int, default=35, help="profile lines to print")
    args = p.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
