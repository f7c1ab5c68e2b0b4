"""Streams, classes, verdicts, locations and causes (pure core, plain dicts)."""

from __future__ import annotations

import copy
import json
import os.path
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stableprefix.core import pipeline
from stableprefix.core import shapes
from stableprefix.core import streams
from stableprefix.core.analyzer import Analyzer
from stableprefix.core.fingerprint import CLEARED_TOOL_RESULT
from stableprefix.core.fingerprint import detail
from stableprefix.core.streams import Tracker
from stableprefix.demo import samples

SESSION = samples.Session()
GIT_OLD = "Status:\nM src/app.py\n?? notes.txt"
GIT_NEW = "Status:\nM src/app.py\nM src/cli.py\n?? notes.txt"


def observe(
    tracker: Tracker,
    body: dict[str, Any],
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
    settings: pipeline.Settings | None = None,
    context: bool = False,
) -> dict[str, Any]:
    r = pipeline.process(
        "POST", "127.0.0.1", path, json.dumps(body).encode(), settings or pipeline.Settings(), headers
    )
    assert r is not None and r.body is not None and not r.warning
    parts = shapes.parts(shapes.Api(r.record["api"]), r.body)
    fields = tracker.observe(r.record, detail(parts, r.body), parts, r.body.get("max_tokens"), context)
    return {**r.record, **fields}


def turn(t: int, session: samples.Session = SESSION) -> dict[str, Any]:
    return session.request(t)


def with_git_edit(body: dict[str, Any]) -> dict[str, Any]:
    b = copy.deepcopy(body)
    assert GIT_OLD in b["system"][2]["text"]
    b["system"][2]["text"] = b["system"][2]["text"].replace(GIT_OLD, GIT_NEW)
    return b


def side_request(session: samples.Session = SESSION, text: str = "Fix the parser") -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "system": [
            {"type": "text", "text": samples.billing_line(cch="abcde")},
            {
                "type": "text",
                "text": "Generate a concise, sentence-case title (3-7 words) for this conversation.",
            },
        ],
        "messages": [{"role": "user", "content": text}],
        "metadata": session.request(1)["metadata"],
    }


def subagent_request(turn_no: int) -> dict[str, Any]:
    sub = samples.Session(task="Search the code base for callers of parse().", tool_count=6)
    body = sub.request(turn_no)
    body["system"][2]["text"] = "You are an agent for Claude Code. " + samples.instructions(5000, seed=7)
    body["metadata"] = SESSION.request(1)["metadata"]  # same Claude Code session as the main thread
    return body


# --- classes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "tools", "system_chars", "max_tokens", "expected"),
    [
        ("anthropic-count-tokens", 20, 30000, None, "count_tokens"),
        ("anthropic-messages", 0, 200, 512, "side"),
        ("anthropic-messages", 0, 200, None, "side"),
        ("anthropic-messages", 2, 30000, 512, "side"),
        ("anthropic-messages", 0, 30000, 32000, None),
        ("anthropic-messages", 3, 200, 512, None),
        ("anthropic-messages", 20, 30000, 32000, None),
        ("anthropic-messages", 0, 30000, True, None),
    ],
)
def test_request_class(
    api: str, tools: int, system_chars: int, max_tokens: Any, expected: str | None
) -> None:
    assert streams.request_class(api, tools, system_chars, max_tokens) == expected


# --- helpers ---------------------------------------------------------------------------------------------


@given(st.text(max_size=300), st.text(max_size=300))
def test_common_prefix_len_matches_commonprefix(a: str, b: str) -> None:
    assert streams.common_prefix_len(a, b) == len(os.path.commonprefix([a, b]))


@given(st.text(max_size=200), st.text(max_size=50), st.text(max_size=50))
def test_common_prefix_len_shared_head(head: str, x: str, y: str) -> None:
    assert streams.common_prefix_len(head + x, head + y) == len(head) + len(os.path.commonprefix([x, y]))


