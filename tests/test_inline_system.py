"""The opt-in built-in rule ``inline_system`` (issue 12, item 7): the first turn's inline ``role: "system"``
messages move to the end of the Anthropic ``system`` prompt, text byte-identical and in order, through
jsonedit (every other byte as sent); idempotent, append-only across a conversation's turns, and never loses
text. Expected bodies are written out by hand."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import io

from stableprefix.core import pipeline
from stableprefix.core import rules as rl
from stableprefix.core import shapes
from stableprefix.core.analyzer import Analyzer

REAL = Path(__file__).parent / "fixtures" / "real" / "cc_2_1_332_two_conversations.mitm"
ON = pipeline.Settings(rules=tuple(rl.switch(rl.builtin_rules(), on=["inline_system"])), passthrough=())
H = "x-anthropic-billing-header: cc_version=2.1.332.1da; cc_entrypoint=sdk-cli;"


def forward(raw: bytes, settings: pipeline.Settings = ON, path: str = "/v1/messages") -> bytes | None:
    result = pipeline.process("POST", "127.0.0.1", path, raw, settings)
    assert result is not None and result.warning is None, result and result.warning
    return result.forward


def test_off_by_default() -> None:
    rule = next(r for r in rl.builtin_rules() if r.name == "inline_system")
    assert (rule.enabled, rule.action) == (False, "move")
    raw = b'{"system":"S","messages":[{"role":"user","content":"u"},{"role":"system","content":"E"}]}'
    assert forward(raw, pipeline.Settings(passthrough=())) is None


def test_moves_the_environment_message_and_keeps_every_other_byte() -> None:
    raw = (
        b'{"model":"m", "messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},'
        b'{"role":"system","content":[{"type":"text","text":"# Env\\nA\\u00e9"}]}],'
        b'  "system":[{"type":"text","text":"You are"},{"type":"text","text":"Rules.","cache_control":{"type":"ephemeral"}}],'
        b'"max_tokens": 8}'
    )
    expected = (
        b'{"model":"m", "messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'  "system":[{"type":"text","text":"You are"},{"type":"text","text":"Rules.","cache_control":{"type":"ephemeral"}},'
        b'{"type":"text","text":"# Env\\nA\xc3\xa9"}],'
        b'"max_tokens": 8}'
    )
    assert forward(raw) == expected


def test_string_forms_and_several_messages_in_order() -> None:
    body = {
        "system": "S",
        "messages": [
            {"role": "system", "content": "A"},
            {"role": "user", "content": "u"},
            {"role": "system", "content": [{"type": "text", "text": "B1"}, {"type": "text", "text": "B2"}]},
        ],
    }
    out = json.loads(forward(json.dumps(body).encode()) or b"")
    assert out == {
        "system": [{"type": "text", "text": "S"}, {"type": "text", "text": "A"}, {"type": "text", "text": "B1"},
                   {"type": "text", "text": "B2"}],
        "messages": [{"role": "user", "content": "u"}],
    }  # fmt: skip


def test_only_the_first_turn_moves_and_a_second_pass_changes_nothing() -> None:
    body = {
        "system": [{"type": "text", "text": "S"}],
        "messages": [
            {"role": "user", "content": "u1"},
            {"role": "system", "content": "E"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "system", "content": "later"},
        ],
    }
    once = forward(json.dumps(body).encode())
    assert once is not None
    assert json.loads(once) == {
        "system": [{"type": "text", "text": "S"}, {"type": "text", "text": "E"}],
        "messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "system", "content": "later"},
        ],
    }
    assert forward(once) is None


def test_left_alone_when_it_cannot_move_without_loss() -> None:
    cases = [
        {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "E"}]},  # no system
        {"system": "S", "messages": [{"role": "system", "content": "E"}]},  # nothing would be left
        {"system": "S", "messages": [{"role": "system", "content": "E"}, {"role": "assistant", "content": "a"}]},
        {"system": "S", "messages": [{"role": "user", "content": "u"},  # an image: not text
                                     {"role": "system", "content": [{"type": "image", "source": {}}]}]},
        {"system": "S", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]  # fmt: skip
    for body in cases:
        assert forward(json.dumps(body).encode()) is None, body
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "E"}]}
    assert forward(json.dumps(chat).encode(), path="/v1/chat/completions") is None


def test_moves_the_text_as_the_other_rules_left_it() -> None:
    settings = pipeline.Settings(
        rules=tuple(rl.switch(rl.builtin_rules(), on=["inline_system", "env_block"])), passthrough=()
    )
    body = {
        "system": [{"type": "text", "text": H}, {"type": "text", "text": "S"}],
        "messages": [
            {"role": "user", "content": "u"},
            {
                "role": "system",
                "content": [{"type": "text", "text": "Primary working directory: /tmp/x\nok"}],
            },
        ],
    }
    result = pipeline.process("POST", "h", "/v1/messages", json.dumps(body).encode(), settings)
    assert result is not None and result.forward is not None
    assert json.loads(result.forward) == {
        "system": [{"type": "text", "text": "S"},
                   {"type": "text", "text": "Primary working directory: /workspace\nok"}],
        "messages": [{"role": "user", "content": "u"}],
    }  # fmt: skip
    assert result.record["changed"] == {"billing": 1, "env_block": 1, "inline_system": 1}
    assert result.record["actions"]["inline_system"] == "move"


# --- the real CLI's traffic --------------------------------------------------------------------------------


def _real() -> list[Any]:
    with REAL.open("rb") as fo:
        flows: list[Any] = list(io.FlowReader(fo).stream())
    return [f for f in flows if f.request.method == "POST"]


def test_recorded_conversation_stays_append_only_and_the_new_one_shares_the_environment() -> None:
    flows = _real()
    assert len(flows) == 3  # turn 1, turn 2 (--continue), a new conversation
    sent = [json.loads(f.request.content) for f in flows]
    env = sent[0]["messages"][1]["content"][0]["text"]
    assert env.startswith("# Environment\n") and sent[1]["messages"][1]["content"] == env  # list, then string
    out = [json.loads(forward(f.request.content) or b"") for f in flows]
    t1, t2, new = out
    assert t1["system"][-1] == {"type": "text", "text": env}
    assert [m["role"] for m in t1["messages"]] == ["user"]
    assert [m["role"] for m in t2["messages"]] == ["user", "assistant", "user"]
    assert t2["system"] == t1["system"] and t2["messages"][:1] == t1["messages"]  # append-only
    assert new["system"] == t1["system"]  # the environment block is now in the shared prefix
    assert new["messages"][0] != t1["messages"][0]
    # fingerprints agree: the second turn extends the first
    fps = [pipeline.process("POST", "h", f.request.path, f.request.content, ON) for f in flows[:2]]
    assert fps[0] and fps[1] and fps[0].fingerprint and fps[1].fingerprint
    assert fps[0].record["system_hash"] == fps[1].record["system_hash"]


def test_recorded_bytes_outside_the_edits_are_the_clients() -> None:
    raw = _real()[0].request.content
    fwd = forward(raw)
    assert fwd is not None
    head = raw[: raw.index(b',{"role":"system"')]  # everything up to the moved message is untouched
    assert fwd.startswith(head)
    tail = raw[raw.index(b',"tools":') :]  # and everything after the system prompt
    assert fwd.endswith(tail)


# --- never loses text (property) ---------------------------------------------------------------------------

_text = st.text(max_size=8)
_content = st.one_of(_text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text), max_size=3))
_message = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user", "assistant", "system"]),
                     _content)  # fmt: skip
_system = st.one_of(_text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text), max_size=3))


def _texts(body: dict[str, Any]) -> Counter[str]:
    shape = shapes.detect("/v1/messages", body)
    assert shape is not None
    return Counter(s.text for s in shape.slots if s.text)


def _system_texts(body: dict[str, Any]) -> list[str]:
    system = body["system"]
    return [t for t in ([system] if isinstance(system, str) else [b["text"] for b in system]) if t]


_first_turn = st.lists(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user", "system"]), _content),
    max_size=4,
)


@st.composite
def _conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A first user message, then users and inline system messages (at least one), then any messages."""
    first = [{"role": "user", "content": draw(_content)}]
    turn = [*draw(_first_turn), {"role": "system", "content": draw(_content)}]
    turn = draw(st.permutations(turn))
    later = draw(st.lists(_message, max_size=4))
    if later:
        later[0] = {**later[0], "role": "assistant"}
    return {"system": draw(_system), "messages": first + turn + later}


