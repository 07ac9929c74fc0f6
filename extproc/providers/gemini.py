"""Gemini generateContent and streamGenerateContent (SSE with ``?alt=sse``, else a JSON array).

``usageMetadata.promptTokenCount`` already *includes* ``cachedContentTokenCount``;
``thoughtsTokenCount`` is *outside* ``candidatesTokenCount`` and billed as
output, so Usage's output is their sum. Each chunk of a stream repeats the
usage so far; the last one wins.
"""

from __future__ import annotations

from typing import Any

from .sse import Event
from .usage import Usage, UsageReader, count, text_length


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
            thoughts = count(raw.get("thoughtsTokenCount"))
            self.usage = Usage(
                input_tokens=count(raw.get("promptTokenCount")),
                output_tokens=count(raw.get("candidatesTokenCount")) + thoughts,
                cached_input_tokens=count(raw.get("cachedContentTokenCount")),
                reasoning_tokens=thoughts,
            )


def _candidates_text(candidates: Any) -> int:
    total = 0
    for candidate in candidates if isinstance(candidates, list) else ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                total += text_length(part.get("text"))
    return total
