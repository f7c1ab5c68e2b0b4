"""Request classes as the real Claude Code CLI 2.1.332 sends them (issue 12, item 5), read from the recorded
flow files in tests/fixtures/real/ (see its README.md). What the bodies hold is read with json here; the
classes and verdicts come from the report reader and the analyzer.

The recorded ``claude -p`` runs send only conversation turns (main, subagent): no side request (title,
command-prefix check) and no count_tokens request, not even for a Bash tool call (tried with 2.1.332). The
interactive TUI sends both: side requests around its turns (tests/e2e/test_claude_tui_e2e.py) and, for
``/context``, count_tokens requests (recorded in cc_2_1_332_context.mitm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy import io as mitm_io

from stableprefix.core import pipeline
from stableprefix.core import rules as rl
from stableprefix.core.analyzer import Analyzer
from stableprefix.report import readers

REAL = Path(__file__).parent / "fixtures" / "real"
TWO = REAL / "cc_2_1_332_two_conversations.mitm"
SUBAGENT = REAL / "cc_2_1_332_subagent.mitm"
CONTEXT = REAL / "cc_2_1_332_context.mitm"


def posts(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    return [fl for fl in flows if fl.request.method == "POST"]


def bodies(path: Path) -> list[dict[str, Any]]:
    return [json.loads(fl.request.content or b"") for fl in posts(path)]


def turns(path: Path) -> list[dict[str, Any]]:
    return [t.rec for t in sorted(readers.read([path], progress=False).turns(), key=lambda t: t.rec["ts"])]


def test_the_environment_message_is_part_of_the_conversation() -> None:
    b1, b2, _ = bodies(TWO)
    # what the CLI sends: the first user message, then the environment as an inline system message; on the
    # next turn the same text as a plain string (another JSON form of the same message)
    assert [m["role"] for m in b1["messages"]] == ["user", "system"]
    assert [m["role"] for m in b2["messages"]] == ["user", "system", "assistant", "user"]
    block = b1["messages"][1]["content"][0]
    assert len(b1["messages"][1]["content"]) == 1 and block["text"] == b2["messages"][1]["content"]
    assert block["cache_control"] == {"type": "ephemeral"}  # a marker on turn 1 only: not a change either
    r1, r2, r3 = turns(TWO)
    assert (r1["class"], r1["verdict"]) == ("main", "first")
    # not a change: turn 2 keeps both first-turn messages (the system one included) and appends
    assert (r2["class"], r2["verdict"], r2["common_prefix_messages"]) == ("main", "append-only", 2)
    assert r2["diverged_at"] is None and r2["cause"] is None and r2["stream"] == r1["stream"]
    # another first prompt: a new main conversation (same system prompt), its miss is the billing header's
    assert (r3["class"], r3["verdict"], r3["cause"]) == ("main", "first", "billing")
    assert r3["stream"] != r1["stream"] and r3["session"] != r1["session"]


def test_subagent_and_main_as_the_cli_sends_them() -> None:
    main1, sub, main2 = bodies(SUBAGENT)
    assert sub["system"][0]["text"].endswith("cc_is_subagent=true;")
    assert len(sub["tools"]) < len(main1["tools"])
    assert [m["role"] for m in sub["messages"]] == ["user", "system"]  # its own inline system message
    assert [m["role"] for m in main2["messages"]] == ["user", "system", "assistant", "user"]
    r1, rs, r2 = turns(SUBAGENT)
    assert [(r["class"], r["verdict"]) for r in (r1, rs, r2)] == [
        ("main", "first"),
        ("subagent", "first"),
        ("main", "append-only"),
    ]
    assert rs["stream"] != r1["stream"] == r2["stream"] and r2["common_prefix_messages"] == 2
    assert r1["session"] == rs["session"] == r2["session"]  # one session, two streams


def _records(path: Path, rules: tuple[rl.Rule, ...]) -> list[dict[str, Any]]:
    analyzer = Analyzer(pipeline.Settings(rules=rules, passthrough=()))
    out = []
    for fl in posts(path):
        result = analyzer.request("POST", fl.request.host, fl.request.path, fl.request.content or b"",
                                  fl.request.headers)  # fmt: skip
        assert result is not None and result.warning is None
        out.append(result.record)
    return out


def test_inline_system_keeps_the_classes_and_shares_the_environment_across_conversations() -> None:
    default = _records(TWO, tuple(rl.builtin_rules()))
    moved = _records(TWO, tuple(rl.switch(rl.builtin_rules(), on=["inline_system"])))
    assert [(r["class"], r["verdict"]) for r in moved] == [("main", "first"), ("main", "append-only"),
                                                          ("main", "first")]  # fmt: skip
    assert moved[1]["common_prefix_messages"] == 1  # the user message; the environment now sits in system
    env = bodies(TWO)[0]["messages"][1]["content"][0]["text"]
    # the new conversation shares the environment block with the first one now: at least its characters more
    assert moved[2]["shareable_chars"] - default[2]["shareable_chars"] >= len(env) == 9258
    for subagent in _records(SUBAGENT, tuple(rl.switch(rl.builtin_rules(), on=["inline_system"]))):
        assert subagent["changed"] == {"billing": 1, "inline_system": 1}


def test_env_block_pins_the_environment_lines_the_real_cli_sends() -> None:
    """2.1.332 lists its environment (`` - Primary working directory: ...``, `` - OS Version: ...``) in an
    inline system message; the opt-in env_block rule pins both values and leaves every other byte."""
    settings = pipeline.Settings(rules=tuple(rl.switch(rl.builtin_rules(), on=["env_block"])))
    flow = posts(TWO)[0]
    sent = json.loads(flow.request.content or b"")
    text = sent["messages"][1]["content"][0]["text"]
    cwd = text.split(" - Primary working directory: ", 1)[1].split("\n", 1)[0]
    os_version = text.split(" - OS Version: ", 1)[1].split("\n", 1)[0]
    assert cwd.startswith("/tmp/") and os_version.startswith("Linux ")
    result = pipeline.process("POST", "127.0.0.1", flow.request.path, flow.request.content or b"", settings)
    assert result is not None and result.forward is not None
    assert result.record["changed"] == {"billing": 1, "env_block": 2}
    out = json.loads(result.forward)
    want = text.replace(f"working directory: {cwd}\n", "working directory: /workspace\n")
    want = want.replace(f"OS Version: {os_version}\n", "OS Version: unknown\n")
    assert out["messages"][1]["content"][0]["text"] == want != text
    sent["system"] = sent["system"][1:]  # the billing block: dropped by the default rule
    sent["messages"][1]["content"][0]["text"] = want
    assert out == sent


def test_count_tokens_of_context_are_classed_and_never_compared() -> None:
    """The TUI's ``/context`` between two prompts: 26 count_tokens requests (no billing block in them);
    each is classed count_tokens with no verdict, and the second prompt still extends the first."""
    sent = posts(CONTEXT)
    counts = [fl for fl in sent if fl.request.path.startswith("/v1/messages/count_tokens")]
    assert len(counts) == 26
    assert not any(b"x-anthropic-billing-header" in (fl.request.content or b"") for fl in counts)
    mains = [
        json.loads(fl.request.content or b"") for fl in sent if fl.request.path.startswith("/v1/messages?")
    ]
    b1, b2 = [b for b in mains if b.get("tools")]
    recs = turns(CONTEXT)
    ct = [r for r in recs if r["path"].startswith("/v1/messages/count_tokens")]
    assert len(ct) == 26 and {(r["class"], r["verdict"]) for r in ct} == {("count_tokens", None)}
    main = [r for r in recs if r["class"] == "main"]
    assert [r["verdict"] for r in main] == ["first", "append-only"] and main[0]["stream"] == main[1]["stream"]
    assert main[1]["common_prefix_messages"] == len(b1["messages"]) < len(b2["messages"])
