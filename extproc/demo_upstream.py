"""Built-in demo LLM upstream: a fake OpenAI + Anthropic + Gemini compatible HTTP server.

Lets a newcomer watch the gateway work with no provider account or network access::

    python -m extproc.demo_upstream --port 8081 [--provider-key sk-demo]

Routes (real providers' wire formats; ``"stream": true`` switches to SSE), dispatched by the
gateway's own classifier (:func:`route`, :func:`extproc.routes.dialect_of`): a request with
``anthropic-version`` speaks Anthropic (``POST /v1/messages``, ``GET /v1/models`` in
Anthropic's list shape); one with a ``models/{model}:{method}`` path (on ``/v1/`` or
``/v1beta/``), an ``x-goog-api-key`` header or a ``key`` parameter speaks Gemini
(``:generateContent``, ``:streamGenerateContent``: SSE with ``?alt=sse``, else a JSON array;
``GET .../models[/{model}]``); everything else is OpenAI (``POST /v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``, ``GET /v1/models``). ``/v1beta/``
is always Gemini's and ``/v1/messages`` Anthropic's. An unknown endpoint is a 404 in that
API's format. Standard library only (:mod:`extproc.demo_http`).

Azure OpenAI, under ``/openai/``: ``/openai/deployments/{d}/{chat/completions, completions,
embeddings, responses}`` and ``/openai/{responses, models}`` need ``?api-version=`` (else
Azure's 404 ``Resource not found``); the v1 API, ``/openai/v1/...``, does not. The answers are
OpenAI's, as Azure sends them: ``model`` is the model the deployment runs
(:data:`AZURE_DEPLOYMENTS`; any other deployment runs the model it is named after; on
``/openai/v1`` the body's ``model`` names the deployment), chat and completions carry
``prompt_filter_results`` and per-choice ``content_filter_results``, and a chat stream opens
with a chunk of prompt filter results (no choices, empty ``model``). The key is ``api-key``
(or a Bearer token, as an Entra ID token comes); errors are ``{"error": {"code": "401",
"message": ...}}``.
Vertex AI: ``/v1/`` and ``/v1beta1/projects/{p}/locations/{l}/publishers/google/models/{m}``
(and express mode's ``/v1[beta1]/publishers/google/models/{m}``), ``:generateContent`` and
``:streamGenerateContent`` (SSE with ``?alt=sse``, else a JSON array). Gemini's answers, as
Vertex sends them: ``modelVersion`` is the version an alias resolves to
(:data:`VERTEX_MODEL_VERSIONS`, e.g. ``gemini-2.0-flash-001``), ``createTime`` is set,
``usageMetadata`` has ``trafficType`` and comes once, in the last chunk of a stream. The key
is an OAuth access token (``authorization: Bearer KEY``), or ``x-goog-api-key`` (express).
Claude on Vertex AI: ``.../publishers/anthropic/models/{m}:rawPredict`` and
``:streamRawPredict``, Anthropic's Messages API with the model in the path and an
``anthropic_version`` in the body (``vertex-2023-10-16``, or the SDK's API version).
A request header ``x-demo-chunk-bytes: N`` makes SSE go out N bytes a write;
``x-demo-sse-whole`` sends it in one piece with a content-length.
``x-demo-echo: 1`` makes the reply the prompt's text as this upstream received it (every
string of the prompt fields but roles, types, ids and names, joined by newlines; one word a
stream chunk): what a provider would see, e.g. after Tollway's redaction; ``x-demo-reply:
TEXT`` makes the reply TEXT (a model that writes something sensitive).
``GET /__demo/requests`` lists the last 100 requests (method, path, query, lowercased headers,
body as text; kept in this process's memory only);
``DELETE`` clears them; these debug routes never need a key. With ``provider_key`` set, requests
need ``authorization: Bearer KEY`` (OpenAI), ``x-api-key: KEY`` (Anthropic; if that header is
absent, a Bearer token as anthropic SDK 2.x sends) or ``x-goog-api-key: KEY`` (Gemini), else a
401 in the provider's error format. Bad input is a 400 in that format, never a 500.

Deterministic token accounting:

* ``chars``: total length of the strings in the prompt fields (chat ``messages``, legacy
  ``prompt``, embeddings ``input``, Responses ``instructions`` + ``input``, Anthropic ``system``
  + ``messages``, Gemini ``systemInstruction`` + ``contents``), bare or under a ``text`` /
  ``content`` / ``parts`` key; each integer of a token-array prompt counts 4 characters.
* Prompt tokens ``P = max(1, ceil(chars / 4))``.
* Completion tokens ``C = min(limit, 12)``; ``limit`` is ``max_completion_tokens`` or
  ``max_tokens`` (OpenAI, Anthropic), ``max_output_tokens`` (Responses) or
  ``generationConfig.maxOutputTokens`` (Gemini), 12 if absent. The reply is the first ``C``
  words of :data:`REPLY` (12 words), one word per stream chunk; ``C < 12`` ends with the
  provider's length reason (``length`` / ``max_tokens`` / ``MAX_TOKENS`` / ``incomplete``).
* Cached input ``K = P // 2`` if the model contains ``cached`` or ``chars > 4096``, else 0.
  OpenAI ``cached_tokens`` and Gemini ``cachedContentTokenCount`` are ``K`` (subsets of P).
  Anthropic: ``cache_read_input_tokens = K``, ``cache_creation_input_tokens = (P - K) // 2`` if
  the model contains ``cache-write`` (else 0), ``input_tokens`` the rest (the three sum to P).
* Reasoning ``R = C // 2`` if the model starts with ``o1``/``o3``/``o4``/``gpt-5`` or contains
  ``reasoning``/``thinking``, else 0. OpenAI ``reasoning_tokens = R`` (a subset of C); Gemini
  ``thoughtsTokenCount = R`` on top of ``candidatesTokenCount = C`` (total ``P + C + R``).
  As in the real API, Gemini omits ``cachedContentTokenCount``/``thoughtsTokenCount`` when 0.
* Embeddings: 8 floats from SHA-256 of each input, unit length; usage ``P`` for all inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import math
import re
import signal
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import unquote

import orjson

from . import routes
from .demo_http import Reply, Request, Response, Server, Stream

__all__ = ["REPLY", "App", "route", "run", "start"]

REPLY = "Hello from Tollway's demo upstream. This reply is canned, deterministic and free."
_WORDS = REPLY.split(" ")
EMBEDDING_DIM = 8
_MAX_RECORDS = 100
_FINGERPRINT = "fp_tollway_demo"
_MODELS = ("gpt-4o-mini", "gpt-5-mini", "o3-mini", "text-embedding-3-small", "demo-cached")

Style = Literal["openai", "anthropic", "gemini", "azure", "vertex"]


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class _Turn:
    """Token accounting and reply text for one request (see module docstring)."""

    model: str
    prompt: int
    completion: int
    cached: int
    cache_write: int
    reasoning: int
    pieces: tuple[str, ...]  # the reply, one word per element, re-joinable with "".join
    whole: int = len(_WORDS)  # pieces of the whole reply (fewer: cut at the limit)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def truncated(self) -> bool:
        return self.completion < self.whole


def _chars(value: Any, depth: int = 0) -> int:
    if depth > 64 or isinstance(value, bool):
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_chars(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_chars(value[k], depth + 1) for k in ("text", "content", "parts") if k in value)
    return 0


# Where the APIs put what the model reads, and members inside them that are not text.
_PROMPT_FIELDS = (
    "instructions",
    "system",
    "systemInstruction",
    "system_instruction",
    "messages",
    "prompt",
    "input",
    "contents",
)
_NOT_TEXT = frozenset(
    {
        "role",
        "type",
        "id",
        "name",
        "model",
        "tool_call_id",
        "tool_use_id",
        "call_id",
        "mime_type",
        "mimeType",
        "cache_control",
        "status",
        "index",
        "detail",
    }
)


def _texts(value: Any, out: list[str]) -> list[str]:
    """Every string in a prompt field, in order, but for members that are not text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(v for k, v in reversed(item.items()) if k not in _NOT_TEXT)
    return out


