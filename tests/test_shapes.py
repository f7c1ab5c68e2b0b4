from __future__ import annotations

from typing import Any

import pytest

from stableprefix.core import shapes
from stableprefix.core.shapes import Api
from stableprefix.core.shapes import ShapeError

H = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"


def slots(path: str, body: dict[str, Any]) -> list[tuple[tuple, str, Any, bool]]:
    shape = shapes.detect(path, body)
    assert shape is not None
    return [(s.path, s.scope, s.block, s.lead) for s in shape.slots]


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/messages", Api.ANTHROPIC),
        ("/v1/messages?beta=true", Api.ANTHROPIC),
        ("/anthropic/v1/messages/", Api.ANTHROPIC),
        ("/v1/messages/count_tokens?beta=true", Api.ANTHROPIC_COUNT),
        ("/v1/chat/completions", Api.OPENAI_CHAT),
        ("/api/v1/chat/completions", Api.OPENAI_CHAT),
        ("/v1/responses", Api.OPENAI_RESPONSES),
        ("/api/chat", Api.OLLAMA_CHAT),
        ("/api/generate", Api.OLLAMA_GENERATE),
        ("/v1/models", None),
        ("/v1/messages/batches", None),
        ("/v1/messagesX", None),
    ],
)
def test_api_for_path(path: str, api: Api | None) -> None:
    assert shapes.api_for_path(path) == api


def test_anthropic_slots() -> None:
    body = {
        "system": [{"type": "text", "text": H}, {"type": "image"}, {"type": "text", "text": "id"}],
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "a"}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "content": [{"type": "text", "text": "r"}]}],
            },
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
        ],
    }
    assert slots("/v1/messages", body) == [
        (("system", 0, "text"), "system", ("system", 0), True),
        (("system", 2, "text"), "system", ("system", 2), False),
        (("messages", 0, "content"), "user", ("messages", 0), False),
        (("messages", 1, "content", 1, "text"), "assistant", ("messages", 1, "content", 1), False),
        (("messages", 2, "content", 0, "content", 0, "text"), "tool", ("messages", 2, "content", 0), False),
        (("messages", 3, "content", 0, "text"), "system", ("messages", 3), True),
    ]


def test_openai_chat_system_and_developer_with_parts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": H}, {"type": "text", "text": "id"}]},
            {"role": "developer", "content": "dev"},
            {"role": "user", "content": "u"},
            {"role": "tool", "content": "t", "tool_call_id": "1"},
        ]
    }
    assert slots("/v1/chat/completions", body) == [
        (("messages", 0, "content", 0, "text"), "system", ("messages", 0, "content", 0), True),
        (("messages", 0, "content", 1, "text"), "system", ("messages", 0, "content", 1), False),
        (("messages", 1, "content"), "system", ("messages", 1), True),
        (("messages", 2, "content"), "user", ("messages", 2), False),
        (("messages", 3, "content"), "tool", ("messages", 3), False),
    ]


def test_openai_responses_instructions_and_items() -> None:
    body = {
        "instructions": H + "\n\nYou are",
        "input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "d"}]},
            {"role": "user", "content": "u"},
            {"type": "function_call_output", "call_id": "c", "output": "o"},
        ],
    }
    assert slots("/v1/responses", body) == [
        (("instructions",), "system", ("instructions",), True),
        (("input", 0, "content", 0, "text"), "system", ("input", 0), True),
        (("input", 1, "content"), "user", ("input", 1), False),
        (("input", 2, "output"), "tool", None, False),
    ]
    assert slots("/v1/responses", {"input": "just text"}) == [(("input",), "user", None, False)]


def test_ollama_shapes() -> None:
    chat = {"messages": [{"role": "system", "content": H}, {"role": "user", "content": "u"}]}
    assert slots("/api/chat", chat)[0] == (("messages", 0, "content"), "system", ("messages", 0), True)
    gen = {"system": H, "prompt": "p"}
    assert slots("/api/generate", gen) == [
        (("system",), "system", ("system",), True),
        (("prompt",), "user", None, False),
    ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"messages": {}}),
        ("/v1/messages", {}),
        ("/v1/messages", {"messages": [], "system": 1}),
        ("/v1/messages", {"messages": [], "system": [1]}),
        ("/v1/messages", {"messages": ["x"]}),
        ("/v1/chat/completions", {"messages": None}),
        ("/v1/responses", {"input": 5}),
        ("/v1/responses", {"input": [3]}),
    ],
)
def test_bad_shapes_raise(path: str, body: dict[str, Any]) -> None:
    with pytest.raises(ShapeError):
        shapes.detect(path, body)


def test_parts_render_order_and_params() -> None:
    body = {
        "model": "m",
        "temperature": 1,
        "messages": [
            {"role": "system", "content": "s1"},
            {"role": "developer", "content": [{"type": "text", "text": "s2"}]},
            {"role": "user", "content": "u"},
            {"role": "system", "content": "late"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
    }
    p = shapes.parts(Api.OPENAI_CHAT, body)
    assert p.system == ["s1", "s2"]
    assert [m["content"] for m in p.messages] == ["u", "late"]
    assert p.tool_names == ["f"] and p.params == {"model": "m", "tool_choice": "auto"}
    r = shapes.parts(Api.OPENAI_RESPONSES, {"instructions": "i", "input": "x", "model": "m"})
    assert r.system == ["i"] and r.messages == [{"role": "user", "content": "x"}]
    g = shapes.parts(Api.OLLAMA_GENERATE, {"system": "s", "prompt": "p"})
    assert g.system == ["s"] and g.messages == [{"role": "user", "content": "p"}]
    a = shapes.parts(Api.ANTHROPIC, {"system": "s", "messages": [], "tools": [{"name": "Bash"}]})
    assert a.system == ["s"] and a.tool_names == ["Bash"]


def test_tool_name() -> None:
    assert shapes.tool_name({"name": "a"}) == "a"
    assert shapes.tool_name({"function": {"name": "b"}}) == "b"
    assert shapes.tool_name("x") == "" and shapes.tool_name({"name": 3}) == ""


def test_scopes_limit_the_slots_to_what_rules_read() -> None:
    body = {
        "system": "s",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "tool_result", "content": "t"}, {"type": "text", "text": "u"}],
            },
            {"role": "assistant", "content": "a"},
            {"role": "system", "content": "inline"},
        ],
    }

    def scopes_of(wanted: frozenset[str] | None) -> list[str]:
        shape = shapes.detect("/v1/messages", body, wanted)
        assert shape is not None
        return [s.scope for s in shape.slots]

    assert scopes_of(None) == ["system", "tool", "user", "assistant", "system"]
    assert scopes_of(frozenset({"system"})) == ["system", "system"]
    assert scopes_of(frozenset({"system", "assistant"})) == ["system", "assistant", "system"]
    assert scopes_of(frozenset({"tool"})) == scopes_of(None)  # tool results sit inside user messages
    with pytest.raises(ShapeError):  # bad shapes are still refused, whatever is read
        shapes.detect("/v1/messages", {"messages": ["x"]}, frozenset({"system"}))


@pytest.mark.parametrize("role", [["system"], {"r": "system"}, 3, None])
def test_a_role_that_is_not_a_string_is_no_system_role(role: Any) -> None:
    """A list or object role (a broken client) used to raise TypeError (unhashable) in `parts`."""
    body = {"model": "m", "messages": [{"role": role, "content": "hi"}, {"role": "user", "content": "x"}]}
    for api in (Api.OPENAI_CHAT, Api.OLLAMA_CHAT):
        p = shapes.parts(api, body)
        assert p.system == [] and p.messages == body["messages"]
