"""The sparse forwarding path (issue 13): `jsonedit.SparseDocument` validates a whole body with msgspec
(plus a UTF-8 check) without building it, and the pipeline decodes only what the enabled text rules read.
For any body it must either give exactly the bytes the exact path (`Document`: json's parser, every member
decoded) gives, or decline so that the exact path runs. The reference here is written out from the exact
parts (Document.parse, shapes.detect, rules.apply, Document.edited), not from the code under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.core import shapes
from stableprefix.core.jsonedit import Document
from stableprefix.core.jsonedit import SparseDocument
from stableprefix.core.jsonedit import layout_at
from stableprefix.demo import samples
from tests.support.helpers import FIXTURES

HEADER = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"
BILLING = pipeline.Settings()
PIN = pipeline.Settings(rules=tuple(rulelib.builtin_rules("pin")))
TEXT_RULES = pipeline.Settings(  # every built-in text rule (no path or tools rules)
    rules=tuple(
        rulelib.switch(rulelib.builtin_rules(), ["date", "git_status", "env_block"], ["cache_control"])
    )
)
ALL = pipeline.Settings(  # every built-in rule: text, path, tools and move rules
    rules=tuple(rulelib.switch(rulelib.builtin_rules(), rulelib.builtin_names()))
)
USER_RULES = pipeline.Settings(  # rules of a rules file: any role, a tool result, a path into the messages
    rules=(
        rulelib.make_rule({"name": "any", "scope": "messages:*", "match": "Last active:[^\\n]*", "action": "drop"}),
        rulelib.make_rule({"name": "tool", "scope": "messages:tool", "match": "ok", "action": "mask"}),
        rulelib.make_rule({"name": "ids", "scope": "path:messages[*].content[*].tool_use_id", "action": "pin",
                           "value": "t0"}),
        rulelib.make_rule({"name": "sys", "scope": "system", "match": "[0-9]+", "action": "mask"}),
    )
)  # fmt: skip
SETTINGS = (BILLING, PIN, TEXT_RULES, ALL, USER_RULES)


def exact(raw: bytes, settings: pipeline.Settings, path: str = "/v1/messages") -> bytes | None:
    """What the exact path forwards: the edited bytes, or None (the original, with a warning)."""
    try:
        doc = Document.parse(raw)
        shape = shapes.detect(path, doc.value, settings.slot_scopes)
    except (ValueError, RecursionError):
        return None
    assert shape is not None
    outcome = rulelib.apply(shape, settings.rules, pipeline.session_id({}, doc.value), rulelib.StickyMemory())
    return doc.edited(outcome.edits).encode("utf-8") if outcome.edits else None


def forwarded(raw: bytes, settings: pipeline.Settings, path: str = "/v1/messages") -> pipeline.Forward:
    fwd = pipeline.forward("POST", "h", path, raw, settings, {}, rulelib.StickyMemory())
    assert fwd is not None
    return fwd


# --- bodies: Claude-Code-like, with the header where it counts and where it does not -------------------

texts = st.sampled_from(
    ["You are Claude Code.", HEADER, HEADER + "\nYou are Claude Code.", " " + HEADER, "Today's date is 2025-01-02.",
     "OS Version: Linux 6.1", "café ☕ 𝄞", "a\\b\"c\n", "x-anthropic-billing-header", "", "\ud800 lone",
     "SessionStart:resume hook success: ok", "a\n<session-id>s1</session-id>\nLast active: 2025", "cache_control",
     "gitStatus: This is the git status at the start of the conversation.\nM a"]
)  # fmt: skip
blocks = st.builds(lambda t, cc: {"type": "text", "text": t, **({"cache_control": {"type": "ephemeral"}} if cc else {})},
                   texts, st.booleans())  # fmt: skip
system = st.none() | texts | st.lists(blocks, max_size=3)
roles = st.sampled_from(["user", "assistant", "system", "developer", "tool"])
content = texts | st.lists(
    blocks
    | st.just({"type": "tool_result", "tool_use_id": "t", "content": "ok"})
    | st.builds(lambda t: {"type": "tool_result", "tool_use_id": "t9", "content": [{"type": "text", "text": t}],
                           "cache_control": {"type": "ephemeral"}}, texts),
    max_size=3,
)  # fmt: skip
message = (
    st.fixed_dictionaries({"role": roles, "content": content})
    | st.fixed_dictionaries({"content": content})
    | st.fixed_dictionaries({"role": st.none() | st.integers(0, 3), "content": content})
)
tools = st.lists(
    st.builds(lambda n, cc: {"name": n, "input_schema": {}, **({"cache_control": {"type": "ephemeral"}} if cc else {})},
              st.sampled_from(["Bash", "Read", "mcp__x__y", "Edit"]), st.booleans()),
    max_size=4,
)  # fmt: skip
extra = st.dictionaries(
    st.sampled_from(["model", "max_tokens", "stream", "metadata", "temperature", "stop_sequences", "tools"]),
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.lists(st.text(max_size=3), max_size=2) | st.just({"user_id": "u_session_abc"}) | tools,
    max_size=4,
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = dict(draw(extra))
    body["messages"] = draw(st.lists(message, max_size=4))
    sys_value = draw(system)
    if sys_value is not None:
        body["system"] = sys_value
    keys = draw(st.permutations(list(body)))
    return {k: body[k] for k in keys}


def spellings(body: dict[str, Any]) -> list[bytes]:
    """The same body as different clients write it."""
    out = [json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")]
    out.append(json.dumps(body).encode())  # spaces, \\u escapes
    out.append(json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    try:
        out.append(orjson.dumps(body))
    except TypeError:  # a lone surrogate: orjson does not write it
        pass
    return out


def corrupt(raw: bytes, data: st.DataObject) -> bytes:
    """One damage a body may come with: cut, a flipped byte, invalid UTF-8, a duplicated key, junk."""
    kind = data.draw(st.sampled_from(["cut", "byte", "utf8", "dup", "junk", "nan"]))
    at = data.draw(st.integers(0, max(0, len(raw) - 1)))
    if kind == "cut":
        return raw[:at]
    if kind == "byte":
        return raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]
    if kind == "utf8":
        return raw.replace(b"Claude", b"Cl\xffude", 1).replace(b"caf\xc3\xa9", b"caf\xc3", 1)
    if kind == "dup":
        return raw[:-1] + b',"messages":[]}' if raw.endswith(b"}") else raw
    if kind == "junk":
        return raw + b" x"
    return raw.replace(b'"max_tokens":', b'"max_tokens":NaN,"x":', 1)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(), st.data())
def test_fast_path_gives_the_exact_bytes_or_declines(body: dict[str, Any], data: st.DataObject) -> None:
    for raw in spellings(body):
        if data.draw(st.booleans()):
            raw = corrupt(raw, data)
        for s in SETTINGS:
            fwd = forwarded(raw, s)
            want = exact(raw, s)
            assert fwd.forward == want
            if want is None and fwd.warning is None:  # left alone: nothing to change, or one warning
                assert fwd.outcome is None or not fwd.outcome.edits


@settings(max_examples=150, deadline=None)
@given(bodies())
def test_the_analysis_after_the_fast_path_is_the_one_of_the_exact_path(body: dict[str, Any]) -> None:
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    fwd = forwarded(raw, BILLING)
    sparse = isinstance(fwd.doc, SparseDocument)
    got = pipeline.analyse(fwd)
    want = pipeline.analyse(_exact_forward(raw))
    assert (got.forward, got.record, got.body, got.warning) == (
        want.forward,
        want.record,
        want.body,
        want.warning,
    )
    if sparse:  # the full value was parsed off the forwarding path
        assert got.original_body == json.loads(raw)


def _exact_forward(raw: bytes) -> pipeline.Forward:
    """`pipeline.forward` with the sparse path switched off (every rule's text scopes, plus a path rule)."""
    off = pipeline.Settings(rules=BILLING.rules)
    object.__setattr__(off, "sparse_plans", dict.fromkeys(shapes.Api))  # the cached property: "not sparse"
    fwd = pipeline.forward("POST", "h", "/v1/messages", raw, off, {}, rulelib.StickyMemory())
    assert fwd is not None and not isinstance(fwd.doc, SparseDocument)
    fwd.settings = BILLING
    return fwd


def test_a_claude_code_body_takes_the_sparse_path_and_keeps_the_undecoded_messages_undecoded() -> None:
    body = samples.body_of_size(200_000)
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    fwd = forwarded(raw, BILLING)
    assert isinstance(fwd.doc, SparseDocument)
    assert fwd.doc.value["system"] == body["system"]  # decoded: the rule reads it
    assert not isinstance(fwd.doc.value["messages"][0], dict)  # left undecoded
    assert fwd.forward == exact(raw, BILLING)
    assert json.loads(fwd.forward or b"")["system"] == body["system"][1:]


def test_system_messages_inside_the_messages_are_decoded_and_edited_exactly() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": HEADER + "\nrest"}]}]}  # fmt: skip
    raw = orjson.dumps(body)
    fwd = forwarded(raw, BILLING)
    assert isinstance(fwd.doc, SparseDocument)
    assert fwd.forward == exact(raw, BILLING)
    assert json.loads(fwd.forward or b"")["messages"][1]["content"][0]["text"] == "rest"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"system":"a","system":"b"}',  # duplicate top-level key: Document refuses
        b'{"system":"a","messages":[],"messages":[]}',
        b'{"a":"\xff"}',  # invalid UTF-8 in a value msgspec only skips
        b'{"a":["caf\xc3"],"b":1}',
        b'{"a":{"k":NaN}}',  # json reads NaN; msgspec does not: the exact path decides
        b'{"a":1} x',
        b'{"a\\u0062":1}',  # a key not in orjson's spelling
        b'{"a":"\\ud800"}',  # a lone surrogate: msgspec refuses, json reads it
        b"[1]",
        b"",
    ],
)
def test_scan_declines_what_it_cannot_prove(raw: bytes) -> None:
    assert SparseDocument.scan(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b' { "a" : [ {"x": 1} , {"y" : [2]} ] ,\n"b":{ "c" :"d" } , "e": "f", "g":[] , "h":{}}  ',
        b'{"a":[{"x":1},2],"b":1e2,"d":[ ],"e":{ },"f":[1 ,2]}',
        orjson.dumps({"a": [{"x": [1, {"y": None}]}, "s", 2.5], "b": {}, "c": []}),
    ],
)
def test_layouts_locate_members_written_with_any_spacing(raw: bytes) -> None:
    """Every member of every container, located by `layout_at` (lengths when compact, else a walk), holds
    exactly the value json reads there."""
    top = SparseDocument.scan(raw)
    assert top is not None

    def check(layout: Any, value: Any) -> None:
        assert list(layout.keys) == (list(value) if isinstance(value, dict) else list(range(len(value))))
        for i, key in enumerate(layout.keys):
            member = json.loads(raw[layout.value_starts[i] : layout.ends[i]])
            assert member == value[key]
            if isinstance(value, dict):
                assert json.loads(raw[layout.starts[i] : layout.value_starts[i]].rstrip(b" :")) == key
            inner = layout_at(raw, layout.value_starts[i], layout.ends[i])
            if isinstance(member, dict | list):
                assert inner is not None
                check(inner, member)
            else:
                assert inner is None

    check(top, json.loads(raw))


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("malformed_*")))
def test_malformed_corpus_goes_out_as_the_exact_path_says(fixture: str) -> None:
    """Every bad body goes out unchanged with one warning; the one valid body of the corpus (lone
    surrogates: json reads them) is rewritten, by the exact path (msgspec declines it)."""
    raw = (FIXTURES / fixture).read_bytes()
    members = SparseDocument.scan(raw)
    fwd = forwarded(raw, BILLING)
    want = exact(raw, BILLING)
    assert fwd.forward == want
    if want is None:
        result = pipeline.analyse(fwd)
        assert result.forward is None and result.warning is not None and "unchanged" in result.warning
        assert members is None or fixture.startswith(("malformed_system", "malformed_messages"))
    else:
        assert fixture == "malformed_lone_surrogates.json" and members is None


