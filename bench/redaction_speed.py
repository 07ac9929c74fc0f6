"""What redaction costs a request, in process: a 2 KB chat, and a 1 MB prompt among others.

1. A 2 KB OpenAI chat body (four messages; an email, a card and a phone, or no
   entity at all) through the request phases of two pipelines made from one Runtime
   (bench/run.py's config with ``redaction: {}``, the defaults): auth, credentials
   and redaction only, and the Runtime's own (limits and metering too); each again
   without redaction. The time of the body phase (parse, walk the prompt's texts,
   detect, rewrite, write the body out) is taken ``--runs`` times: median and p95,
   and the difference with redaction off, which is redaction's cost. In the first
   pipeline redaction is the only stage reading the body, so its cost includes the
   parse; in the Runtime's, metering parses the body anyway.
2. A 1 MB prompt on one uvloop through the Runtime's pipeline, while ``--inflight``
   small requests (headers, then the 2 KB body, each message its own turn of the
   loop) run continuously: the big one's time, and the p50/p99 of the small ones
   that overlapped it, against the small ones alone; then the same with the pause
   off (the whole prompt searched inline) and the big one alone. Two kinds of 1 MB:
   ``prose`` (paragraphs with about one entity a kilobyte) and ``corpus``
   (bench/redaction_corpus.py's documents, every shape, dense with entities and
   look-alikes; those with a secret left out, so the prompt is rewritten, not refused).

Run: .venv/bin/python bench/redaction_speed.py [--runs 2000] [--inflight 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop
from faker import Faker

sys.path.insert(0, str(Path(__file__).parent))
import redaction_corpus as corpus
import run as bench

from extproc import keys
from extproc.decisions import Deny
from extproc.pipeline import Pipeline
from extproc.redaction.detect import Detector
from extproc.runtime import Runtime

PATH = bench.PATH
EMAIL, CARD, PHONE = bench.EMAIL, bench.CARD, bench.PHONE
ENTITY_VALUES = (
    "jane.doe@example.com",
    "m.rossi@posta.example.it",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "+1 415 555 0132",
    "(415) 555-0199",
    "+44 20 7946 0958",
    "030 901820",
    "DE89 3704 0044 0532 0130 00",
    "GB82 WEST 1234 5698 7654 32",
    "078-05-1120",
)
TARGET_MEDIAN_MS, TARGET_P95_MS, TARGET_BIG_MS = 0.4, 1.0, 50.0


def chat_body(entities: bool) -> bytes:
    return bench.chat_2k_body(entities).encode()


def big_text(kind: str, size: int, seed: int, detector: Detector) -> str:
    """``size`` characters or a little more: paragraphs of prose with an entity after
    about one in three, or the corpus's documents (without those holding a secret)."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    if kind == "prose":
        faker = Faker("en_US")
        faker.seed_instance(seed)
        while total < size:
            text = faker.paragraph(nb_sentences=8)
            if rng.random() < 0.3:
                text += f" Write to me or call: {rng.choice(ENTITY_VALUES)}."
            parts.append(text)
            total += len(text) + 2
    else:
        while total < size:
            for doc in corpus.generate(seed, 2000):
                if any(f.entity == "secrets" for f in detector.find(doc.text)):
                    continue
                parts.append(doc.text)
                total += len(doc.text) + 2
                if total >= size:
                    break
            seed += 1
    return "\n\n".join(parts)


def big_body(text: str) -> bytes:
    messages = [
        {"role": "system", "content": "Summarise the document the user sends, in French."},
        {"role": "user", "content": text},
    ]
    return orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 512, "messages": messages})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request_headers(key: str, body: bytes) -> dict[str, str]:
    return {
        ":authority": "127.0.0.1",
        "content-type": "application/json",
        "authorization": f"Bearer {key}",
        "content-length": str(len(body)),
    }


# ---- 1. the 2 KB chat, one request at a time ----------------------------------------


