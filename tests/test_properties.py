"""Property-based tests of the core over generated request bodies of every supported shape.

For random Anthropic Messages, count_tokens, OpenAI Chat, OpenAI Responses, Ollama chat and generate bodies
(prompt texts salted with every volatile item the built-in rules know, serialised compact, spaced, indented
or ASCII-escaped) and every rule set (billing drop/pin, all built-ins, user rules):

- fail open: corrupted bodies never raise, and a warning means the original bytes go out;
- the forwarded JSON equals the input with exactly the rules' edits (`jsonedit.apply_edits`);
- nothing outside the edited spans changes: every untouched value keeps its exact bytes (checked with a
  span parser written here, independent of `jsonedit`), as do the text before the first and after the last
  edit;
- rules stay in their declared scope (billing only ever edits system-position text);
- applying the rules twice gives the same bytes as once.

Each property draws the shape, the rule set and the serialisation style. Profiles: ``HYPOTHESIS_PROFILE=ci``
(default: 100 examples per property, derandomised) and ``HYPOTHESIS_PROFILE=long`` (10,000 examples per
property, random): ``scripts/fuzz_long.sh``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from stableprefix.core import fingerprint
from stableprefix.core import jsonedit
from stableprefix.core import pipeline
from stableprefix.core import rules
from stableprefix.core import shapes
from stableprefix.demo import samples

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHAPES = ("anthropic", "count_tokens", "openai_chat", "openai_responses", "ollama_chat", "ollama_generate")
PATHS = {
    "anthropic": "/v1/messages?beta=true",
    "count_tokens": "/v1/messages/count_tokens",
    "openai_chat": "/v1/chat/completions",
    "openai_responses": "/v1/responses",
    "ollama_chat": "/api/chat",
    "ollama_generate": "/api/generate",
}
SESSION = {"x-claude-code-session-id": "prop-session"}

# --- text salted with every volatile item the built-in rules know ---------------------------------------

BILLING = [
    samples.billing_line(),
    samples.billing_line("2.1.181", "a1b", None),
    samples.billing_line("2.1.90", "f00", "0a1b2", "cron"),
    "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445; extra=1;",
    "  x-anthropic-billing-header: cc_version=2.2.0; cc_entrypoint=sdk-ts;",
]
SNIPPETS = [
    *BILLING,
    "Today's date is 2026-11-29.",
    "Today's date: 2025-01-31",
    "# currentDate\nToday's date is 2026-12-01.\n",
    "Primary working directory: /home/dev/project",
    "Working directory: /tmp/x",
    "OS Version: Linux 6.1.0-18-amd64",
    "\n\ngitStatus: This is the git status at the start of the conversation. Note...\nStatus:\nM a.py",
    "SessionStart:resume hook success:",
    "<session-id>0000-1111</session-id>",
    "\nLast active: 2 hours ago",
    "<system-reminder>\nreminder\n</system-reminder>",
    "You are Claude Code, Anthropic's official CLI for Claude.",
    "cache_control",
    '"quoted" \\ back\\slash',
    "é ü 漢字 🙂",
    "\u2028\u2029\x7f\x00\x1f",
]
SEPARATORS = ["", "\n", "\n\n", " "]


@st.composite
def texts(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=12)), max_size=4))
    sep = draw(st.sampled_from(SEPARATORS))
    return sep.join(pieces)


cache_control = st.sampled_from([None, {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}])


def _with_cc(block: dict[str, Any], cc: Any) -> dict[str, Any]:
    return {**block, "cache_control": cc} if cc is not None else block


@st.composite
def text_block(draw: st.DrawFn, kind: str = "text") -> dict[str, Any]:
    return _with_cc({"type": kind, "text": draw(texts())}, draw(cache_control))


@st.composite
def anthropic_content(draw: st.DrawFn, role: str) -> Any:
    if draw(st.booleans()):
        return draw(texts())
    blocks: list[Any] = draw(st.lists(text_block(), min_size=1, max_size=3))
    if role == "user" and draw(st.booleans()):
        inner = draw(st.one_of(texts(), st.lists(text_block(), max_size=2)))
        blocks.append({"type": "tool_result", "tool_use_id": "toolu_1", "content": inner})
    if role == "assistant" and draw(st.booleans()):
        blocks.append({"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": draw(texts())}})
    return blocks


def tool_list(draw: st.DrawFn, openai: bool = False) -> list[dict[str, Any]]:
    names = draw(
        st.lists(st.sampled_from(samples._TOOL_NAMES + ["zz", "Aa", "mcp__a__b"]), max_size=5, unique=True)
    )
    out = []
    for n in names:
        schema = {"type": "object", "properties": {"x": {"type": "string"}}}
        if openai:
            out.append({"type": "function", "function": {"name": n, "parameters": schema}})
        else:
            out.append(
                _with_cc(
                    {"name": n, "description": draw(texts()), "input_schema": schema}, draw(cache_control)
                )
            )
    return out


extra_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


@st.composite
def extras(draw: st.DrawFn) -> dict[str, Any]:
    """Unknown members a client may add, and the metadata the path rules aim at."""
    out: dict[str, Any] = draw(
        st.dictionaries(st.sampled_from(["x_extra", "temperature", "top_k", "n"]), extra_values, max_size=2)
    )
    if draw(st.booleans()):
        out["metadata"] = {"user_id": f"user_{'0' * 8}_account__session_{draw(st.uuids())}"}
    return out


@st.composite
def anthropic_body(draw: st.DrawFn, count_tokens: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-5"}
    system_kind = draw(st.sampled_from(["none", "str", "blocks"]))
    if system_kind == "str":
        body["system"] = draw(texts())
    elif system_kind == "blocks":
        body["system"] = draw(st.lists(text_block(), min_size=1, max_size=4))
    messages = []
    for i in range(draw(st.integers(1, 4))):
        role = draw(st.sampled_from(["user", "assistant"] + (["system"] if i else [])))
        messages.append({"role": role, "content": draw(anthropic_content(role))})
    body["messages"] = messages
    if draw(st.booleans()):
        body["tools"] = tool_list(draw)
    if not count_tokens:
        body["max_tokens"] = 1024
        body["stream"] = draw(st.booleans())
    body.update(draw(extras()))
    return body


@st.composite
def chat_content(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(texts())
    return [{"type": "text", "text": draw(texts())} for _ in range(draw(st.integers(1, 3)))]


@st.composite
def openai_chat_body(draw: st.DrawFn, ollama: bool = False) -> dict[str, Any]:
    messages = []
    for _ in range(draw(st.integers(1, 5))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
        content = draw(texts()) if ollama else draw(chat_content())
        messages.append({"role": role, "content": content})
    body: dict[str, Any] = {"model": "local", "messages": messages}
    if draw(st.booleans()):
        body["tools"] = tool_list(draw, openai=True)
    body["stream"] = draw(st.booleans())
    body.update(draw(extras()))
    return body


@st.composite
def openai_responses_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "local"}
    if draw(st.booleans()):
        body["instructions"] = draw(texts())
    if draw(st.booleans()):
        body["input"] = draw(texts())
    else:
        items: list[Any] = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["system", "developer", "user", "assistant", "output"]))
            if kind == "output":
                items.append({"type": "function_call_output", "call_id": "c1", "output": draw(texts())})
            else:
                parts = [
                    {"type": "input_text", "text": draw(texts())} for _ in range(draw(st.integers(1, 2)))
                ]
                items.append({"role": kind, "content": draw(st.one_of(st.just(parts), texts()))})
        body["input"] = items
    body.update(draw(extras()))
    return body


@st.composite
def ollama_generate_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "local", "prompt": draw(texts())}
    if draw(st.booleans()):
        body["system"] = draw(texts())
    body.update(draw(extras()))
    return body


BODIES: dict[str, Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    "anthropic": anthropic_body,
    "count_tokens": lambda: anthropic_body(count_tokens=True),
    "openai_chat": openai_chat_body,
    "openai_responses": openai_responses_body,
    "ollama_chat": lambda: openai_chat_body(ollama=True),
    "ollama_generate": ollama_generate_body,
}


def serialise(body: Any, style: str) -> bytes:
    """The body as different clients write it: Node (compact, UTF-8), Python defaults, pretty, ASCII-escaped."""
    if style == "compact":
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    elif style == "python":
        text = json.dumps(body)
    elif style == "pretty":
        text = json.dumps(body, ensure_ascii=False, indent=2)
    else:  # odd whitespace everywhere
        text = json.dumps(body, ensure_ascii=False, separators=(" ,\n ", " :\t"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from st.text(): escape it as \udXXX, as JSON allows
        return json.dumps(body).encode()


styles = st.sampled_from(["compact", "python", "pretty", "odd"])

# --- rule sets ------------------------------------------------------------------------------------------


def _all_builtins(billing: str = "drop") -> tuple[rules.Rule, ...]:
    return tuple(rules.switch(rules.builtin_rules(billing), rules.builtin_names()))


USER_RULES = (
    rules.make_rule(
        {"name": "mask_dirs", "scope": "messages:*", "match": r"/home/(?P<who>[a-z]+)", "action": "mask"}
    ),
    rules.make_rule(
        {
            "name": "sticky_dates",
            "scope": ["system", "messages:user"],
            "match": r"\d{4}-\d{2}-\d{2}",
            "action": "sticky",
        }
    ),
    rules.make_rule({"name": "drop_extra", "scope": "path:x_extra", "action": "drop"}),
    rules.make_rule({"name": "pin_top_k", "scope": "path:top_k", "action": "pin", "value": 40}),
)
RULE_SETS: dict[str, tuple[rules.Rule, ...]] = {
    "billing": tuple(rules.builtin_rules("drop")),
    "pin": tuple(rules.builtin_rules("pin")),
    "all": _all_builtins(),
    "all_pin": _all_builtins("pin"),
    "user": (*rules.builtin_rules("drop"), *USER_RULES),
}
rule_sets = st.sampled_from(sorted(RULE_SETS))


def settings_for(name: str) -> pipeline.Settings:
    return pipeline.Settings(rules=RULE_SETS[name], passthrough=())


# --- an independent span parser (the oracle for "nothing outside the edits changed") ----------------------

_scan: Any = getattr(json.decoder, "scanstring")  # noqa: B009
_WS = " \t\n\r"

type Span = tuple[int, int, int]  # member start (key or element), value start, value end


def spans(text: str) -> dict[tuple[Any, ...], Span]:
    """Every value's span by path, read character by character (no jsonedit code involved)."""
    out: dict[tuple[Any, ...], Span] = {}

    def ws(i: int) -> int:
        while i < len(text) and text[i] in _WS:
            i += 1
        return i

    def value(i: int, path: tuple[Any, ...], member_start: int) -> int:
        c = text[i]
        if c == "{":
            j = ws(i + 1)
            if text[j] != "}":
                while True:
                    start = j
                    key, j = _scan(text, j + 1)
                    j = ws(ws(j) + 1)  # past ':'
                    j = ws(value(j, (*path, key), start))
                    if text[j] == "}":
                        break
                    j = ws(j + 1)  # past ','
            end = j + 1
        elif c == "[":
            j = ws(i + 1)
            k = 0
            if text[j] != "]":
                while True:
                    j = ws(value(j, (*path, k), j))
                    k += 1
                    if text[j] == "]":
                        break
                    j = ws(j + 1)
            end = j + 1
        elif c == '"':
            end = _scan(text, i + 1)[1]
        else:
            j = i
            while j < len(text) and text[j] not in ",]}" + _WS:
                j += 1
            end = j
        out[path] = (member_start, i, end)
        return end

    start = ws(0)
    value(start, (), start)
    return out


