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
