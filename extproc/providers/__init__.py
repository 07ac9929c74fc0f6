"""Per-API readers of token usage (sans-IO), and which API a request speaks."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote

from ..config import ApiKind
from .anthropic import MessagesReader
from .gemini import GenerateContentReader
from .openai import ChatReader, EmbeddingsReader, ResponsesReader
from .usage import Usage, UsageReader

__all__ = ["Api", "Usage", "UsageReader", "api_for", "new_reader"]

Api = Literal["chat", "completions", "embeddings", "responses", "messages", "generate_content"]

_OPENAI = re.compile(r"/(chat/completions|completions|embeddings|responses)/?$")
_ANTHROPIC = re.compile(r"/messages/?$")
_GEMINI = re.compile(r"/(?:tunedModels|models)/[^/]+:(?:generateContent|streamGenerateContent)$")
_OPENAI_APIS: dict[str, Api] = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
}


def api_for(kind: ApiKind, method: str, path: str) -> Api | None:
    """The metered API a request calls; None for anything not metered (GET /v1/models...)."""
    if method != "POST":
        return None
    if kind in ("openai", "azure"):
        match = _OPENAI.search(path)
        return _OPENAI_APIS[match.group(1)] if match else None
    if kind == "anthropic":
        return "messages" if _ANTHROPIC.search(path) else None
    if kind == "gemini":
        return "generate_content" if _GEMINI.search(unquote(path)) else None
    return None


_READERS: dict[Api, type[UsageReader]] = {
    "chat": ChatReader,
    "completions": ChatReader,
    "embeddings": EmbeddingsReader,
    "responses": ResponsesReader,
    "messages": MessagesReader,
    "generate_content": GenerateContentReader,
}


def new_reader(api: Api) -> UsageReader:
    return _READERS[api]()