@given(_conversations())
def test_never_loses_text_and_keeps_the_order(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    once = forward(raw)
    assert once is not None  # there is always an inline system message of the first turn to move
    after = json.loads(once)
    assert _texts(after) == _texts(body)  # every non-empty text is still there, as often
    first = next(
        (k for k, m in enumerate(body["messages"]) if m["role"] == "assistant"), len(body["messages"])
    )
    moved = [m for m in body["messages"][:first] if m["role"] == "system"]
    moved_texts = [t for m in moved for t in ([m["content"]] if isinstance(m["content"], str)
                                               else [b["text"] for b in m["content"]]) if t]  # fmt: skip
    assert _system_texts(after) == _system_texts(body) + moved_texts  # at the end, in order
    kept = [m for k, m in enumerate(body["messages"]) if k >= first or m["role"] != "system"]
    assert after["messages"] == kept
    assert forward(once) is None  # idempotent


def test_the_saving_on_a_new_conversation_is_credited_to_the_rules_that_fired_together() -> None:
    """The real recording's new conversation: with billing alone its saving is billing's; with inline_system
    too the shared prefix grows past the environment message, and the saving is theirs together (the
    billing rule alone did not buy it)."""
    flows = _real()

    def savings(settings: pipeline.Settings) -> dict[str, int]:
        a = Analyzer(settings)
        records = [
            a.request("POST", "h", f.request.path, f.request.content, f.request.headers) for f in flows
        ]
        last = records[-1]
        assert last is not None and last.record["verdict"] == "first"
        return dict(last.record["saved_by"])

    alone = savings(pipeline.Settings())
    both = savings(ON)
    assert list(alone) == ["billing"] and alone["billing"] > 0
    assert list(both) == ["billing+inline_system"] and both["billing+inline_system"] > alone["billing"]