def _echoed(request: Request, body: dict[str, Any], t: _Turn) -> _Turn:
    """With ``x-demo-echo: 1`` the reply is the prompt's text as this upstream got it,
    with ``x-demo-reply: TEXT`` that text; one word (and the spaces before it) a piece."""
    reply = request.headers.get("x-demo-reply")
    if reply is None:
        if request.headers.get("x-demo-echo") != "1":
            return t
        texts: list[str] = []
        for field in _PROMPT_FIELDS:
            if field in body:
                _texts(body[field], texts)
        reply = "\n".join(texts)
    pieces = tuple(re.findall(r"\s*\S+|\s+$", reply)) or ("",)
    return replace(t, completion=len(pieces), reasoning=0, pieces=pieces, whole=len(pieces))


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def _limit(value: Any, field: str) -> int:
    if value is None:
        return len(_WORDS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _ApiError(400, f"'{field}' must be a positive integer")
    return min(value, len(_WORDS))


def _turn(model: str, chars: int, limit: int) -> _Turn:
    prompt = _tokens(chars)
    cached = prompt // 2 if "cached" in model or chars > 4096 else 0
    cache_write = (prompt - cached) // 2 if "cache-write" in model else 0
    reasons = model.startswith(("o1", "o3", "o4", "gpt-5")) or any(
        w in model for w in ("reasoning", "thinking")
    )
    pieces = tuple(w if i == 0 else " " + w for i, w in enumerate(_WORDS[:limit]))
    return _Turn(model, prompt, limit, cached, cache_write, limit // 2 if reasons else 0, pieces)


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj))


