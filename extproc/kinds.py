"""Value types every layer shares; this module imports nothing of the package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Where a provider key goes and which error shape a route answers in.
ApiKind = Literal["openai", "azure", "anthropic", "gemini"]
# The error shape a client understands.
Dialect = Literal["openai", "anthropic", "gemini"]
# The metered API a request calls.
Api = Literal["chat", "completions", "embeddings", "responses", "messages", "generate_content"]


@dataclass(slots=True)
class Usage:
    """Tokens of one request, as OpenTelemetry GenAI counts them.

    ``input_tokens`` is every prompt token, cached or not; ``cached_input_tokens``
    (read from a prompt cache) and ``cache_creation_tokens`` (written to one) are
    parts of it. ``output_tokens`` is every generated token; ``reasoning_tokens``
    is the part spent thinking. Providers report these differently (see each
    reader); this is what they all become.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