def test_mask_snippet_hides_letters_and_digits() -> None:
    assert streams.mask_snippet("Status: M src/app.py 2026-11-29 é") == "Aaaaaa: A aaa/aaa.aa 0000-00-00 a"


# --- verdicts and locations --------------------------------------------------------------------------------


def test_first_then_append_only_with_exact_counts() -> None:
    t = Tracker()
    r1 = observe(t, turn(1))
    assert (r1["class"], r1["verdict"], r1["diverged_at"], r1["cause"]) == ("main", "first", None, None)
    assert r1["common_prefix_messages"] == 0 and r1["reusable_chars"] == 0
    r2 = observe(t, turn(2))
    assert r2["stream"] == r1["stream"]
    assert (r2["verdict"], r2["diverged_at"], r2["cause"]) == ("append-only", None, None)
    assert r2["common_prefix_messages"] == 1 and len(r2["chain"]) == 3
    assert r2["reusable_chars"] == r2["system_chars"] + r2["tools_chars"] + r2["message_chars"][0]
    assert r2["reusable_tokens_est"] == r2["reusable_chars"] // 4
    r3 = observe(t, turn(3))
    assert (r3["verdict"], r3["common_prefix_messages"]) == ("append-only", 3)
    assert "tools_changed" not in r3 and r3["interleaved_side"] is False


def test_identical_retry_is_append_only() -> None:
    t = Tracker()
    observe(t, turn(2))
    r = observe(t, turn(2))
    assert (r["verdict"], r["common_prefix_messages"]) == ("append-only", 3)


def test_git_status_edit_names_system_offset_and_cause() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = with_git_edit(turn(3))
    r = observe(t, body)
    old_text = turn(2)["system"][2]["text"]
    expected = len(os.path.commonprefix([old_text, body["system"][2]["text"]]))
    assert old_text[:expected].endswith("src/app.py\n")  # the planted line follows
    # billing block dropped: the big block is system[1] of the forwarded body
    assert (r["verdict"], r["diverged_at"], r["cause"]) == ("changed", f"system[1]@{expected}", "git_status")
    assert r["common_prefix_messages"] == 0
    assert r["reusable_chars"] == len(samples.IDENTITY) + expected


def test_billing_in_observe_mode_is_the_cause_at_system_0() -> None:
    t = Tracker()
    observe_mode = pipeline.Settings(observe=True)
    observe(t, SESSION.request(1, cch_seed=1), settings=observe_mode)
    r = observe(t, SESSION.request(2, cch_seed=1), settings=observe_mode)
    line1 = samples.billing_line(cch=samples.cch_for(1001))
    line2 = samples.billing_line(cch=samples.cch_for(1002))
    offset = len(os.path.commonprefix([line1, line2]))
    assert offset >= line1.index("cch=") + 4
    assert (r["verdict"], r["diverged_at"], r["cause"]) == ("changed", f"system[0]@{offset}", "billing")
    assert r["reusable_chars"] == offset


def test_tool_added_names_the_tool() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = turn(3)
    extra = {"name": "mcp__jira__search", "description": "Search Jira.", "input_schema": {"type": "object"}}
    body["tools"].append(extra)
    r = observe(t, body)
    assert (r["verdict"], r["diverged_at"], r["cause"]) == ("changed", "tools", "tools")
    assert r["tools_changed"] == {"added": ["mcp__jira__search"], "removed": [], "changed": []}
    assert r["common_prefix_messages"] == 0
    tools = samples.tools()
    tools_chars = [len(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()) for x in tools]
    assert r["reusable_chars"] == r["system_chars"] + sum(tools_chars)