def _data(obj: Any, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(obj) + sep


def _event(name: str, obj: Any) -> bytes:
    return f"event: {name}\n".encode() + _data(obj)


CHUNK_HEADER = "x-demo-chunk-bytes"
WHOLE_HEADER = "x-demo-sse-whole"
_SSE_TYPE = "text/event-stream; charset=utf-8"
_SSE_HEADERS = {"cache-control": "no-cache"}
MAX_BODY_BYTES = 32 * 1024**2


def _sse(request: Request, events: Iterable[bytes]) -> Reply:
    """Each event as its own write; with ``x-demo-chunk-bytes: N``, N bytes a write, paced
    so that each reaches the client on its own (to test readers against any split). With
    ``x-demo-sse-whole``, the whole stream at once with a content-length, as some servers do."""
    if WHOLE_HEADER in request.headers:
        return Response(200, b"".join(events), _SSE_TYPE, _SSE_HEADERS)
    size = request.headers.get(CHUNK_HEADER, "")
    step = int(size) if size.isdigit() and int(size) > 0 else 0
    return Stream(events, _SSE_TYPE, _SSE_HEADERS, step)


def _json_body(request: Request) -> dict[str, Any]:
    if request.body is None:
        raise _ApiError(413, "Request body too large")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise _ApiError(400, f"Could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "You must provide a model parameter")
    return model


# Azure OpenAI: a deployment serves one model, and answers with that model's own name.
# A deployment not listed here serves the model it is named after.
AZURE_DEPLOYMENTS = {
    "chat": "gpt-4o-mini-2024-07-18",
    "prod-4o": "gpt-4o-2024-11-20",
    "reasoner": "o4-mini-2025-04-16",
    "embed": "text-embedding-3-small",
}
_FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def _filters() -> dict[str, Any]:
    return {c: {"filtered": False, "severity": "safe"} for c in _FILTER_CATEGORIES}


@dataclass(frozen=True)
class _Host:
    """Who answers an OpenAI-schema request: OpenAI, or Azure (a deployment's model,
    content filter results)."""

    azure: bool = False
    deployment: str | None = None  # /openai/deployments/{d}/...; None: the body names it

    def model(self, body: dict[str, Any]) -> str:
        if not self.azure:
            return _model(body)
        # On a deployment path Azure ignores the body's model; on /openai/v1 it names one.
        name = self.deployment or _model(body)
        return AZURE_DEPLOYMENTS.get(name, name)


_OPENAI_HOST = _Host()


# ---------------------------------------------------------------------------- OpenAI


def _openai_usage(t: _Turn) -> dict[str, Any]:
    return {
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "total_tokens": t.prompt + t.completion,
        "prompt_tokens_details": {"cached_tokens": t.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": t.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_stream(t: _Turn, base: dict[str, Any], choices: list[Any], body: Any) -> list[bytes]:
    """One ``data:`` line per choice, the usage chunk if asked for, then ``[DONE]``."""
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    out = [_data({**base, "choices": [c], **extra}) for c in choices]
    if include_usage:
        out.append(_data({**base, "choices": [], "usage": _openai_usage(t)}))
    return [*out, b"data: [DONE]\n\n"]


def _chat_completions(request: Request, host: _Host = _OPENAI_HOST) -> Reply:
    body = _json_body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty array")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    t = _turn(host.model(body), _chars(messages), _limit(limit, "max_completion_tokens"))
    t = _echoed(request, body, t)
    finish, stream = ("length" if t.truncated else "stop"), body.get("stream") is True
    kind = "chat.completion.chunk" if stream else "chat.completion"
    base = {"id": _id("chatcmpl-"), "object": kind, "created": int(time.time()), "model": t.model}
    if not host.azure:  # the tier that served it: the one asked for, as OpenAI answers
        asked = body.get("service_tier")
        base["service_tier"] = asked if asked in ("flex", "priority") else "default"
    base["system_fingerprint"] = _FINGERPRINT
    # Azure adds its content filter's verdicts: on the prompt, and on each choice.
    filtered = {"content_filter_results": _filters()} if host.azure else {}
    prompt_filter = [{"prompt_index": 0, "content_filter_results": _filters()}]
    if not stream:
        message = {"role": "assistant", "content": t.text, "refusal": None, "annotations": ()}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        doc = {**base, "choices": [{**choice, **filtered}], "usage": _openai_usage(t)}
        if host.azure:
            doc["prompt_filter_results"] = prompt_filter
        return _json(doc)
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": p} for p in t.pieces] + [{}]
    choices = [
        {"index": 0, "delta": d, "logprobs": None, "finish_reason": None if d else finish}
        | ({"content_filter_results": _filters() if d.get("content") else {}} if filtered else {})
        for d in deltas
    ]
    events = _openai_stream(t, base, choices, body)
    if host.azure:
        # Azure's stream opens with the prompt's filter results: no choices, no model, no id.
        first = {"choices": [], "created": 0, "id": "", "model": "", "object": ""}
        events.insert(0, _data({**first, "prompt_filter_results": prompt_filter}))
    return _sse(request, events)


def _completions(request: Request, host: _Host = _OPENAI_HOST) -> Reply:
    body = _json_body(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, str | list):
        raise _ApiError(400, "'prompt' must be a string or an array")
    t = _turn(host.model(body), _chars(prompt), _limit(body.get("max_tokens"), "max_tokens"))
    t = _echoed(request, body, t)
    finish = "length" if t.truncated else "stop"
    base = {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time())}
    base |= {"model": t.model, "system_fingerprint": _FINGERPRINT}
    if body.get("stream") is not True:
        choice = {"text": t.text, "index": 0, "logprobs": None, "finish_reason": finish}
        doc = {**base, "choices": [choice], "usage": _openai_usage(t)}
        if host.azure:
            choice["content_filter_results"] = _filters()
            doc["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": _filters()}
            ]
        return _json(doc)
    texts = [*t.pieces, ""]
    choices = [
        {"text": x, "index": 0, "logprobs": None, "finish_reason": None if x else finish}
        for x in texts
    ]
    return _sse(request, _openai_stream(t, base, choices, body))


def _embedding(item: Any, as_base64: bool) -> list[float] | str:
    digest = hashlib.sha256(orjson.dumps(item)).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    vector = [round(x / norm, 6) for x in raw]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
    return vector


def _embeddings(request: Request, host: _Host = _OPENAI_HOST) -> Reply:
    body = _json_body(request)
    model, raw = host.model(body), body.get("input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'")
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        raw = [raw]  # one token array
    items = [raw] if isinstance(raw, str) else raw
    if not (isinstance(items, list) and items and all(isinstance(x, str | list) for x in items)):
        raise _ApiError(400, "'input' must be a string or a non-empty array")
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(x, fmt == "base64")}
        for i, x in enumerate(items)
    ]
    tokens = _tokens(_chars(items))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json({"object": "list", "data": data, "model": model, "usage": usage})


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(msg_id: str, text: str | None, status: str) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "id": msg_id, "status": status, "role": "assistant"}
    item["content"] = [] if text is None else [_text_part(text)]
    return item


