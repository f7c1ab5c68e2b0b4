"""Which LLM API a request speaks, and one uniform view of its prompt parts.

Each shape turns a parsed body into `TextSlot`s (every prompt string a rule may read, with its JSON path
and its scope: ``system`` for system-position text, else the message role) and `Parts` (what the
fingerprint hashes: system texts, tools, the remaining messages, render-affecting parameters).
`detect` returns None for anything it does not recognise; the caller then forwards the bytes untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from enum import StrEnum
from typing import Any

from stableprefix.core.jsonedit import JsonPath


class Api(StrEnum):
    ANTHROPIC = "anthropic-messages"
    ANTHROPIC_COUNT = "anthropic-count-tokens"
    OPENAI_CHAT = "openai-chat"
    OPENAI_RESPONSES = "openai-responses"
    OLLAMA_CHAT = "ollama-chat"
    OLLAMA_GENERATE = "ollama-generate"


class ShapeError(ValueError):
    """The path names a known API but the body does not have its shape."""


@dataclass(frozen=True, slots=True)
class TextSlot:
    """One prompt string: where it is, what it says, and what may be removed if it becomes empty."""

    path: JsonPath
    text: str
    scope: str  # "system" for system position, else the message role: "user", "assistant", "tool"
    block: JsonPath | None  # the block, message or field that holds only this text, or None
    lead: bool = False  # the first text of a system-position container (where a glued header sits)


@dataclass(frozen=True, slots=True)
class Parts:
    """What the fingerprint hashes, in render order."""

    system: list[str]
    tools: list[Any]
    tool_names: list[str]
    messages: list[Any]
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Shape:
    api: Api
    body: dict[str, Any]
    slots: list[TextSlot] = field(default_factory=list)


SYSTEM_ROLES = frozenset({"system", "developer"})


def _is_system(role: Any) -> bool:
    return isinstance(role, str) and role in SYSTEM_ROLES  # a list or object role is no role


_PARAMS: dict[Api, tuple[str, ...]] = {
    Api.ANTHROPIC: ("model", "thinking", "tool_choice", "output_config"),
    Api.ANTHROPIC_COUNT: ("model", "thinking", "tool_choice", "output_config"),
    Api.OPENAI_CHAT: ("model", "tool_choice", "reasoning_effort", "response_format", "chat_template_kwargs"),
    Api.OPENAI_RESPONSES: ("model", "tool_choice", "reasoning", "text"),
    Api.OLLAMA_CHAT: ("model", "think", "format", "template", "raw"),
    Api.OLLAMA_GENERATE: ("model", "think", "format", "template", "raw"),
}


#: path suffix -> API (query strings ignored; count_tokens is tried before messages by length)
_PATH_SUFFIXES = (
    ("/v1/messages/count_tokens", Api.ANTHROPIC_COUNT),
    ("/v1/messages", Api.ANTHROPIC),
    ("/chat/completions", Api.OPENAI_CHAT),
    ("/v1/responses", Api.OPENAI_RESPONSES),
    ("/api/chat", Api.OLLAMA_CHAT),
    ("/api/generate", Api.OLLAMA_GENERATE),
)


def api_for_path(path: str) -> Api | None:
    """The API a request path names (query string ignored), or None."""
    p = path.split("?", 1)[0].rstrip("/")
    return next((api for suffix, api in _PATH_SUFFIXES if p.endswith(suffix)), None)


def detect(
    path: str, body: dict[str, Any], scopes: frozenset[str] | None = None, only: Sequence[int] | None = None
) -> Shape | None:
    """The shape of a parsed request body; None for an unknown path, ShapeError for a known path with a bad
    body. With `scopes`, only messages of those scopes (roles, "system") get text slots. With `only`, only
    those indices of the messages (or Responses items) are read: the caller vouches that every other one
    is an object whose role is a string outside `scopes`, "system" and "developer" (the sparse path)."""
    api = api_for_path(path)
    if api is None:
        return None
    return Shape(api, body, list(_SLOTS[api](body, scopes, only)))


def _indexed(items: list[Any], only: Sequence[int] | None) -> Iterator[tuple[int, Any]]:
    return enumerate(items) if only is None else ((k, items[k]) for k in only)


def _req(cond: bool, what: str) -> None:
    if not cond:
        raise ShapeError(what)


# --- text slots -------------------------------------------------------------------------------------


def _wanted(scope: str, scopes: frozenset[str] | None) -> bool:
    """Whether a message of `scope` may hold a slot in `scopes` (None: all). Tool results sit in user
    messages (Anthropic), so wanting "tool" means walking every message."""
    return scopes is None or scope in scopes or "tool" in scopes


def _content_slots(content: Any, base: JsonPath, scope: str, message: JsonPath) -> Iterator[TextSlot]:
    """Texts of a message `content` (string or blocks). A text alone in its message is removed with it."""
    if isinstance(content, str):
        yield TextSlot(base, content, scope, message, lead=scope == "system")
        return
    if not isinstance(content, list):
        return
    first = True
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        text = block.get("text")
        if kind in ("text", "input_text", "output_text") and isinstance(text, str):
            unit = message if len(content) == 1 else (*base, j)
            yield TextSlot((*base, j, "text"), text, scope, unit, lead=first and scope == "system")
            first = False
        elif kind == "tool_result":
            yield from _content_slots(block.get("content"), (*base, j, "content"), "tool", (*base, j))


def _anthropic_slots(
    body: dict[str, Any], scopes: frozenset[str] | None, only: Sequence[int] | None = None
) -> Iterator[TextSlot]:
    messages: Any = body.get("messages")
    _req(isinstance(messages, list), "messages is not a list")
    system = body.get("system")
    if isinstance(system, str):
        yield TextSlot(("system",), system, "system", ("system",), lead=True)
    elif isinstance(system, list):
        first = True
        for i, block in enumerate(system):
            _req(isinstance(block, dict), f"system[{i}] is not an object")
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                yield TextSlot(("system", i, "text"), block["text"], "system", ("system", i), lead=first)
                first = False
    else:
        _req(system is None, "system is neither a string nor a list")
    for k, m in _indexed(messages, only):
        _req(isinstance(m, dict), f"messages[{k}] is not an object")
        role = m.get("role")
        scope = "system" if role == "system" else str(role)
        if _wanted(scope, scopes):
            yield from _content_slots(m.get("content"), ("messages", k, "content"), scope, ("messages", k))


def _openai_chat_slots(
    body: dict[str, Any], scopes: frozenset[str] | None, only: Sequence[int] | None = None
) -> Iterator[TextSlot]:
    messages: Any = body.get("messages")
    _req(isinstance(messages, list), "messages is not a list")
    for k, m in _indexed(messages, only):
        _req(isinstance(m, dict), f"messages[{k}] is not an object")
        role = m.get("role")
        scope = "system" if _is_system(role) else str(role)
        if _wanted(scope, scopes):
            yield from _content_slots(m.get("content"), ("messages", k, "content"), scope, ("messages", k))


def _openai_responses_slots(
    body: dict[str, Any], scopes: frozenset[str] | None, only: Sequence[int] | None = None
) -> Iterator[TextSlot]:
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield TextSlot(("instructions",), instructions, "system", ("instructions",), lead=True)
    items: Any = body.get("input")
    if isinstance(items, str):
        yield TextSlot(("input",), items, "user", None)
        return
    _req(items is None or isinstance(items, list), "input is neither a string nor a list")
    for k, item in _indexed(items if isinstance(items, list) else [], only):
        _req(isinstance(item, dict), f"input[{k}] is not an object")
        role = item.get("role")
        if role is not None:
            scope = "system" if _is_system(role) else str(role)
            if _wanted(scope, scopes):
                yield from _content_slots(item.get("content"), ("input", k, "content"), scope, ("input", k))
        elif item.get("type") == "function_call_output" and isinstance(item.get("output"), str):
            yield TextSlot(("input", k, "output"), item["output"], "tool", None)


def _ollama_generate_slots(
    body: dict[str, Any], scopes: frozenset[str] | None, only: Sequence[int] | None = None
) -> Iterator[TextSlot]:
    if isinstance(body.get("system"), str):
        yield TextSlot(("system",), body["system"], "system", ("system",), lead=True)
    if isinstance(body.get("prompt"), str):
        yield TextSlot(("prompt",), body["prompt"], "user", None)


_SLOTS = {
    Api.ANTHROPIC: _anthropic_slots,
    Api.ANTHROPIC_COUNT: _anthropic_slots,
    Api.OPENAI_CHAT: _openai_chat_slots,
    Api.OPENAI_RESPONSES: _openai_responses_slots,
    Api.OLLAMA_CHAT: _openai_chat_slots,
    Api.OLLAMA_GENERATE: _ollama_generate_slots,
}


# --- parts for the fingerprint ---------------------------------------------------------------------


def tool_name(tool: Any) -> str:
    """A tool's name in any of the shapes (Anthropic/Responses `name`, Chat `function.name`)."""
    if not isinstance(tool, dict):
        return ""
    name = tool.get("name")
    if name is None and isinstance(tool.get("function"), dict):
        name = tool["function"].get("name")
    return name if isinstance(name, str) else ""


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