def test_tool_removed_changed_and_reordered() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = turn(3)
    body["tools"] = [x for x in body["tools"] if x["name"] != "Grep"]
    body["tools"][0]["description"] += " More."
    r = observe(t, body)
    assert r["tools_changed"] == {"added": [], "removed": ["Grep"], "changed": [body["tools"][0]["name"]]}
    assert r["reusable_chars"] == r["system_chars"]
    t2 = Tracker()
    observe(t2, turn(2))
    body = turn(3)
    body["tools"][0], body["tools"][1] = body["tools"][1], body["tools"][0]
    r = observe(t2, body)
    names = [x["name"] for x in body["tools"][:2]]
    assert r["tools_changed"] == {"added": [], "removed": [], "changed": names}


def test_system_and_tools_both_changed_reports_system_first_and_tools_changed() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = with_git_edit(turn(3))
    body["tools"] = body["tools"][1:]
    r = observe(t, body)
    assert r["diverged_at"].startswith("system[1]@") and r["cause"] == "git_status"
    assert r["tools_changed"]["removed"] == [turn(1)["tools"][0]["name"]]


def test_params_change() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = turn(3)
    body["thinking"] = {"type": "enabled", "budget_tokens": 4000}
    r = observe(t, body)
    assert (r["verdict"], r["diverged_at"], r["cause"], r["reusable_chars"]) == (
        "changed",
        "params",
        "params",
        0,
    )


def test_date_rollover_in_first_message() -> None:
    t = Tracker()
    first = observe(t, turn(3))
    body = turn(4)
    text = body["messages"][0]["content"][0]["text"]
    body["messages"][0]["content"][0]["text"] = text.replace("2026-11-29", "2026-11-30")
    r = observe(t, body)
    assert r["stream"] == first["stream"]  # still the same conversation
    assert (r["verdict"], r["diverged_at"], r["cause"]) == ("changed", "messages[0].content[0]", "date")
    assert r["common_prefix_messages"] == 0
    assert r["reusable_chars"] == r["system_chars"] + r["tools_chars"]


def test_reminder_change_in_history() -> None:
    t = Tracker()
    body = turn(3)
    body["messages"][2]["content"].append(
        {"type": "text", "text": "<system-reminder>\nTodo: 1 open\n</system-reminder>"}
    )
    observe(t, body)
    body = copy.deepcopy(body)
    body["messages"][2]["content"][1]["text"] = "<system-reminder>\nTodo: 0 open\n</system-reminder>"
    body["messages"].extend(samples.tool_round(3))
    r = observe(t, body)
    assert (r["diverged_at"], r["cause"], r["common_prefix_messages"]) == (
        "messages[2].content[1]",
        "reminder",
        2,
    )
    chars = r["message_chars"]
    block0 = len(
        json.dumps(body["messages"][2]["content"][0], sort_keys=True, separators=(",", ":")).encode()
    )
    assert r["reusable_chars"] == r["system_chars"] + r["tools_chars"] + chars[0] + chars[1] + block0


def thinking_session(turns: int) -> dict[str, Any]:
    body = turn(turns)
    for m in body["messages"]:
        if m["role"] == "assistant":
            m["content"].insert(
                0, {"type": "thinking", "thinking": "I should read the file.", "signature": "c2ln"}
            )
    return body


def test_thinking_dropped() -> None:
    t = Tracker()
    observe(t, thinking_session(3))
    body = thinking_session(4)
    del body["messages"][1]["content"][0]  # the template dropped the old reasoning
    r = observe(t, body)
    assert (r["verdict"], r["diverged_at"], r["cause"]) == (
        "changed",
        "messages[1].content[0]",
        "thinking_dropped",
    )
    assert r["common_prefix_messages"] == 1


def test_tool_result_cleared() -> None:
    t = Tracker()
    observe(t, turn(4))
    body = turn(5)
    body["messages"][4]["content"][0]["content"] = CLEARED_TOOL_RESULT
    r = observe(t, body)
    assert (r["verdict"], r["diverged_at"], r["cause"]) == (
        "changed",
        "messages[4].content[0]",
        "tool_result_cleared",
    )
    assert r["common_prefix_messages"] == 4


