"""Error bodies in each provider's own shape, so every SDK raises its own exception
with the message (sans-IO; the codec and the Envoy renderer both use this).

- OpenAI (and Azure, vLLM...): ``{"error": {"message", "type", "code", "param"}}``
- Anthropic: ``{"type": "error", "error": {"type", "message"}}``
- Google (Gemini): ``{"error": {"code", "message", "status", "details": [ErrorInfo]}}``
"""

from __future__ import annotations

from typing import Any

from .kinds import Dialect

_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
# google.rpc.Code names, as Google APIs put them in error.status.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_document(
    dialect: Dialect, status: int, type_: str, code: str, message: str
) -> dict[str, Any]:
    """``type_`` is OpenAI's error type; ``code`` Tollway's snake_case reason."""
    if dialect == "anthropic":
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPE.get(status, fallback)
        return {"type": "error", "error": {"type": kind, "message": message}}
    if dialect == "gemini":
        fallback = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
        return {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, fallback),
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": code.upper(),
                        "domain": "tollway",
                    }
                ],
            }
        }
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}