def _response_obj(
    t: _Turn, body: dict[str, Any], ids: dict[str, Any], done: bool
) -> dict[str, Any]:
    status = ("incomplete" if t.truncated else "completed") if done else "in_progress"
    output: list[dict[str, Any]] = []
    if done and t.reasoning:
        output.append({"type": "reasoning", "id": ids["rs"], "summary": []})
    if done:
        output.append(_message_item(ids["msg"], t.text, status))
    usage = {
        "input_tokens": t.prompt,
        "input_tokens_details": {"cached_tokens": t.cached},
        "output_tokens": t.completion,
        "output_tokens_details": {"reasoning_tokens": t.reasoning},
        "total_tokens": t.prompt + t.completion,
    }
    incomplete = {"reason": "max_output_tokens"} if done and t.truncated else None
    return {
        "id": ids["resp"], "object": "response", "created_at": ids["created"], "status": status,
        "error": None, "incomplete_details": incomplete, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": t.model, "output": output,
        "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": "medium" if t.reasoning else None, "summary": None},
        "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
        "usage": usage if done else None, "user": None, "metadata": {},
    }  # fmt: skip


def _responses_events(t: _Turn, body: dict[str, Any], ids: dict[str, Any]) -> list[bytes]:
    seq = itertools.count()

    def ev(name: str, **payload: Any) -> bytes:
        return _event(name, {"type": name, "sequence_number": next(seq), **payload})

    pending = _response_obj(t, body, ids, done=False)
    out = [ev("response.created", response=pending), ev("response.in_progress", response=pending)]
    index = 0
    if t.reasoning:
        item = {"type": "reasoning", "id": ids["rs"], "summary": []}
        out += [
            ev(f"response.output_item.{s}", output_index=0, item=item) for s in ("added", "done")
        ]
        index = 1
    msg = ids["msg"]
    loc = {"item_id": msg, "output_index": index, "content_index": 0}
    added = _message_item(msg, None, "in_progress")
    out.append(ev("response.output_item.added", output_index=index, item=added))
    out.append(ev("response.content_part.added", **loc, part=_text_part("")))
    out += [ev("response.output_text.delta", **loc, delta=p, logprobs=[]) for p in t.pieces]
    out.append(ev("response.output_text.done", **loc, text=t.text, logprobs=[]))
    out.append(ev("response.content_part.done", **loc, part=_text_part(t.text)))
    final = _response_obj(t, body, ids, done=True)
    out.append(ev("response.output_item.done", output_index=index, item=final["output"][-1]))
    out.append(ev(f"response.{final['status']}", response=final))
    return out