def test_other_history_edit_is_unknown() -> None:
    t = Tracker()
    observe(t, turn(4))
    body = turn(5)
    body["messages"][3]["content"][0]["text"] = "Step 2: reading another file."
    r = observe(t, body)
    assert (r["diverged_at"], r["cause"], r["common_prefix_messages"]) == (
        "messages[3].content[0]",
        "unknown",
        3,
    )


def test_history_shortened_and_role_changed() -> None:
    t = Tracker()
    observe(t, turn(4))
    r = observe(t, turn(2))  # rewound: the new prompt is a prefix of the old one
    assert (r["verdict"], r["diverged_at"], r["cause"], r["common_prefix_messages"]) == (
        "changed",
        "messages[3]",
        "unknown",
        3,
    )
    body = turn(3)
    body["messages"][2] = {"role": "assistant", "content": "Done."}
    r = observe(t, body)
    assert (r["diverged_at"], r["cause"]) == ("messages[2]", "unknown")


def test_cache_markers_only() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = turn(3)
    body["system"][1].pop("cache_control")
    body["tools"][-1]["cache_control"] = {"type": "ephemeral"}
    r = observe(t, body)
    assert (r["verdict"], r["diverged_at"], r["cause"], r["common_prefix_messages"]) == (
        "append-only",
        None,
        "cache_markers_only",
        3,
    )
    assert observe(t, turn(4))["cause"] == "cache_markers_only"  # moved back
    # the marker that moves to the last message every turn is not reported
    assert observe(t, turn(5))["cause"] is None


# --- streams ---------------------------------------------------------------------------------------------


def test_main_subagent_side_and_count_tokens_stay_apart() -> None:
    t = Tracker()
    main1 = observe(t, turn(1))
    side = observe(t, side_request())
    sub1 = observe(t, subagent_request(1))
    main2 = observe(t, turn(2))
    count_body = {"model": "m", "messages": [{"role": "user", "content": "foo"}], "tools": turn(1)["tools"]}
    count_body["metadata"] = turn(1)["metadata"]
    count = observe(t, count_body, path="/v1/messages/count_tokens")
    sub2 = observe(t, subagent_request(2))
    main3 = observe(t, turn(3))
    assert [r["class"] for r in (main1, side, sub1, main2, count, sub2, main3)] == [
        "main",
        "side",
        "subagent",
        "main",
        "count_tokens",
        "subagent",
        "main",
    ]
    assert main1["stream"] == main2["stream"] == main3["stream"]
    assert sub1["stream"] == sub2["stream"] != main1["stream"]
    assert side["stream"] not in (main1["stream"], sub1["stream"])
    assert (main2["verdict"], main3["verdict"], sub2["verdict"]) == ("append-only",) * 3
    assert count["verdict"] is None and count["diverged_at"] is None
    assert main2["interleaved_side"] is True and main3["interleaved_side"] is False
    assert sub2["interleaved_side"] is False


def test_count_tokens_never_becomes_a_baseline() -> None:
    t = Tracker()
    observe(t, turn(2))
    body = turn(3)
    body.pop("system")
    observe(t, body, path="/v1/messages/count_tokens")
    r = observe(t, turn(3))
    assert (r["verdict"], r["common_prefix_messages"]) == ("append-only", 3)


def test_sessions_are_separate_even_with_equal_prompts() -> None:
    t = Tracker()
    a = observe(t, turn(1), headers={"X-Claude-Code-Session-Id": "aaa"})
    b = observe(t, turn(1), headers={"X-Claude-Code-Session-Id": "bbb"})
    assert a["stream"] != b["stream"] and b["verdict"] == "first" and b["class"] == "main"