def _is_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def assert_only_edited_spans_changed(raw: bytes, forward: bytes, edits: list[jsonedit.Edit]) -> None:
    """Untouched values keep their exact text (paths shifted past deleted array elements); so do the
    text before the first edit and after the last one."""
    before, after = raw.decode(), forward.decode()
    old, new = spans(before), spans(after)
    edited = [e.path for e in edits]
    deleted = [e.path for e in edits if isinstance(e, jsonedit.Delete)]

    def moved(path: tuple[Any, ...]) -> tuple[Any, ...]:
        """Where an untouched value sits after the edits: array indices shift past deleted elements."""
        out: list[Any] = []
        for k, key in enumerate(path):
            if isinstance(key, int):
                gone = [d for d in deleted if len(d) == k + 1 and d[:k] == path[:k]]
                indices: list[Any] = [d[k] for d in gone]
                key -= sum(1 for i in indices if isinstance(i, int) and i < key)
            out.append(key)
        return tuple(out)

    checked = 0
    for path, (_, vs, ve) in old.items():
        if not path:
            continue
        parent = path[:-1]
        touched_parent = any(_is_prefix(parent, e) for e in edited)
        untouched = not any(_is_prefix(e, path) or _is_prefix(path, e) for e in edited)
        if touched_parent and untouched:  # a maximal untouched subtree
            target = moved(path)
            assert target in new, f"{path} -> {target} vanished"
            _, ns, ne = new[target]
            assert before[vs:ve] == after[ns:ne], f"bytes of untouched {path} changed"
            checked += 1

    def siblings(path: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return sorted(
            (p for p in old if len(p) == len(path) and p[:-1] == path[:-1]), key=lambda p: old[p][1]
        )

    def bounds(e: jsonedit.Edit) -> tuple[int, int]:
        if isinstance(e, jsonedit.Replace):
            return old[e.path][1], old[e.path][2]
        sib = siblings(e.path)
        k = sib.index(e.path)  # a deleted member may take the separator before or after it
        lo = old[sib[k - 1]][2] if k else old[e.path[:-1]][1] + 1
        hi = old[sib[k + 1]][0] if k + 1 < len(sib) else old[e.path[:-1]][2] - 1
        return lo, hi

    first = min(bounds(e)[0] for e in edits)
    last = max(bounds(e)[1] for e in edits)
    assert after.startswith(before[:first]), "text before the first edit changed"
    assert after.endswith(before[last:]), "text after the last edit changed"
    # every value off the edited paths was compared, or there was none (all on an edited path)
    off_edits = [p for p in old if p and not any(_is_prefix(e, p) or _is_prefix(p, e) for e in edited)]
    assert checked > 0 or not off_edits, f"{len(off_edits)} untouched values were never compared"


# --- helpers --------------------------------------------------------------------------------------------


def oracle_edits(raw: bytes, path: str, rule_set: str, sticky: rules.StickyMemory) -> list[jsonedit.Edit]:
    """The edits the rules make, computed directly (not through pipeline.process)."""
    doc = jsonedit.Document.parse(raw)
    shape = shapes.detect(path, doc.value)
    assert shape is not None
    session = pipeline.session_id(SESSION, doc.value)
    return rules.apply(shape, settings_for(rule_set).rules, session, sticky).edits


def run(raw: bytes, path: str, rule_set: str, sticky: rules.StickyMemory) -> pipeline.Result:
    result = pipeline.process("POST", "127.0.0.1", path, raw, settings_for(rule_set), SESSION, sticky)
    assert result is not None
    return result


# --- the properties -------------------------------------------------------------------------------------


@PROFILE
@given(data=st.data())
def test_forwarded_json_is_the_input_with_exactly_the_rules_edits(data: st.DataObject) -> None:
    shape = data.draw(st.sampled_from(SHAPES))
    path = PATHS[shape]
    rule_set = data.draw(rule_sets)
    primer = serialise(data.draw(BODIES[shape]()), "compact")  # an earlier request: sticky values to reuse
    raw = serialise(data.draw(BODIES[shape]()), data.draw(styles))
    mine, theirs = rules.StickyMemory(), rules.StickyMemory()
    run(primer, path, rule_set, mine)
    run(primer, path, rule_set, theirs)
    result = run(raw, path, rule_set, mine)
    assert result.warning is None, result.warning
    edits = oracle_edits(raw, path, rule_set, theirs)
    original = json.loads(raw)
    if result.forward is None:
        assert not edits
        assert result.body == original
        return
    assert edits
    assert json.loads(result.forward) == jsonedit.apply_edits(original, edits)
    assert result.body == json.loads(result.forward)
    assert result.record["rewritten"] is True and result.record["changed"]
    assert_only_edited_spans_changed(raw, result.forward, outermost(edits))


def outermost(edits: list[jsonedit.Edit]) -> list[jsonedit.Edit]:
    """The edits that take effect: one below a replaced or deleted node is dropped (jsonedit's rule)."""
    return [e for e in edits if not any(o.path != e.path and _is_prefix(o.path, e.path) for o in edits)]


@PROFILE
@given(data=st.data())
def test_applying_the_rules_twice_equals_once(data: st.DataObject) -> None:
    shape = data.draw(st.sampled_from(SHAPES))
    path = PATHS[shape]
    rule_set = data.draw(rule_sets)
    body = data.draw(BODIES[shape]())
    raw = serialise(body, data.draw(styles))
    sticky = rules.StickyMemory()
    once = run(raw, path, rule_set, sticky).forward or raw
    twice = run(once, path, rule_set, sticky)
    assert twice.warning is None
    assert (twice.forward or once) == once, "a second pass changed the body again"


@PROFILE
@given(data=st.data())
def test_billing_touches_system_position_text_only(data: st.DataObject) -> None:
    shape = data.draw(st.sampled_from(SHAPES))
    path = PATHS[shape]
    rule_set = data.draw(st.sampled_from(["billing", "pin"]))
    raw = serialise(data.draw(BODIES[shape]()), data.draw(styles))
    doc = jsonedit.Document.parse(raw)
    shape_ = shapes.detect(path, doc.value)
    assert shape_ is not None
    system_places = {s.path for s in shape_.slots if s.scope == "system"}
    system_places |= {s.block for s in shape_.slots if s.scope == "system" and s.block is not None}
    edits = rules.apply(shape_, settings_for(rule_set).rules, "", rules.StickyMemory()).edits
    assert {e.path for e in edits} <= system_places
    result = run(raw, path, rule_set, rules.StickyMemory())
    if result.forward is None:
        return
    # every non-system text is still there, unchanged, in the same order
    before = [s.text for s in shape_.slots if s.scope != "system"]
    after_shape = shapes.detect(path, json.loads(result.forward))
    assert after_shape is not None
    assert [s.text for s in after_shape.slots if s.scope != "system"] == before


def test_cache_control_goes_from_every_block_after_billing() -> None:
    raw = serialise(
        samples.Session().request(2), "compact"
    )  # system: billing, identity (cc), instructions (cc)
    settings = pipeline.Settings(rules=tuple(rules.switch(rules.builtin_rules(), ["cache_control"])))
    result = pipeline.process("POST", "h", "/v1/messages", raw, settings, SESSION)
    assert result is not None and result.forward is not None
    system = json.loads(result.forward)["system"]
    assert len(system) == 2
    assert all("cache_control" not in block for block in system)


@pytest.mark.parametrize("sep", ["", "\n", "\n\n"])
def test_stacked_billing_headers_are_dropped_in_one_pass(sep: str) -> None:
    header = samples.billing_line()
    body = {"model": "m", "messages": [], "system": header + sep + header + sep + "You are Claude Code."}
    raw = serialise(body, "compact")
    sticky = rules.StickyMemory()
    once = run(raw, PATHS["anthropic"], "billing", sticky).forward or raw
    assert (run(once, PATHS["anthropic"], "billing", sticky).forward or once) == once


@pytest.mark.parametrize("rule_set", ["all", "user"])
def test_lone_surrogate_in_prompt_with_a_regex_rule_fails_open(rule_set: str) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"Today\'s date is 2026-11-29. \\ud800"}]}'
    result = pipeline.process("POST", "h", "/v1/messages", raw, settings_for(rule_set), SESSION)
    assert result is not None


