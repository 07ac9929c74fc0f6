"""Which upstream a request goes to, and what it calls there: one table, read by
Tollway for every request and rendered into Envoy's routes, so both always agree.

A request goes to the upstream whose path prefix it matches, longest prefix first.
Several upstreams may share a prefix (the defaults share ``/v1/``); the request
then goes to the one whose API it speaks:

1. Anthropic if it carries ``anthropic-version`` (every Anthropic SDK request does);
2. Gemini if its path names ``models/{model}:{method}``, or it carries
   ``x-goog-api-key`` or a ``key`` query parameter;
3. otherwise the OpenAI-style upstream (``openai`` or ``azure``) of that prefix,
   if there is one; if not, no upstream matches (404), never a guess.

An upstream's ``mount`` (``/anthropic``) is a prefix of its own: the request goes
there whatever it speaks, with the mount removed from the path. An upstream may have
a mount and no prefixes (Azure OpenAI under ``/azure``: Azure's v1 API and OpenAI's
own base URL are both ``/openai/v1/``).

On a Gemini upstream (the Gemini API, Vertex AI), ``:generateContent`` and
``:streamGenerateContent`` are metered as generate_content, and Claude on Vertex AI
(``.../publishers/anthropic/models/{m}:rawPredict``, ``:streamRawPredict``) as messages.

Azure OpenAI and Vertex AI have no default route; the README (Routing) configures
them. Azure's model is its deployment (``/openai/deployments/{d}/...``) or the body's;
Vertex paths (``/v1/projects/.../publishers/google/models/{m}:{method}``, ``/v1beta1/``)
take prefixes longer than the Gemini API's ``/v1/`` and name their model like it.
Of the query only a ``key`` parameter plays a part (Azure's ``api-version`` goes through).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from .config import Upstream
from .kinds import Api, ApiKind, Dialect

Signature = Literal["anthropic", "gemini"]  # what a request must speak, on a shared prefix

ANTHROPIC_HEADER = "anthropic-version"
GEMINI_KEY_HEADER = "x-goog-api-key"
GEMINI_KEY_PARAM = "key"
# `models/{model}:{method}` anywhere in the path: Gemini API and Vertex AI
# (`/v1/projects/p/locations/l/publishers/google/models/m:generateContent`). The
# same pattern goes into Envoy's route (RE2), so it stays in the common subset.
GEMINI_PATH = r".*/(?:tunedModels|models)/[^/]+(?::|%3[aA])[A-Za-z]+"
_GEMINI_PATH = re.compile(GEMINI_PATH)
_SIGNATURE_OF: dict[ApiKind, Signature | None] = {
    "anthropic": "anthropic",
    "gemini": "gemini",
    "openai": None,
    "azure": None,
}

_OPENAI_ENDPOINT = r"/(chat/completions|completions|embeddings|responses)/?$"
_OPENAI_API = re.compile(_OPENAI_ENDPOINT)
_OPENAI_APIS: dict[str, Api] = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
}
_ANTHROPIC_API = re.compile(r"/messages/?$")
# The model a Gemini path names: no ':' or '/' inside it, one method after it.
_GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):([A-Za-z]+)$")
_GEMINI_GENERATE = frozenset({"generateContent", "streamGenerateContent"})
# Claude on Vertex AI: Anthropic's Messages API at .../publishers/anthropic/models/{m}:rawPredict.
_VERTEX_CLAUDE = frozenset({"rawPredict", "streamRawPredict"})
_VERTEX_CLAUDE_COUNT = "count-tokens"  # .../publishers/anthropic/models/count-tokens:rawPredict
# Azure accepts any casing of its path segments.
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/", re.IGNORECASE)
_AZURE_API = re.compile(_OPENAI_ENDPOINT, re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: Upstream

    @property
    def api(self) -> ApiKind:
        return self.upstream.api


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of the table: a prefix, what the request must speak, and whether
    the prefix is removed before the request goes upstream (a mount)."""

    prefix: str
    route: Route
    signature: Signature | None
    strip: bool