def body_phase_ms(pipeline: Pipeline, key: str, body: bytes, runs: int) -> list[float]:
    """The body phase's time of ``runs`` requests (after a tenth as many to warm up)."""
    headers = request_headers(key, body)
    times = []
    for i in range(runs + runs // 10):
        run = pipeline.start("POST", PATH, dict(headers), frozenset())
        run.request_headers()
        start = time.perf_counter()
        denied = run.request_body(body)
        elapsed = time.perf_counter() - start
        if denied is not None:
            raise RuntimeError(f"the 2 KB chat was refused: {denied}")
        if i == 0 and run.ex.new_body is not None:
            sent = run.ex.new_body.decode()
            if EMAIL in sent or CARD in sent or PHONE in sent:
                raise RuntimeError("an entity went out unredacted")
        run.close()
        if i >= runs // 10:
            times.append(elapsed * 1e3)
    return times


@dataclass
class Row:
    pipeline: str
    prompt: str
    redaction: bool
    median_ms: float
    p95_ms: float
    rewritten: bool


def small_chat(on: Runtime, off: Runtime, key: str, runs: int) -> list[Row]:
    def stages(runtime: Runtime, redaction: bool) -> Pipeline:
        chosen = [runtime.auth, runtime.credentials] + ([runtime.redaction] * redaction)
        return Pipeline(runtime.routes, chosen, runtime.clock)

    pipelines = {
        ("auth+credentials+redaction", True): stages(on, True),
        ("auth+credentials+redaction", False): stages(on, False),
        ("runtime (all stages)", True): on.pipeline,
        ("runtime (all stages)", False): off.pipeline,
    }
    rows = []
    for prompt, body in (("3 entities", chat_body(True)), ("no entity", chat_body(False))):
        for (name, redaction), pipeline in pipelines.items():
            times = body_phase_ms(pipeline, key, body, runs)
            probe = pipeline.start("POST", PATH, request_headers(key, body), frozenset())
            probe.request_headers()
            probe.request_body(body)
            rewritten = probe.ex.new_body is not None
            probe.close()
            median, p95 = statistics.median(times), pct(times, 0.95)
            rows.append(Row(name, prompt, redaction, median, p95, rewritten))
    return rows


def print_small(rows: list[Row], size: int, runs: int) -> None:
    print(
        f"\n== 2 KB chat ({size} bytes, 4 messages), body phase in process"
        f" ({runs} runs each): parse, walk, detect, rewrite, write"
    )
    line = "{:<28}{:<12}{:<11}{:>11}{:>9}{:>11}{:>12}{:>10}"
    print(line.format("pipeline", "prompt", "redaction", "median_ms", "p95_ms", "rewritten",
                      "added_med", "added_p95"))  # fmt: skip
    for row in rows:
        base = next(
            r
            for r in rows
            if r.pipeline == row.pipeline and r.prompt == row.prompt and not r.redaction
        )
        added = row.redaction and row is not base
        print(
            line.format(
                row.pipeline,
                row.prompt,
                "on" if row.redaction else "off",
                f"{row.median_ms:.3f}",
                f"{row.p95_ms:.3f}",
                "yes" if row.rewritten else "no",
                f"{row.median_ms - base.median_ms:+.3f}" if added else "-",
                f"{row.p95_ms - base.p95_ms:+.3f}" if added else "-",
            )
        )
    worst = max(
        (r for r in rows if r.redaction and r.pipeline.startswith("auth")), key=lambda r: r.p95_ms
    )
    ok = worst.median_ms <= TARGET_MEDIAN_MS and worst.p95_ms <= TARGET_P95_MS
    print(
        f"target (issue): <= {TARGET_MEDIAN_MS} ms median, <= {TARGET_P95_MS} ms p95 with the"
        f" default entities, parse included (first pipeline, with redaction):"
        f" {'met' if ok else 'MISSED'}"
    )


# ---- 2. the 1 MB prompt among small requests ------------------------------------------


async def one(runtime: Runtime, key: str, body: bytes, headers: dict[str, str]) -> Deny | None:
    """Headers and body of one request, each message on its own turn of the loop."""
    run = runtime.pipeline.start("POST", PATH, dict(headers), frozenset())
    try:
        decision: Any = run.request_headers()
        if isinstance(decision, Awaitable):
            decision = await decision
        if isinstance(decision, Deny):
            return decision
        await asyncio.sleep(0)  # the body arrives as the next message
        denied: Any = run.request_body(body)
        if isinstance(denied, Awaitable):
            denied = await denied
        return denied  # type: ignore[no-any-return]
    finally:
        run.close()


class Load:
    """``inflight`` small requests, one after another each, until stopped; every
    request's (start, end) in perf_counter seconds."""

    def __init__(self, runtime: Runtime, key: str, inflight: int) -> None:
        self.runtime, self.key = runtime, key
        self.body = chat_body(True)
        self.headers = request_headers(key, self.body)
        self.spans: list[tuple[float, float]] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(inflight)]

    async def _worker(self) -> None:
        # A closed loop: the next request is sent when the last one is answered, and its
        # time starts then, not when the loop gets to it (a stall in between counts).
        start = time.perf_counter()
        while not self._stop:
            await asyncio.sleep(0)  # its headers arrive: a message, a turn of the loop
            denied = await one(self.runtime, self.key, self.body, self.headers)
            if denied is not None:
                raise RuntimeError(f"a small request was refused: {denied}")
            end = time.perf_counter()
            self.spans.append((start, end))
            start = end

    def during(self, windows: list[tuple[float, float]]) -> list[float]:
        """Latencies (ms) of the requests that overlapped one of ``windows``."""
        return [
            (end - start) * 1e3
            for start, end in self.spans
            if any(start < b and end > a for a, b in windows)
        ]

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


async def big_runs(
    runtime: Runtime, key: str, body: bytes, count: int
) -> list[tuple[float, float]]:
    headers = request_headers(key, body)
    spans = []
    for _ in range(count):
        start = time.perf_counter()
        denied = await one(runtime, key, body, headers)
        spans.append((start, time.perf_counter()))
        if denied is not None:
            raise RuntimeError(f"the 1 MB prompt was refused: {denied}")
        await asyncio.sleep(0.02)  # the small ones alone for a moment in between
    return spans