def test_header_glued_after_a_header_block_goes_in_one_pass() -> None:
    header = samples.billing_line()
    body = {
        "model": "m",
        "messages": [],
        "system": [
            {"type": "text", "text": header},
            {"type": "text", "text": header + "You are Claude Code."},
        ],
    }
    raw = serialise(body, "compact")
    once = run(raw, PATHS["anthropic"], "billing", rules.StickyMemory()).forward or raw
    assert (run(once, PATHS["anthropic"], "billing", rules.StickyMemory()).forward or once) == once


def test_header_left_alone_by_git_status_goes_in_one_pass() -> None:
    header = samples.billing_line()
    git = "\n\ngitStatus: This is the git status at the start of the conversation.\nStatus:\nM a.py"
    system = [{"type": "text", "text": ""}, {"type": "text", "text": header + git}]
    raw = serialise({"model": "m", "messages": [], "system": system}, "compact")
    once = run(raw, PATHS["anthropic"], "all", rules.StickyMemory()).forward or raw
    assert (run(once, PATHS["anthropic"], "all", rules.StickyMemory()).forward or once) == once


def corrupt(raw: bytes, how: str, where: int, junk: bytes) -> bytes:
    at = where % (len(raw) + 1)
    if how == "truncate":
        return raw[:at]
    if how == "insert":
        return raw[:at] + junk + raw[at:]
    if how == "overwrite":
        return raw[:at] + junk + raw[at + len(junk) :]
    if how == "invalid_utf8":
        return raw[:at] + b"\xff\xfe" + raw[at:]
    if how == "lone_surrogate":
        return raw.replace(b'"text":"', b'"text":"\\ud800', 1).replace(b'"text": "', b'"text": "\\udc00', 1)
    if how == "wrap_array":
        return b"[" + raw + b"]"
    if how == "nest":
        return b'{"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return raw