def _responses(request: Request, host: _Host = _OPENAI_HOST) -> Reply:
    body = _json_body(request)
    chars = _chars(body.get("instructions")) + _chars(body.get("input"))
    limit = _limit(body.get("max_output_tokens"), "max_output_tokens")
    t = _turn(host.model(body), chars, limit)
    t = _echoed(request, body, t)
    ids = {"resp": _id("resp_"), "msg": _id("msg_"), "rs": _id("rs_"), "created": int(time.time())}
    if body.get("stream") is True:
        return _sse(request, _responses_events(t, body, ids))
    return _json(_response_obj(t, body, ids, done=True))


def _models(request: Request) -> Reply:
    info = {"object": "model", "created": 1_700_000_000, "owned_by": "tollway-demo"}
    return _json({"object": "list", "data": [{"id": m, **info} for m in _MODELS]})


# ------------------------------------------------------------------------- Anthropic

_ANTHROPIC_MODELS = {
    "claude-sonnet-4-5": "Claude Sonnet 4.5",
    "claude-haiku-4-5": "Claude Haiku 4.5",
    "claude-opus-4-1": "Claude Opus 4.1",
}


def _anthropic_models(request: Request) -> Reply:
    """Anthropic's list shape, so that ``anthropic.Anthropic(...).models.list()`` works."""
    created = "2025-09-29T00:00:00Z"
    data = [
        {"type": "model", "id": m, "display_name": name, "created_at": created}
        for m, name in _ANTHROPIC_MODELS.items()
    ]
    page = {"has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return _json({"data": data, **page})


def _messages(request: Request) -> Reply:
    body = _json_body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "messages: Field required (a non-empty array)")
    if "max_tokens" not in body:
        raise _ApiError(400, "max_tokens: Field required")
    chars = _chars(body.get("system")) + _chars(messages)
    t = _turn(_model(body), chars, _limit(body["max_tokens"], "max_tokens"))
    t = _echoed(request, body, t)
    usage = {
        "input_tokens": t.prompt - t.cached - t.cache_write,
        "cache_creation_input_tokens": t.cache_write,
        "cache_read_input_tokens": t.cached,
        "output_tokens": t.completion,
        "service_tier": "standard",
    }
    stop = "max_tokens" if t.truncated else "end_turn"
    msg: dict[str, Any] = {
        "id": _id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": t.model,
    }
    if body.get("stream") is not True:
        content = [{"type": "text", "text": t.text}]
        msg |= {"content": content, "stop_reason": stop, "stop_sequence": None}
        return _json({**msg, "usage": usage})
    start: dict[str, Any] = {**msg, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
    ]
    events += [
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
        for p in t.pieces
    ]
    events += [
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                           "usage": {"output_tokens": t.completion}}),
        ("message_stop", {}),
    ]  # fmt: skip
    return _sse(request, (_event(name, {"type": name, **data}) for name, data in events))


# ---------------------------------------------------------------------------- Gemini