def test_nesting_the_exact_parser_refuses_is_refused_here_too() -> None:
    """msgspec and json both stop at the interpreter's C recursion limit, msgspec one level earlier (the
    top-level object counts): whatever the sparse path takes, Document takes, called from the same place."""
    depths = [10, 500, 1_000, 5_000, 20_000, 100_000]
    lo, hi = 1_000, 200_000  # find json's limit here, then check both sides of it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            Document.parse(_nested(mid))
            lo = mid
        except RecursionError:
            hi = mid
    taken = []
    for depth in [*depths, lo - 2, lo - 1, lo, lo + 1, hi]:
        raw = _nested(depth)
        if SparseDocument.scan(raw) is not None:
            taken.append(depth)
            Document.parse(raw)  # must not raise
            assert forwarded(raw, BILLING).forward == exact(raw, BILLING)
    assert 5_000 in taken and hi not in taken


def _nested(depth: int) -> bytes:
    return (
        b'{"system":"' + HEADER.encode() + b'","messages":[],"x":{"a":' + b"[" * depth + b"]" * depth + b"}}"
    )


def test_real_fixtures_take_the_same_bytes_either_way() -> None:
    for path in sorted(Path(FIXTURES).rglob("*.json")):
        raw = path.read_bytes()
        for s in SETTINGS:
            assert forwarded(raw, s).forward == exact(raw, s), path.name


