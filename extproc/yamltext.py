"""YAML parse errors with the line and column (PyYAML itself says ``<unicode string>``)."""

from __future__ import annotations

import yaml


def describe(error: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based), or PyYAML's text when it has no position."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = error.problem or "syntax error"
        context = f" ({error.context})" if error.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{context}"
    return str(error)