def _gemini_usage(t: _Turn, candidates: int, vertex: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "promptTokenCount": t.prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": t.prompt + candidates + t.reasoning,
    }
    if vertex:
        usage["trafficType"] = "ON_DEMAND"
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": t.prompt}]
    if vertex:
        usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": candidates}]
    if t.cached:
        usage["cachedContentTokenCount"] = t.cached
    if t.reasoning:
        usage["thoughtsTokenCount"] = t.reasoning
    return usage


def _gemini_chunk(
    t: _Turn, text: str, candidates: int, final: bool, rid: str, vertex: bool = False
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if final:
        candidate["finishReason"] = "MAX_TOKENS" if t.truncated else "STOP"
    if not vertex:
        candidate["index"] = 0
    chunk: dict[str, Any] = {"candidates": [candidate]}
    # The Gemini API repeats the usage so far in every chunk; Vertex AI sends it once,
    # in the last chunk of a stream.
    if final or not vertex:
        chunk["usageMetadata"] = _gemini_usage(t, candidates, vertex)
    chunk["modelVersion"] = VERTEX_MODEL_VERSIONS.get(t.model, t.model) if vertex else t.model
    if vertex:
        chunk["createTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    chunk["responseId"] = rid
    return chunk


_GEMINI_PATH = re.compile(r"/(?:v1|v1beta|v1alpha)/models/([^/:]+)(?::([A-Za-z]+))?")
_GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash")
# Vertex AI: a publisher model in a project and location, or (express mode, API key)
# without them; API versions v1 and v1beta1.
_VERTEX_PATH = re.compile(
    r"/(?:v1|v1beta1)/(?:projects/[^/]+/locations/[^/]+/)?publishers/google/models/"
    r"([^/:]+)(?::([A-Za-z]+))?"
)
# The version Vertex AI answers with when a request names a model's alias.
VERTEX_MODEL_VERSIONS = {
    "gemini-2.0-flash": "gemini-2.0-flash-001",
    "gemini-2.0-flash-lite": "gemini-2.0-flash-lite-001",
}


def _gemini(request: Request, vertex: bool = False) -> Reply:
    match = (_VERTEX_PATH if vertex else _GEMINI_PATH).fullmatch(request.path)
    assert match is not None and match[2] is not None  # dispatched here only then
    model, method = match[1], match[2]
    body = _json_body(request)
    config, contents = body.get("generationConfig", {}), body.get("contents")
    if not isinstance(config, dict):
        raise _ApiError(400, "Invalid value at 'generation_config'")
    if not isinstance(contents, list) or not contents:
        raise _ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    chars = _chars(body.get("systemInstruction")) + _chars(contents)
    t = _turn(model, chars, _limit(config.get("maxOutputTokens"), "maxOutputTokens"))
    t = _echoed(request, body, t)
    rid = _id("")
    if method == "generateContent":
        return _json(_gemini_chunk(t, t.text, t.completion, True, rid, vertex))
    pieces = t.pieces
    chunks = [
        _gemini_chunk(t, p, i + 1, i + 1 == len(pieces), rid, vertex) for i, p in enumerate(pieces)
    ]
    if request.query_param("alt") == "sse":
        return _sse(request, (_data(c, b"\r\n\r\n") for c in chunks))
    return _json(chunks)


def _gemini_model(name: str) -> dict[str, Any]:
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "description": "Tollway demo model",
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
    }


def _gemini_models(request: Request) -> Reply:
    return _json({"models": [_gemini_model(m) for m in _GEMINI_MODELS]})


def _gemini_get_model(request: Request) -> Reply:
    match = _GEMINI_PATH.fullmatch(request.path)
    assert match is not None
    return _json(_gemini_model(match[1]))


# ------------------------------------------------------------------ errors, auth, app

_ANTHROPIC_ERRORS = {
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
}
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}
_AUTH_MESSAGES = {
    "openai": "Incorrect API key provided.",
    "anthropic": "invalid x-api-key",
    "gemini": "API key not valid. Please pass a valid API key.",
    "azure": (
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
        "provide a valid key for an active subscription and use a correct regional API "
        "endpoint for your resource."
    ),
    "vertex": (
        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential."
    ),
}

Dispatch = tuple[Style, "Callable[[Request], Reply] | None"]
_OPENAI_ROUTES: dict[tuple[str, str], Callable[[Request], Reply]] = {
    ("POST", "/v1/chat/completions"): _chat_completions,
    ("POST", "/v1/completions"): _completions,
    ("POST", "/v1/embeddings"): _embeddings,
    ("POST", "/v1/responses"): _responses,
    ("GET", "/v1/models"): _models,
}
_ANTHROPIC_ROUTES: dict[tuple[str, str], Callable[[Request], Reply]] = {
    ("POST", "/v1/messages"): _messages,
    ("GET", "/v1/models"): _anthropic_models,
}
_GEMINI_METHODS = ("generateContent", "streamGenerateContent")


