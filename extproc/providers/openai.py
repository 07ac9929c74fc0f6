"""OpenAI and everything that speaks its schema: Azure OpenAI, vLLM, Ollama, LM Studio.

Chat completions, legacy completions and embeddings report ``usage`` with
``prompt_tokens`` and ``completion_tokens``; the Responses API with
``input_tokens`` and ``output_tokens``. In both, the details objects split the
totals: cached reads, cache writes, audio and image tokens are *inside* the
prompt count, reasoning, audio and image tokens *inside* the completion count,
which is also how Usage counts them. ``service_tier`` (beside ``usage``) names
the tier that served the request, billed at its own rates. A chat or completions stream
reports usage only in its last chunk and only with
``stream_options.include_usage`` (Tollway asks for it).
"""

from __future__ import annotations

from typing import Any

from .sse import Event
from .usage import Usage, UsageReader, count, service_tier, text_length

# Parts of the prompt or the completion, by details field; text is the rest. Kinds
# billed as plain input or output (predicted-output tokens) need no field here.
_INPUT_DETAILS = {
    "cached_tokens": "cached_input_tokens",
    "cache_write_tokens": "cache_creation_tokens",
    "audio_tokens": "input_audio_tokens",
    "image_tokens": "input_image_tokens",
}
_OUTPUT_DETAILS = {
    "reasoning_tokens": "reasoning_tokens",
    "audio_tokens": "output_audio_tokens",
    "image_tokens": "output_image_tokens",
}
_CACHED_DETAILS = {"audio_tokens": "cached_audio_tokens", "image_tokens": "cached_image_tokens"}
_PLAIN = frozenset({"text_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens"})


def _details(raw: Any, fields: dict[str, str], other: str, into: dict[str, int]) -> None:
    """Token counts of a details object into Usage fields; unknown ``*_tokens`` into ``other``."""
    if not isinstance(raw, dict):
        return
    for name, value in raw.items():
        tokens = count(value)
        if not tokens:
            continue
        field = fields.get(name)
        if field is not None:
            into[field] = into.get(field, 0) + tokens
        elif other and name.endswith("_tokens") and name not in _PLAIN:
            into[other] = into.get(other, 0) + tokens


def _usage(raw: Any, tier: str) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    parts: dict[str, int] = {}
    input_details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
    _details(input_details, _INPUT_DETAILS, "other_input_tokens", parts)
    if isinstance(input_details, dict):  # realtime and audio models: what was cached, by kind
        _details(input_details.get("cached_tokens_details"), _CACHED_DETAILS, "", parts)
    output_details = raw.get("completion_tokens_details") or raw.get("output_tokens_details")
    _details(output_details, _OUTPUT_DETAILS, "other_output_tokens", parts)
    if "input_tokens" in raw or "output_tokens" in raw:  # the Responses API
        prompt, completion = raw.get("input_tokens"), raw.get("output_tokens")
    else:
        prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    return Usage(
        input_tokens=count(prompt), output_tokens=count(completion), service_tier=tier, **parts
    )


def _choices_text(choices: Any, key: str) -> int:
    """Characters of text in ``choices[*][key]`` (``message``/``delta`` content, or ``text``)."""
    total = 0
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            part = choice.get(key)
            if isinstance(part, dict):
                total += text_length(part.get("content")) + text_length(part.get("refusal"))
                total += text_length(part.get("reasoning_content"))  # vLLM, DeepSeek
            else:
                total += text_length(part)
    return total


class ChatReader(UsageReader):
    """/chat/completions and /completions (``text`` instead of ``message``/``delta``)."""

    def on_json(self, doc: Any) -> None:
        if isinstance(doc, dict):
            self._model(doc.get("model"))
            choices = doc.get("choices")
            self.text_chars += _choices_text(choices, "message") + _choices_text(choices, "text")
            self.usage = (
                _usage(doc.get("usage"), service_tier(doc.get("service_tier"))) or self.usage
            )

    def on_event(self, event: Event, doc: Any) -> None:
        if isinstance(doc, dict):  # "[DONE]" and anything else not JSON are skipped
            self._model(doc.get("model"))
            choices = doc.get("choices")
            self.text_chars += _choices_text(choices, "delta") + _choices_text(choices, "text")
            raw = doc.get("usage")
            if raw is not None:  # the last chunk; every chunk names the tier
                self.usage = _usage(raw, service_tier(doc.get("service_tier"))) or self.usage


class EmbeddingsReader(UsageReader):
    def on_json(self, doc: Any) -> None:
        if isinstance(doc, dict):
            self._model(doc.get("model"))
            self.usage = _usage(doc.get("usage"), "") or self.usage

    def on_event(self, event: Event, doc: Any) -> None:
        pass  # embeddings do not stream


_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesReader(UsageReader):
    """/responses: a response object, or events whose last carries the final response."""

    def on_json(self, doc: Any) -> None:
        if isinstance(doc, dict):
            self._response(doc, final=True)

    def on_event(self, event: Event, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        kind = doc.get("type", event.type)
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            self.text_chars += text_length(doc.get("delta"))
        elif isinstance(doc.get("response"), dict):  # created, in_progress, completed...
            self._response(doc["response"], final=kind in _FINAL_EVENTS)

    def _response(self, response: dict[str, Any], final: bool) -> None:
        self._model(response.get("model"))
        tier = service_tier(response.get("service_tier"))
        self.usage = _usage(response.get("usage"), tier) or self.usage
        if final and not self.text_chars:
            self.text_chars = _output_text(response.get("output"))


def _output_text(output: Any) -> int:
    total = 0
    for item in output if isinstance(output, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict):
                total += text_length(part.get("text"))
    return total