def test_all_rules_on_a_claude_code_body_decode_only_the_messages_a_rule_may_change() -> None:
    """With every built-in rule on, the sparse path still applies: of 400-odd messages it decodes the first
    turn (the move rule reads it) and the ones holding a guard (a ``cache_control`` marker, today's
    date), and forwards exactly the exact path's bytes."""
    body = samples.body_of_size(1_000_000, seed=2)
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    fwd = forwarded(raw, ALL)
    assert isinstance(fwd.doc, SparseDocument)
    messages = fwd.doc.value["messages"]
    decoded = [k for k, m in enumerate(messages) if isinstance(m, dict)]
    holding = [
        k
        for k, m in enumerate(body["messages"])
        if "cache_control" in json.dumps(m) or "Today's date" in json.dumps(m)
    ]
    assert len(messages) > 400 and set(holding) <= set(decoded) and len(decoded) <= len(holding) + 2
    assert fwd.forward is not None and fwd.forward == exact(raw, ALL)
    assert "cache_control" not in json.dumps(json.loads(fwd.forward)["messages"][-1])


def test_an_escape_that_may_spell_a_guard_makes_the_sparse_path_decline_for_message_rules() -> None:
    body = {"system": HEADER, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_\u0063ontrol": 1}]}]}  # fmt: skip
    raw = json.dumps(body).encode().replace(b"cache_control", b"cache_\\u0063ontrol")
    assert b"cache_control" not in raw
    fwd = forwarded(raw, ALL)
    assert not isinstance(fwd.doc, SparseDocument)  # the exact path read it
    assert fwd.forward == exact(raw, ALL) and fwd.forward is not None
    assert b"cache_" not in fwd.forward.split(b'"messages"')[1]


def test_a_message_rule_without_a_literal_turns_the_sparse_path_off() -> None:
    rule = rulelib.make_rule({"name": "d", "scope": "messages:user", "match": "[0-9]{4}", "action": "drop"})
    plans = pipeline.Settings(rules=(*BILLING.rules, rule)).sparse_plans
    assert plans[shapes.Api.ANTHROPIC] is None
    assert BILLING.sparse_plans[shapes.Api.ANTHROPIC] is not None