def route(method: str, path: str, headers: Mapping[str, str], query: str = "") -> Dispatch:
    """Which API a request speaks, and its handler (None: no such endpoint there).

    Azure OpenAI's paths (``/openai/...``) and Vertex AI's (``/v1/projects/...``,
    ``/v1/publishers/...``, ``/v1beta1/...``) are their own. Otherwise the gateway's own
    classifier decides (:func:`extproc.routes.dialect_of`: ``anthropic-version`` is
    Anthropic; a ``models/{model}:{method}`` path, an ``x-goog-api-key`` header or a
    ``key`` parameter is Gemini; the rest OpenAI). As no OpenAI API lives there,
    ``/v1beta/`` is also Gemini's and ``/v1/messages`` Anthropic's.
    """
    if path.startswith("/openai/"):
        return "azure", _azure_handler(method, path, query)
    if path.startswith(("/v1/projects/", "/v1/publishers/", "/v1beta1/")):
        return "vertex", _vertex_handler(method, path)
    dialect = routes.dialect_of(path, headers, query)
    if dialect == "gemini" or path.startswith(("/v1beta/", "/v1alpha/")):
        return "gemini", _gemini_handler(method, path)
    if dialect == "anthropic" or path.startswith("/v1/messages"):
        return "anthropic", _ANTHROPIC_ROUTES.get((method, path))
    return "openai", _OPENAI_ROUTES.get((method, path))


def _gemini_handler(method: str, path: str) -> Callable[[Request], Reply] | None:
    if method == "GET" and path in ("/v1/models", "/v1beta/models", "/v1alpha/models"):
        return _gemini_models
    match = _GEMINI_PATH.fullmatch(path)
    if match is None:
        return None
    if match[2] is None:
        return _gemini_get_model if method == "GET" else None
    return _gemini if method == "POST" and match[2] in _GEMINI_METHODS else None


# Azure OpenAI: /openai/deployments/{d}/{endpoint}?api-version=... (the deployment picks
# the model), /openai/{responses,models}?api-version=..., and the v1 API, /openai/v1/...
# (the body's model names the deployment; api-version optional).
_AZURE_DEPLOYMENT_PATH = re.compile(
    r"/openai/deployments/([^/]+)/(chat/completions|completions|embeddings|responses)",
    re.IGNORECASE,
)
_AZURE_PLAIN_PATH = re.compile(
    r"/openai/(v1/)?(chat/completions|completions|embeddings|responses|models)", re.IGNORECASE
)
_AZURE_HANDLERS: dict[str, Callable[..., Reply]] = {
    "chat/completions": _chat_completions,
    "completions": _completions,
    "embeddings": _embeddings,
    "responses": _responses,
}


def _azure_handler(method: str, path: str, query: str) -> Callable[[Request], Reply] | None:
    deployment = _AZURE_DEPLOYMENT_PATH.fullmatch(path)
    plain = _AZURE_PLAIN_PATH.fullmatch(path)
    versioned = plain is not None and plain[1] is not None  # /openai/v1/...
    if deployment is not None:
        endpoint, host = deployment[2].lower(), _Host(True, unquote(deployment[1]))
    elif plain is not None and (versioned or plain[2].lower() in ("responses", "models")):
        endpoint, host = plain[2].lower(), _Host(True)
    else:
        return None
    if not versioned and not any(p.startswith("api-version=") for p in query.split("&")):
        return _azure_no_api_version
    if endpoint == "models":
        return _models if method == "GET" else None
    if method != "POST":
        return None
    return functools.partial(_AZURE_HANDLERS[endpoint], host=host)


def _azure_no_api_version(request: Request) -> Reply:
    # What Azure answers a data-plane call without ?api-version= (outside /openai/v1).
    raise _ApiError(404, "Resource not found")


# Claude on Vertex AI: Anthropic's Messages API, the model in the path, the body's
# anthropic_version Vertex's; :streamRawPredict streams.
_VERTEX_CLAUDE_PATH = re.compile(
    r"/(?:v1|v1beta1)/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
    r"([^/:]+):(rawPredict|streamRawPredict)"
)


