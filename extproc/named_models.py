"""Every model a request names, wherever it names it (sans-IO).

A key with a model allowlist may send a request only when every model in it
was positively identified, so this reads what the provider would read: JSON
(any ``"model"`` member at any depth: ``session.model``, ``requests[].params.model``),
multipart and URL-encoded forms (``model`` fields), the query string. A body it
cannot read is an error, never "no model".
"""

from __future__ import annotations

import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

from .exchange import BodyError

_MULTIPART_MODEL_FIELD = re.compile(rb'name\s*=\s*"?model"?[\s;"]', re.IGNORECASE)


def in_query(query: str) -> list[str]:
    if "model" not in query:
        return []
    return [value for name, value in parse_qsl(query, keep_blank_values=True) if name == "model"]


def in_json(doc: Any) -> list[object]:
    """The value of every ``model`` member, at any depth (no recursion: any nesting)."""
    found: list[object] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "model":
                    found.append(value)
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, dict | list))
    return found


# A JSON escape of a letter of "model" (\u006d...): the bytes alone then cannot tell.
_ESCAPED_LETTER = re.compile(rb"\\u00(?:6[4-5cCdDfF])")


def in_json_body(body: bytes, doc: Any) -> list[object]:
    """Every ``model`` member of the JSON ``body`` (``doc`` is it parsed).

    A parsed document keeps one value per repeated name, but another parser may
    read the first where orjson kept the last: when the bytes hold more
    ``"model"`` than the document shows, or escapes that may spell it, every
    member is read again, repeats included (slow, and rare).
    """
    seen = body.count(b'"model"')
    escaped = _ESCAPED_LETTER.search(body) is not None
    if not seen and not escaped:
        return []
    found = in_json(doc)
    if len(found) < seen or escaped:
        found = _every_model_member(body)
    return found


def _every_model_member(body: bytes) -> list[object]:
    found: list[object] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        found.extend(value for name, value in items if name == "model")
        return {}

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        raise BodyError("the request body is not valid JSON") from None
    return found


def in_form(body: bytes) -> list[object]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("the form body is not UTF-8") from None
    return [value for name, value in parse_qsl(text, keep_blank_values=True) if name == "model"]


def in_multipart(content_type: str, body: bytes) -> list[object]:
    """``model`` fields of a multipart/form-data body (uploads: audio, images)."""
    if "boundary=" not in content_type.lower():
        raise BodyError("the multipart body has no boundary")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise BodyError("the multipart body could not be read")
    found: list[object] = []
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") != "model":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise BodyError("a model field could not be read")
        found.append(payload.decode("utf-8", "replace").strip())
    # Another parser could see a field this one missed: then nothing is certain.
    if len(_MULTIPART_MODEL_FIELD.findall(body)) != len(found):
        raise BodyError("the multipart body names a model ambiguously")
    return found


def in_other(body: bytes) -> list[object]:
    """A body of another type: fine only if nothing in it could name a model."""
    if b"model" in body.lower():
        raise BodyError("a body of this content type cannot be checked for models")
    return []