def test_without_session_requests_group_by_chain() -> None:
    t = Tracker()
    one = samples.Session(suffix="a01")
    two = samples.Session(suffix="a02", task="Write the release notes.")
    bodies = {}
    for name, s in (("one", one), ("two", two)):
        for k in (1, 2, 3):
            b = s.request(k)
            b.pop("metadata")
            bodies[name, k] = b
    r1 = observe(t, bodies["one", 1])
    r2 = observe(t, bodies["two", 1])
    r3 = observe(t, bodies["one", 2])
    r4 = observe(t, bodies["two", 2])
    assert r1["session"] is None  # the schema lists it: null when the client sent none
    assert r1["stream"] == r3["stream"] != r2["stream"] == r4["stream"]
    assert (r3["verdict"], r4["verdict"]) == ("append-only", "append-only")
    assert (r1["class"], r2["class"]) == ("main", "main")  # same system prompt: another main conversation


def test_lru_cap_forgets_oldest_stream() -> None:
    t = Tracker(cap=2)
    sessions = [{"X-Claude-Code-Session-Id": s} for s in ("a", "b", "c")]
    for h in sessions:
        observe(t, turn(1), headers=h)
    assert len(t) == 2
    assert observe(t, turn(2), headers=sessions[0])["verdict"] == "first"  # "a" was evicted
    assert observe(t, turn(2), headers=sessions[2])["verdict"] == "append-only"


def test_text_store_is_bounded() -> None:
    store = streams.TextStore(cap=2)
    for i in range(3):
        store.put(str(i), "x" * i)
    assert len(store) == 2 and store.get("0") is None and store.get("2") == "xx"


def test_offset_unknown_when_old_text_evicted_is_zero() -> None:
    t = Tracker(text_cap=0)
    observe(t, turn(2))
    r = observe(t, with_git_edit(turn(3)))
    assert r["diverged_at"] == "system[1]@0" and r["cause"] == "git_status"


def test_context_snippet_is_masked_and_opt_in() -> None:
    t = Tracker()
    observe(t, turn(2))
    r = observe(t, with_git_edit(turn(3)), context=True)
    ctx = r["context"]
    assert set(ctx) == {"old", "new"}
    assert "|" in ctx["new"] and not any(c.isalpha() and c not in "aA" for c in ctx["new"] + ctx["old"])
    assert ctx["new"].split("|")[1].startswith("A aaa/aaa.aa\n??")  # "M src/cli.py" masked
    assert ctx["old"].split("|")[1].startswith("?? aaaaa.aaa")
    t2 = Tracker()
    observe(t2, turn(2))
    assert "context" not in observe(t2, with_git_edit(turn(3)))


def test_concurrent_observe_is_safe() -> None:
    t = Tracker()
    bodies = [turn(k) for k in (1, 2, 3, 4)]
    errors: list[BaseException] = []
    results: dict[int, list[dict[str, Any]]] = {}

    def worker(n: int) -> None:
        try:
            results[n] = [observe(t, b, headers={"X-Claude-Code-Session-Id": f"s{n}"}) for b in bodies]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for rs in results.values():
        assert [r["verdict"] for r in rs] == ["first", "append-only", "append-only", "append-only"]
    rows = t.summary()
    assert len(rows) == 8 and all(r["requests"] == 4 and r["append_only"] == 3 for r in rows)


# --- statistics ------------------------------------------------------------------------------------------


def test_summary_rows_and_reset() -> None:
    t = Tracker()
    r1 = observe(t, turn(1))
    observe(t, side_request())
    observe(t, side_request(text="Another title"))
    r2 = observe(t, with_git_edit(turn(2)))
    r2.update(miss="client", cached_tokens=100, prompt_tokens=1000)
    t.outcome(r2)
    r3 = observe(t, with_git_edit(turn(3)))
    r3.update(miss="server", cached_tokens=10, prompt_tokens=1100)
    t.outcome(r3)
    rows = {r["class"]: r for r in t.summary()}
    main = rows["main"]
    assert main["stream"] == r1["stream"]
    assert (main["requests"], main["first"], main["append_only"], main["changed"]) == (3, 1, 1, 1)
    assert main["append_only_share"] == 0.5
    assert main["misses_by_cause"] == {"git_status": 1} and main["server_misses"] == 1
    assert (main["cached_tokens"], main["prompt_tokens"], main["interleaved_side"]) == (110, 2100, 1)
    assert rows["side"]["requests"] == 2 and rows["side"]["streams"] == 2
    t.reset()
    assert t.summary() == [] and len(t) == 0
    assert observe(t, turn(4))["verdict"] == "first"


