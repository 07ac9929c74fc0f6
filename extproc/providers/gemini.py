"""Gemini generateContent and streamGenerateContent (SSE with ``?alt=sse``, else a JSON array),
on the Gemini API and on Vertex AI.

``usageMetadata.promptTokenCount`` already *includes* ``cachedContentTokenCount``;
``toolUsePromptTokenCount`` (tool results fed back to the model) and
``thoughtsTokenCount`` are *outside* the prompt and the candidates and billed as
input and output, so Usage's input and output are those sums. Per-modality counts
(``promptTokensDetails``, ``toolUsePromptTokensDetails``, ``cacheTokensDetails``,
``candidatesTokensDetails``: TEXT, IMAGE, AUDIO, VIDEO, DOCUMENT) say which part is
priced at which rate. The Gemini API names the tier in ``serviceTier``, Vertex AI
in ``trafficType``. Each chunk of a stream repeats the usage so far; the last one wins.
"""

from __future__ import annotations

from typing import Any

from .sse import Event
from .usage import Usage, UsageReader, count, service_tier, text_length

# Documents are billed as text (their pages become text and image tokens).
_PROMPT = {
    "AUDIO": "input_audio_tokens",
    "IMAGE": "input_image_tokens",
    "VIDEO": "input_video_tokens",
}
_CACHE = {"AUDIO": "cached_audio_tokens", "IMAGE": "cached_image_tokens"}
_OUTPUT = {"AUDIO": "output_audio_tokens", "IMAGE": "output_image_tokens"}
_TEXT = frozenset({"TEXT", "DOCUMENT"})


def _modalities(raw: Any, fields: dict[str, str], other: str, into: dict[str, int]) -> None:
    """A ``[{modality, tokenCount}]`` list into Usage fields; a modality Tollway does
    not know (not text) into ``other``."""
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, dict):
            continue
        tokens, modality = count(item.get("tokenCount")), item.get("modality")
        field = fields.get(modality) if isinstance(modality, str) else None
        if field is not None:
            into[field] = into.get(field, 0) + tokens
        elif other and tokens and modality not in _TEXT:
            into[other] = into.get(other, 0) + tokens


def _usage(raw: dict[str, Any]) -> Usage:
    parts: dict[str, int] = {}
    _modalities(raw.get("promptTokensDetails"), _PROMPT, "other_input_tokens", parts)
    _modalities(raw.get("toolUsePromptTokensDetails"), _PROMPT, "other_input_tokens", parts)
    _modalities(raw.get("cacheTokensDetails"), _CACHE, "", parts)
    _modalities(raw.get("candidatesTokensDetails"), _OUTPUT, "other_output_tokens", parts)
    thoughts = count(raw.get("thoughtsTokenCount"))
    tier = raw.get("serviceTier") or raw.get("trafficType")
    return Usage(
        input_tokens=count(raw.get("promptTokenCount")) + count(raw.get("toolUsePromptTokenCount")),
        output_tokens=count(raw.get("candidatesTokenCount")) + thoughts,
        cached_input_tokens=count(raw.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        service_tier=service_tier(tier),
        **parts,
    )


class GenerateContentReader(UsageReader):
    def on_json(self, doc: Any) -> None:
        for chunk in doc if isinstance(doc, list) else [doc]:
            self._chunk(chunk)

    def on_event(self, event: Event, doc: Any) -> None:
        self._chunk(doc)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        self._model(chunk.get("modelVersion"))
        self.text_chars += _candidates_text(chunk.get("candidates"))
        raw = chunk.get("usageMetadata")
        if isinstance(raw, dict):
            self.usage = _usage(raw)


def _candidates_text(candidates: Any) -> int:
    total = 0
    for candidate in candidates if isinstance(candidates, list) else ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                total += text_length(part.get("text"))
    return total