WRONG = [1, 2.5, True, None, "s", [], {}, [1, 2], [{"type": "text", "text": 3}], {"text": "x"}, ["str"]]


@PROFILE
@given(data=st.data())
def test_fail_open_never_raises_and_warns_when_it_leaves_a_body(data: st.DataObject) -> None:
    shape = data.draw(st.sampled_from(SHAPES))
    path = PATHS[shape]
    body = data.draw(BODIES[shape]())
    if data.draw(st.booleans()):  # a wrong type somewhere the shape looks
        key = data.draw(st.sampled_from(["system", "messages", "input", "instructions", "prompt", "tools"]))
        body[key] = data.draw(st.sampled_from(WRONG))
        raw = serialise(body, "compact")
    else:
        how = data.draw(
            st.sampled_from(
                ["truncate", "insert", "overwrite", "invalid_utf8", "lone_surrogate", "wrap_array", "nest"]
            )
        )
        junk = data.draw(st.sampled_from([b"", b"{", b"]", b'"', b",", b"\\", b"\x00", b"nul", b"\xc3"]))
        raw = corrupt(serialise(body, data.draw(styles)), how, data.draw(st.integers(0, 10_000)), junk)
    rule_set = data.draw(rule_sets)
    result = pipeline.process("POST", "h", path, raw, settings_for(rule_set), SESSION, rules.StickyMemory())
    assert result is not None
    if result.warning is not None:
        assert result.forward is None
        assert "error" in result.record
        return
    # still a valid body: whatever goes out is valid JSON equal to the input plus the edits
    if result.forward is not None:
        assert isinstance(json.loads(result.forward), dict)