def parts(api: Api, body: dict[str, Any]) -> Parts:
    """The system texts, tools, remaining messages and parameters of a (normalised) body, in render order.

    Leading system/developer messages count as system; inline system messages later on stay in place.
    """
    system: list[str] = []
    messages: list[Any]
    if api in (Api.ANTHROPIC, Api.ANTHROPIC_COUNT):
        system = _texts(body.get("system"))
        messages = list(body.get("messages") or [])
    elif api is Api.OPENAI_RESPONSES:
        if isinstance(body.get("instructions"), str):
            system.append(body["instructions"])
        items = body.get("input")
        messages = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
    elif api is Api.OLLAMA_GENERATE:
        system = _texts(body.get("system"))
        messages = [{"role": "user", "content": body.get("prompt", "")}]
    else:
        messages = list(body.get("messages") or [])
    if api in (Api.OPENAI_CHAT, Api.OLLAMA_CHAT, Api.OPENAI_RESPONSES):
        while messages and isinstance(messages[0], dict) and _is_system(messages[0].get("role")):
            system.extend(_texts(messages.pop(0).get("content")))
    tools = body.get("tools")
    tools = tools if isinstance(tools, list) else []
    params = {k: body[k] for k in _PARAMS[api] if k in body}
    return Parts(system, tools, [tool_name(t) for t in tools], messages, params)
