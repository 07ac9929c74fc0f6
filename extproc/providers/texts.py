"""Where each API carries the text that goes to the model (sans-IO).

``prompt_slots`` lists every such string of a request document as a slot, a
(container, key) pair with ``container[key]`` a ``str``, so a stage can read
the texts and write replacements in place: JSON structure, member names and
non-text fields stay as they are. What is text, per API:

- OpenAI chat: ``messages[].content`` (a string, or parts with ``text``), the
  arguments of ``tool_calls`` and of the legacy ``function_call`` (JSON text);
  tool results are ``role: tool`` messages, so their content is covered.
- OpenAI completions: ``prompt`` (a string or a list of strings; token arrays
  are not text). Embeddings: ``input`` likewise.
- OpenAI Responses: ``instructions``; ``input`` as a string or items: a
  message's ``content`` (string or parts with ``text``), a function call's
  ``arguments``, a tool result's ``output`` (string or parts).
- Anthropic messages: ``system`` (string or text blocks); ``messages[].content``
  as a string or blocks: ``text``, every string inside a ``tool_use``'s
  ``input``, a ``tool_result``'s ``content`` (string or text blocks).
  ``thinking`` blocks are left alone: their signature covers the text.
- Gemini: ``contents[].parts[]`` and ``systemInstruction`` (or
  ``system_instruction``) parts: ``text``, and every string inside a
  ``functionCall``'s ``args`` or a ``functionResponse``'s ``response``.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..kinds import Api

Slot = tuple[Any, Any]  # (dict or list, key or index): container[key] is a str


def prompt_slots(api: Api, doc: dict[str, Any]) -> list[Slot]:
    """Every string of ``doc`` that the model reads as text, in document order."""
    slots: list[Slot] = []
    if api == "chat":
        for message in _dicts(doc.get("messages")):
            _content(message, "content", slots)
            for call in _dicts(message.get("tool_calls")):
                _string(call.get("function"), "arguments", slots)
            _string(message.get("function_call"), "arguments", slots)
    elif api in ("completions", "embeddings"):
        _strings(doc, "prompt" if api == "completions" else "input", slots)
    elif api == "responses":
        _string(doc, "instructions", slots)
        if isinstance(doc.get("input"), str):
            slots.append((doc, "input"))
        for item in _dicts(doc.get("input")):
            _content(item, "content", slots)
            _string(item, "arguments", slots)
            _content(item, "output", slots)
    elif api == "messages":
        _content(doc, "system", slots)
        for message in _dicts(doc.get("messages")):
            if isinstance(message.get("content"), str):
                slots.append((message, "content"))
            for block in _dicts(message.get("content")):
                kind = block.get("type")
                if kind == "text":
                    _string(block, "text", slots)
                elif kind == "tool_use":
                    _nested(block, "input", slots)
                elif kind == "tool_result":
                    _content(block, "content", slots)
    elif api == "generate_content":
        instruction = doc.get("systemInstruction", doc.get("system_instruction"))
        contents = [instruction, *_dicts(doc.get("contents"))]
        for content in contents:
            for part in _dicts(content.get("parts") if isinstance(content, dict) else None):
                _string(part, "text", slots)
                for name in ("functionCall", "function_call"):
                    _nested(part.get(name), "args", slots)
                for name in ("functionResponse", "function_response"):
                    _nested(part.get(name), "response", slots)
    return slots


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _string(container: Any, key: str, slots: list[Slot]) -> None:
    if isinstance(container, dict) and isinstance(container.get(key), str):
        slots.append((container, key))


def _strings(container: dict[str, Any], key: str, slots: list[Slot]) -> None:
    """A string, or a list whose strings are each a text."""
    value = container.get(key)
    if isinstance(value, str):
        slots.append((container, key))
    elif isinstance(value, list):
        slots.extend((value, i) for i, v in enumerate(value) if isinstance(v, str))


def _content(container: dict[str, Any], key: str, slots: list[Slot]) -> None:
    """A string, or parts (blocks) whose ``text`` is a string."""
    value = container.get(key)
    if isinstance(value, str):
        slots.append((container, key))
    for part in _dicts(value):
        _string(part, "text", slots)


def _nested(container: Any, key: str, slots: list[Slot]) -> None:
    """Every string value (not member names) inside ``container[key]``."""
    if not isinstance(container, dict) or key not in container:
        return
    stack: list[Slot] = [(container, key)]  # no recursion: any depth orjson reads
    while stack:
        parent, at = stack.pop()
        value = parent[at]
        if isinstance(value, str):
            slots.append((parent, at))
        elif isinstance(value, dict):
            stack.extend((value, k) for k in reversed(list(value)))
        elif isinstance(value, list):
            stack.extend((value, i) for i in reversed(range(len(value))))


# ---- answers ----------------------------------------------------------------
# The text an answer carries, where the model wrote it: for a JSON answer the
# whole texts (answer_slots); for an SSE answer, per event, the pieces of each
# text stream (a choice, a content block) and where a stream ends (stream_event).


def answer_slots(api: Api, doc: Any) -> list[Slot]:
    """Every text the model wrote in a JSON answer (a Gemini stream without SSE is
    a JSON array of chunks), with tool-call arguments: a tool gets what the model
    wrote, so a placeholder put back there reaches the tool as the original."""
    slots: list[Slot] = []
    for item in doc if isinstance(doc, list) else [doc]:
        if not isinstance(item, dict):
            continue
        if api in ("chat", "completions"):
            for choice in _dicts(item.get("choices")):
                _string(choice, "text", slots)
                message = choice.get("message")
                if isinstance(message, dict):
                    _string(message, "content", slots)
                    for call in _dicts(message.get("tool_calls")):
                        _string(call.get("function"), "arguments", slots)
        elif api == "responses":
            for output in _dicts(item.get("output")):
                _content(output, "content", slots)
                _string(output, "arguments", slots)
        elif api == "messages":
            for block in _dicts(item.get("content")):
                if block.get("type") == "text":
                    _string(block, "text", slots)
                elif block.get("type") == "tool_use":
                    _nested(block, "input", slots)
        elif api == "generate_content":
            for candidate in _dicts(item.get("candidates")):
                _parts(candidate, slots)
    return slots


def _parts(candidate: dict[str, Any], slots: list[Slot]) -> None:
    content = candidate.get("content")
    for part in _dicts(content.get("parts") if isinstance(content, dict) else None):
        _string(part, "text", slots)
        for name in ("functionCall", "function_call"):
            _nested(part.get(name), "args", slots)


Stream = tuple[Any, ...]  # one text stream of an SSE answer: a choice, a content block


class StreamEvent:
    """What one SSE event carries of the answer's text.

    ``pieces``: (slot, stream) for each text in it, stream None for a whole text
    (a "done" event repeating what was streamed). ``ends``: the streams that end
    at this event; text held back of such a stream goes into ``carrier`` (a slot
    of this event, made if need be) or, where the event has none, into a new
    event made by ``text_event``, written before this one.
    """

    __slots__ = ("ends", "pieces")

    def __init__(self) -> None:
        self.pieces: list[tuple[Slot, Stream | None]] = []
        self.ends: list[Stream] = []


def stream_event(api: Api, kind: str, data: dict[str, Any]) -> StreamEvent:
    found = StreamEvent()
    pieces, ends = found.pieces, found.ends
    stream: Stream
    if api in ("chat", "completions"):
        for choice in _dicts(data.get("choices")):
            stream = ("choice", choice.get("index", 0))
            if isinstance(choice.get("text"), str):
                pieces.append(((choice, "text"), stream))
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                pieces.append(((delta, "content"), stream))
            if choice.get("finish_reason") is not None:
                ends.append(stream)
    elif api == "messages":
        stream = ("block", data.get("index", 0))
        delta = data.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict):
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                pieces.append(((delta, "text"), stream))
        elif kind == "content_block_stop":
            ends.append(stream)
    elif api == "responses":
        stream = ("part", data.get("output_index", 0), data.get("content_index", 0))
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            pieces.append(((data, "delta"), stream))
        elif kind == "response.output_text.done":
            ends.append(stream)
            if isinstance(data.get("text"), str):
                pieces.append(((data, "text"), None))
        elif kind == "response.content_part.done" and isinstance(data.get("part"), dict):
            pieces.extend(((c, k), None) for c, k in _slot_list(data["part"], "text"))
        elif kind == "response.output_item.done" and isinstance(data.get("item"), dict):
            pieces.extend((s, None) for s in answer_slots(api, {"output": [data["item"]]}))
        elif isinstance(data.get("response"), dict):  # created, completed, incomplete...
            pieces.extend((s, None) for s in answer_slots(api, data["response"]))
    elif api == "generate_content":
        for candidate in _dicts(data.get("candidates")):
            stream = ("candidate", candidate.get("index", 0))
            content = candidate.get("content")
            for part in _dicts(content.get("parts") if isinstance(content, dict) else None):
                if isinstance(part.get("text"), str):
                    pieces.append(((part, "text"), stream))
            if candidate.get("finishReason") is not None:
                ends.append(stream)
    return found


def _slot_list(container: dict[str, Any], key: str) -> list[Slot]:
    slots: list[Slot] = []
    _string(container, key, slots)
    return slots


def carrier(api: Api, data: dict[str, Any], stream: Stream) -> Slot | None:
    """Where an event that ends ``stream`` can carry text held back of it (made
    if missing), or None when a new event must carry it (see ``new_piece``)."""
    if api in ("chat", "completions"):
        for choice in _dicts(data.get("choices")):
            if ("choice", choice.get("index", 0)) == stream:
                if api == "completions":
                    return (choice, "text")
                delta = choice.setdefault("delta", {})
                return (delta, "content") if isinstance(delta, dict) else None
    if api == "generate_content":
        for candidate in _dicts(data.get("candidates")):
            if ("candidate", candidate.get("index", 0)) == stream:
                content = candidate.setdefault("content", {"role": "model"})
                parts = content.setdefault("parts", []) if isinstance(content, dict) else None
                if isinstance(parts, list):
                    parts.append({"text": ""})
                    return (parts[-1], "text")
    return None


def text_event(api: Api, data: dict[str, Any], stream: Stream, text: str) -> tuple[str, str]:
    """A text delta event of ``stream`` (event type, JSON data), for text held back
    when the event that ends the stream cannot carry it."""
    new: dict[str, Any]
    kind = "message"
    if api == "messages":
        kind = "content_block_delta"
        new = {"type": kind, "index": stream[1], "delta": {"type": "text_delta", "text": text}}
    elif api == "responses":
        kind = "response.output_text.delta"
        fields = ("item_id", "output_index", "content_index", "sequence_number")
        new = {"type": kind, **{k: data[k] for k in fields if k in data}, "delta": text}
    elif api == "generate_content":
        content = {"role": "model", "parts": [{"text": text}]}
        new = {"candidates": [{"content": content, "index": stream[1]}]}
    else:
        new = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
        choice: dict[str, Any] = {"index": stream[1], "finish_reason": None}
        choice |= {"text": text} if api == "completions" else {"delta": {"content": text}}
        new["choices"] = [choice]
    return kind, orjson.dumps(new).decode()