@PROFILE
@given(st.binary(max_size=300), st.sampled_from(sorted(PATHS.values())))
def test_random_bytes_never_raise(raw: bytes, path: str) -> None:
    result = pipeline.process("POST", "h", path, raw, settings_for("all"), SESSION, rules.StickyMemory())
    assert result is not None
    assert result.warning is not None or result.forward is None or json.loads(result.forward)


# --- the fast paths of the core agree with the plain ones ------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.sampled_from(["role", "content", "cache_control", "type", "text"]) | st.text(max_size=5),
            c,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@PROFILE
@given(json_values)
def test_canonical_dump_is_canonical_bytes_of_canonical(value: Any) -> None:
    assert fingerprint.canonical_dump(value) == fingerprint.canonical_bytes(fingerprint.canonical(value))


@PROFILE
@given(st.lists(json_values, max_size=4))
def test_the_memo_gives_the_canonical_bytes_first_time_and_again(values: list[Any]) -> None:
    """Keyed by plain JSON: a hit must be the canonical form of the value asked for, not of another one
    (``1`` and ``1.0``, ``true`` and ``1``, ``"content": "x"`` and its one-block form share no key)."""
    memo = fingerprint.CanonicalMemo(1 << 20)
    want = [fingerprint.canonical_bytes(fingerprint.canonical(v)) for v in values]
    for _ in range(2):
        got = memo.entries(values)
        assert [data for data, _ in got] == want
        assert [h for _, h in got] == [fingerprint.sha(w) for w in want]


@PROFILE
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), styles)
def test_document_parse_reads_what_json_reads(value: dict[str, Any], style: str) -> None:
    raw = serialise(value, style)
    doc = jsonedit.Document.parse(raw)
    assert doc.value == json.loads(raw)
    assert doc.edited([]) == raw.decode()


@PROFILE
@given(st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=5), styles, st.data())
def test_document_edits_match_value_edits(value: dict[str, Any], style: str, data: st.DataObject) -> None:
    raw = serialise(value, style)
    doc = jsonedit.Document.parse(raw)
    paths = sorted((p for p in spans(raw.decode()) if p), key=repr)
    assume(paths)
    chosen = data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True))
    edits: list[jsonedit.Edit] = [
        jsonedit.Delete(p) if data.draw(st.booleans()) else jsonedit.Replace(p, data.draw(json_values))
        for p in chosen
    ]
    # edits below another edit are dropped by both sides; keep the outermost to compare spans
    outer = outermost(edits)
    text = doc.edited(outer)
    assert json.loads(text) == jsonedit.apply_edits(doc.value, outer)
    assert_only_edited_spans_changed(raw, text.encode(), outer)