# --- streams without a session header (issue 12, item 6) ---------------------------------------------------


def test_a_new_conversation_with_the_same_first_prompt_is_a_new_stream() -> None:
    """Behind a router no session id arrives; the second conversation's first request once joined the first
    conversation's stream as "changed at messages[1] (unknown)", a client-side miss that never happened."""
    t = Tracker()
    s = samples.Session()
    bodies = [s.request(k) for k in (1, 2, 3)]
    for b in bodies:
        b.pop("metadata")
    r1, r2, r3 = (observe(t, b) for b in bodies)
    assert (r2["verdict"], r3["verdict"]) == ("append-only", "append-only")
    again = observe(t, copy.deepcopy(bodies[0]))  # a new conversation, the same first prompt
    assert again["verdict"] == "first"
    assert again["stream"] != r1["stream"]
    assert again["diverged_at"] is None and again["cause"] is None
    assert again["nearest_stream"] == r1["stream"]  # it shares all of itself with that stream's start
    whole = again["system_chars"] + again["tools_chars"] + sum(again["message_chars"])
    assert again["reusable_chars"] == again["shareable_chars"] == whole
    assert r1["nearest_stream"] is None and r1["reusable_chars"] == 0
    # the first conversation goes on in its own stream
    r4 = observe(t, _no_meta(s.request(4)))
    assert (r4["stream"], r4["verdict"]) == (r1["stream"], "append-only")


def _no_meta(body: dict[str, Any]) -> dict[str, Any]:
    body.pop("metadata", None)
    return body


def test_a_rewind_that_keeps_an_assistant_turn_stays_in_its_stream() -> None:
    t = Tracker()
    s = samples.Session()
    first = observe(t, _no_meta(s.request(4)))
    r = observe(t, _no_meta(s.request(2)))
    assert (r["stream"], r["verdict"], r["diverged_at"]) == (first["stream"], "changed", "messages[3]")


def chat(text: str, key: str | None, answers: int = 0) -> dict[str, Any]:
    """An OpenAI Chat request as LiteLLM forwards Claude Code's (prompt_cache_key per conversation)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": samples.instructions(6000)},
        {"role": "user", "content": text},
    ]
    for i in range(answers):
        messages += [{"role": "assistant", "content": f"step {i}"}, {"role": "user", "content": f"go on {i}"}]
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("Bash", "Read", "Edit", "Grep")
    ]
    body: dict[str, Any] = {"model": "m", "max_tokens": 4096, "messages": messages, "tools": tools}
    if key is not None:
        body["prompt_cache_key"] = key
    return body


def analyse(a: Analyzer, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = a.request("POST", "127.0.0.1", "/v1/chat/completions", json.dumps(body).encode(), headers or {})
    assert r is not None
    return r.record


def test_litellm_prompt_cache_key_separates_conversations() -> None:
    a = Analyzer()
    a1 = analyse(a, chat("Fix the parser", "conv-a"))
    b1 = analyse(a, chat("Fix the parser", "conv-b"))
    a2 = analyse(a, chat("Fix the parser", "conv-a", answers=1))
    assert a1["session"] is not None and b1["session"] is not None and a1["session"] != b1["session"]
    assert b1["stream"] != a1["stream"] and b1["verdict"] == "first"
    assert (a2["stream"], a2["verdict"]) == (a1["stream"], "append-only")
    # the key itself is never logged, only a hash of it
    assert "conv-a" not in json.dumps(a1)


def test_a_session_header_wins_over_prompt_cache_key() -> None:
    r = analyse(Analyzer(), chat("Fix the parser", "conv-a"), {"X-Claude-Code-Session-Id": "s1"})
    assert r["session"] == pipeline.fingerprint_session("s1")
