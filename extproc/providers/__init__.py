"""Per-API readers of token usage (sans-IO), and which API a request speaks."""

from __future__ import annotations

from ..kinds import Api
from .anthropic import MessagesReader
from .gemini import GenerateContentReader
from .openai import ChatReader, EmbeddingsReader, ResponsesReader
from .usage import Usage, UsageReader

__all__ = ["Api", "Usage", "UsageReader", "new_reader"]

# Which API a request calls is decided once, by routes.RouteTable.


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