@dataclass(frozen=True, slots=True)
class Call:
    """What one request calls, decided once and read by every stage."""

    route: Route
    path: str  # as the provider sees it: the mount removed (without the query)
    api: Api | None  # the metered API; None for anything not metered (GET /v1/models...)
    # The model the path names (Gemini, Azure deployment), or None.
    path_model: str | None
    # The path looks like it names a model but Tollway cannot read which one.
    path_model_unreadable: bool = False


def _speaks(signature: Signature, path: str, headers: Mapping[str, str], query: str) -> bool:
    if signature == "anthropic":
        return ANTHROPIC_HEADER in headers
    return (
        GEMINI_KEY_HEADER in headers
        or _has_param(query, GEMINI_KEY_PARAM)
        or _GEMINI_PATH.fullmatch(path) is not None
    )


def _has_param(query: str, name: str) -> bool:
    if not query:
        return False
    return any(part.partition("=")[0] == name for part in query.split("&"))


def dialect_of(path: str, headers: Mapping[str, str], query: str = "") -> Dialect:
    """The error shape for a request no route took: what it seems to speak."""
    if _speaks("anthropic", path, headers, query):
        return "anthropic"
    if _speaks("gemini", path, headers, query):
        return "gemini"
    return "openai"


def route_dialect(api: ApiKind) -> Dialect:
    return "openai" if api == "azure" else api


def _classify(route: Route, method: str, path: str) -> Call:
    kind = route.api
    if kind == "gemini":
        plain = unquote(path) if "%" in path else path
        found = _GEMINI_MODEL.search(plain)
        if found is None:
            unreadable = _GEMINI_PATH.fullmatch(path) is not None
            return Call(route, path, None, None, unreadable)
        api: Api | None = None
        if method == "POST" and found.group(2) in _GEMINI_GENERATE:
            api = "generate_content"
        elif method == "POST" and found.group(2) in _VERTEX_CLAUDE and "/anthropic/" in plain:
            if found.group(1) == _VERTEX_CLAUDE_COUNT:  # counts tokens, bills none
                return Call(route, path, None, None)
            api = "messages"
        return Call(route, path, api, found.group(1))
    if method != "POST":
        api = None
    elif kind == "openai":
        matched = _OPENAI_API.search(path)
        api = _OPENAI_APIS[matched.group(1)] if matched else None
    elif kind == "azure":
        matched = _AZURE_API.search(path)
        api = _OPENAI_APIS[matched.group(1).lower()] if matched else None
    else:
        api = "messages" if _ANTHROPIC_API.search(path) else None
    model = None
    if kind == "azure":
        deployment = _AZURE_DEPLOYMENT.search(path)
        model = unquote(deployment.group(1)) if deployment else None
    return Call(route, path, api, model)


class RouteTable:
    """Rules in the order Envoy is given them: the first that matches wins."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        rules: list[Rule] = []
        for name, upstream in upstreams.items():
            route = Route(name, upstream)
            for prefix in upstream.prefixes:
                sharing = [u for u in upstreams.values() if prefix in u.prefixes]
                signature = _SIGNATURE_OF[upstream.api] if len(sharing) > 1 else None
                rules.append(Rule(prefix, route, signature, strip=False))
            if upstream.mount is not None:
                rules.append(Rule(upstream.mount + "/", route, None, strip=True))
        # Longest prefix first; on one prefix, the rules that need a signature first.
        rules.sort(key=lambda r: (-len(r.prefix), r.signature is None, r.signature or ""))
        self.rules: tuple[Rule, ...] = tuple(rules)

    def match(
        self, method: str, path: str, headers: Mapping[str, str], query: str = ""
    ) -> Call | None:
        for rule in self.rules:
            if not path.startswith(rule.prefix):
                continue
            if rule.signature is not None and not _speaks(rule.signature, path, headers, query):
                continue
            upstream_path = path[len(rule.prefix) - 1 :] if rule.strip else path
            return _classify(rule.route, method, upstream_path)
        return None
