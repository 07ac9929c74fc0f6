"""Which strings of each API's request reach the model as text (providers/texts.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.kinds import Api
from extproc.providers.texts import prompt_slots

CASES: list[tuple[str, Api, dict[str, Any], list[str]]] = [
    (
        "chat: strings, parts, tool calls and results",
        "chat",
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "S"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "U1"},
                        {"type": "image_url", "image_url": {"url": "https://x/u.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": "A"}'},
                        }
                    ],
                    "function_call": {"name": "g", "arguments": "G"},
                },
                {"role": "tool", "tool_call_id": "c1", "content": "T"},
            ],
            "user": "not-text",
        },
        ["S", "U1", '{"a": "A"}', "G", "T"],
    ),
    ("completions: one prompt", "completions", {"prompt": "P"}, ["P"]),
    (
        "completions: prompts and token arrays",
        "completions",
        {"prompt": ["P1", [1, 2], "P2"]},
        ["P1", "P2"],
    ),
    ("embeddings", "embeddings", {"input": ["E1", "E2"], "model": "m"}, ["E1", "E2"]),
    ("responses: a string", "responses", {"instructions": "I", "input": "X"}, ["I", "X"]),
    (
        "responses: items",
        "responses",
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "X1"},
                        {"type": "input_image", "image_url": "u"},
                    ],
                },
                {"type": "message", "role": "user", "content": "X2"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "A"},
                {"type": "function_call_output", "call_id": "c", "output": "O"},
                {
                    "type": "function_call_output",
                    "call_id": "d",
                    "output": [{"type": "input_text", "text": "O2"}],
                },
            ]
        },
        ["X1", "X2", "A", "O", "O2"],
    ),
    (
        "anthropic: system blocks, text, tool use and results",
        "messages",
        {
            "system": [{"type": "text", "text": "S"}],
            "messages": [
                {"role": "user", "content": "U"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "kept", "signature": "sig"},
                        {"type": "text", "text": "A"},
                        {
                            "type": "tool_use",
                            "id": "t",
                            "name": "f",
                            "input": {"q": "Q", "deep": [{"x": "D"}, 3]},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": "R"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "u",
                            "content": [{"type": "text", "text": "R2"}],
                        },
                    ],
                },
            ],
        },
        ["S", "U", "A", "Q", "D", "R", "R2"],
    ),
    ("anthropic: a system string", "messages", {"system": "S", "messages": []}, ["S"]),
    (
        "gemini: contents, system instruction, function calls and responses",
        "generate_content",
        {
            "systemInstruction": {"parts": [{"text": "S"}]},
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "U"},
                        {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                    ],
                },
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"q": "Q"}}}]},
                {
                    "role": "user",
                    "parts": [{"functionResponse": {"name": "f", "response": {"r": ["R"]}}}],
                },
            ],
        },
        ["S", "U", "Q", "R"],
    ),
    (
        "gemini: snake case",
        "generate_content",
        {"system_instruction": {"parts": [{"text": "S"}]}, "contents": []},
        ["S"],
    ),
]


@pytest.mark.parametrize(("api", "doc", "texts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_texts_each_api_sends_the_model(
    api: Api, doc: dict[str, Any], texts: list[str]
) -> None:
    assert [container[key] for container, key in prompt_slots(api, doc)] == texts


def test_slots_write_in_place_and_leave_the_rest_alone() -> None:
    doc = CASES[0][2]
    before = copy.deepcopy(doc)
    edited = copy.deepcopy(doc)
    for container, key in prompt_slots("chat", edited):
        container[key] = "[X]"
    assert edited["messages"][1]["content"][1] == before["messages"][1]["content"][1]
    assert edited["messages"][2]["tool_calls"][0]["function"]["name"] == "f"
    assert edited["user"] == "not-text"
    assert [m["content"] for m in edited["messages"] if isinstance(m["content"], str)] == [
        "[X]",
        "[X]",
    ]


@pytest.mark.parametrize(
    "doc",
    [
        {"messages": "not a list"},
        {"messages": [None, 3, "x", {"content": 5}, {"content": [None, {"text": 7}]}]},
        {"messages": [{"tool_calls": "x", "function_call": ["x"]}]},
    ],
)
def test_odd_shapes_give_no_slots_and_no_error(doc: dict[str, Any]) -> None:
    assert prompt_slots("chat", doc) == []


def test_tool_input_nested_deeper_than_recursion_allows_is_still_read() -> None:
    deep: Any = "SECRET"
    for _ in range(5000):
        deep = {"a": deep}
    doc = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": deep}]}]}
    assert [c[k] for c, k in prompt_slots("messages", doc)] == ["SECRET"]