def _vertex_claude(request: Request) -> Reply:
    match = _VERTEX_CLAUDE_PATH.fullmatch(request.path)
    assert match is not None  # dispatched here only then
    body = _json_body(request)
    version = body.get("anthropic_version")
    if not isinstance(version, str) or not version:  # the SDK sends its API version
        raise _ApiError(400, "anthropic_version: Field required")
    # The model the path names (its @version dropped, as the answer names it).
    model = match[1].partition("@")[0]
    body = {**body, "model": model, "stream": match[2] == "streamRawPredict"}
    return _messages(replace(request, body=orjson.dumps(body)))


def _vertex_handler(method: str, path: str) -> Callable[[Request], Reply] | None:
    if _VERTEX_CLAUDE_PATH.fullmatch(path) is not None:
        return _vertex_claude if method == "POST" else None
    match = _VERTEX_PATH.fullmatch(path)
    if match is None or match[2] is None:
        return None
    if method == "POST" and match[2] in _GEMINI_METHODS:
        return functools.partial(_gemini, vertex=True)
    return None


def _error(style: Style, err: _ApiError) -> Response:
    if style == "azure":
        # Azure's own shape: the status as a string for a code, and a message.
        return _json({"error": {"code": str(err.status), "message": err.message}}, err.status)
    if style == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(err.status, "invalid_request_error")
        return _json({"type": "error", "error": {"type": kind, "message": err.message}}, err.status)
    if style in ("gemini", "vertex"):
        status = _GEMINI_STATUS.get(err.status, "FAILED_PRECONDITION")
        error = {"code": err.status, "message": err.message, "status": status}
        return _json({"error": error}, err.status)
    error = {"message": err.message, "type": "invalid_request_error", "param": None}
    return _json({"error": {**error, "code": err.code}}, err.status)


def _presented_key(request: Request, style: Style) -> str:
    if style == "gemini":
        return request.headers.get("x-goog-api-key", "")
    if style == "azure" and "api-key" in request.headers:
        return request.headers["api-key"]  # else an Entra ID token, as a Bearer token
    if style == "vertex" and "authorization" not in request.headers:
        return request.headers.get("x-goog-api-key", "")  # express mode: an API key
    if style == "anthropic" and "x-api-key" in request.headers:
        return request.headers["x-api-key"]
    # OpenAI; also Anthropic without x-api-key (anthropic SDK 2.x sends the key as a Bearer token)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class App:
    """The demo upstream as a handler: records, routes, checks the provider key, answers."""

    def __init__(self, provider_key: str | None = None) -> None:
        self._expected = (
            None if provider_key is None else provider_key.encode("utf-8", "surrogatepass")
        )
        self.records: deque[dict[str, Any]] = deque(maxlen=_MAX_RECORDS)

    def __call__(self, request: Request) -> Reply:
        if request.path == "/__demo/requests" and request.method in ("GET", "DELETE"):
            if request.method == "DELETE":
                self.records.clear()
                return Response(204)
            return _json(list(self.records))
        record = {"method": request.method, "path": request.path, "query": request.query}
        body = None if request.body is None else request.body.decode("utf-8", "replace")
        self.records.append({**record, "headers": dict(request.headers), "body": body})
        style, handler = route(request.method, request.path, request.headers, request.query)
        if handler is None:
            message = f"Invalid URL ({request.method} {request.path})"
            if style == "azure":
                message = "Resource not found"
            return _error(style, _ApiError(404, message, "unknown_url"))
        if self._expected is not None:
            presented = _presented_key(request, style).encode("utf-8", "surrogatepass")
            if not hmac.compare_digest(presented, self._expected):
                return _error(style, _ApiError(401, _AUTH_MESSAGES[style], "invalid_api_key"))
        try:
            return handler(request)
        except _ApiError as err:
            return _error(style, err)


async def start(host: str, port: int, provider_key: str | None = None) -> tuple[Server, int]:
    """Start serving on ``host:port`` (0 picks a free port); returns the server and bound port.
    Stop it with ``await server.close()``."""
    server = Server(App(provider_key), MAX_BODY_BYTES)
    return server, await server.start(host, port)


async def _serve(host: str, port: int, provider_key: str | None) -> None:
    server, bound = await start(host, port, provider_key)
    shown = f"[{host}]" if ":" in host else host
    print(f"demo upstream listening on http://{shown}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still interrupts
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def run(host: str, port: int, provider_key: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    asyncio.run(_serve(host, port, provider_key))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tollway demo LLM upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--provider-key", default=None)
    args = parser.parse_args()
    run(args.host, args.port, args.provider_key)
