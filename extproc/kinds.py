"""Value types every layer shares; this module imports nothing of the package."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

# Where a provider key goes and which error shape a route answers in.
ApiKind = Literal["openai", "azure", "anthropic", "gemini"]
# The error shape a client understands.
Dialect = Literal["openai", "anthropic", "gemini"]
# The metered API a request calls.
Api = Literal["chat", "completions", "embeddings", "responses", "messages", "generate_content"]


@dataclass(slots=True)
class Usage:
    """Tokens of one request, as OpenTelemetry GenAI counts them, with the kinds
    providers bill at rates of their own.

    ``input_tokens`` is every prompt token, cached or not; the other input
    counts are parts of it: read from a prompt cache (``cached_input_tokens``,
    of which ``cached_audio_tokens`` and ``cached_image_tokens`` by modality),
    written to one (``cache_creation_tokens``, of which
    ``cache_creation_1h_tokens`` with a one-hour lifetime), and by modality
    (audio, image, video; text is the rest). ``output_tokens`` is every
    generated token; reasoning, audio and image tokens are parts of it.
    ``service_tier`` is the tier that served the request ("" for standard).
    Providers report these differently (see each reader); this is what they
    all become.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    cached_audio_tokens: int = 0
    cached_image_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    input_video_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    # Reported kinds Tollway has no rate for (say, a new details field): priced as
    # plain input or output, and counted as unpriced.
    other_input_tokens: int = 0
    other_output_tokens: int = 0
    service_tier: str = ""


def add_usage(a: Usage, b: Usage) -> Usage:
    """Two parts of one request (say, an Anthropic compaction step and the answer)."""
    counts = {name: getattr(a, name) + getattr(b, name) for name in _COUNTS}
    return Usage(**counts, service_tier=a.service_tier or b.service_tier)


_COUNTS = tuple(f.name for f in fields(Usage) if f.type == "int")