@dataclass
class BigRow:
    case: str
    big_ms: float | None  # median over the big runs
    small_p50_ms: float | None
    small_p99_ms: float | None
    small_max_ms: float | None
    small_done: int | None  # small requests that overlapped the big one, per big run


async def big_prompt(
    runtime: Runtime, key: str, text: str, args: argparse.Namespace
) -> tuple[list[BigRow], int]:
    body = big_body(text)
    stage = runtime.redaction
    pause = stage.pause
    rows: list[BigRow] = []
    await big_runs(runtime, key, body, 1)  # warm up
    # Alone: the time of the big one itself, paused (nothing else to run) and inline.
    for case, paused in (("alone, windowed", True), ("alone, inline (no pause)", False)):
        stage.pause = pause if paused else None
        spans = await big_runs(runtime, key, body, args.big_runs)
        big = statistics.median((b - a) * 1e3 for a, b in spans)
        rows.append(BigRow(case, big, None, None, None, None))
    stage.pause = pause
    load = Load(runtime, key, args.inflight)
    try:
        await asyncio.sleep(0.1)  # warm up
        first = time.perf_counter()
        await asyncio.sleep(args.baseline_s)
        small = load.during([(first, time.perf_counter())])
        rows.insert(0, BigRow("small requests only", None, *_spread(small), None))
        for case, paused in (("under load, windowed", True), ("under load, inline", False)):
            stage.pause = pause if paused else None
            spans = await big_runs(runtime, key, body, args.big_runs)
            small = load.during(spans)
            big = statistics.median((b - a) * 1e3 for a, b in spans)
            done = len(small) // len(spans)
            rows.append(BigRow(case, big, *_spread(small), done))
    finally:
        stage.pause = pause
        await load.stop()
    return rows, len(body)


def _spread(latencies: list[float]) -> tuple[float, float, float]:
    return pct(latencies, 0.5), pct(latencies, 0.99), max(latencies)


def print_big(
    kind: str, size: int, found: int, rows: list[BigRow], args: argparse.Namespace
) -> None:
    print(
        f"\n== 1 MB prompt, {kind} ({size} bytes, {found} findings), one uvloop,"
        f" {args.inflight} small requests in flight, {args.big_runs} big runs each"
    )
    line = "{:<28}{:>10}{:>14}{:>14}{:>14}{:>18}"
    print(line.format("case", "big_ms", "small_p50_ms", "small_p99_ms", "small_max_ms",
                      "small done/big"))  # fmt: skip
    for r in rows:
        cells = (r.big_ms, r.small_p50_ms, r.small_p99_ms, r.small_max_ms)
        shown = ["-" if v is None else f"{v:.2f}" for v in cells]
        print(line.format(r.case, *shown, "-" if r.small_done is None else r.small_done))
    alone = next(r for r in rows if r.case == "alone, windowed")
    assert alone.big_ms is not None
    verdict = "met" if alone.big_ms <= TARGET_BIG_MS else "MISSED"
    print(
        f"target (issue): 1 MB redacted in <= {TARGET_BIG_MS:.0f} ms (alone, windowed): {verdict}"
    )


# ---- main ---------------------------------------------------------------------------


def runtimes(workdir: Path) -> tuple[Runtime, Runtime, str]:
    key, record = keys.generate(name="bench", tenant="bench")
    keys.add(workdir / "keys.yaml", record)
    on = Runtime(bench.bench_config(1, workdir / "keys.yaml", "redaction"))
    off = Runtime(bench.bench_config(1, workdir / "keys.yaml"))
    return on, off, key


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tollway-redaction-speed-"))
    on, off, key = runtimes(workdir)
    result: dict[str, Any] = {"settings": vars(args) | {"json": None}}
    try:
        if "small" in args.parts:
            rows = small_chat(on, off, key, args.runs)
            print_small(rows, len(chat_body(True)), args.runs)
            result["chat_2k"] = [vars(r) for r in rows]
        policy = on.redaction.default
        assert policy is not None
        for kind in args.big if "big" in args.parts else []:
            text = big_text(kind, args.big_chars, args.seed, policy.detector)
            found = len(policy.detector.find(text))
            big, size = await big_prompt(on, key, text, args)
            print_big(kind, size, found, big, args)
            result[f"big_{kind}"] = {
                "bytes": size,
                "findings": found,
                "rows": [vars(r) for r in big],
            }
    finally:
        await on.aclose()
        await off.aclose()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=2000, help="2 KB requests per measurement")
    p.add_argument("--inflight", type=int, default=8, help="small requests in flight")
    p.add_argument("--big", nargs="*", default=["prose", "corpus"], choices=["prose", "corpus"])
    p.add_argument("--big-chars", type=int, default=1 << 20, help="the big prompt's size")
    p.add_argument("--big-runs", type=int, default=5, help="runs of the big prompt per case")
    p.add_argument("--baseline-s", type=float, default=1.0, help="small requests alone, s")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--parts", nargs="+", default=["small", "big"], choices=["small", "big"])
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args()
    result = uvloop.run(main_async(args))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
