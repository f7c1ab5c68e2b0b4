"""A stream's first request against the nearest earlier stream, and the rules' savings as a counterfactual
(issue 12, items 1 and 2). Pure core: the Analyzer over Claude-Code-shaped requests."""

from __future__ import annotations

import json
import os.path
import tracemalloc
from typing import Any

import pytest

from stableprefix.core import fingerprint as fingerprint_module
from stableprefix.core import pipeline
from stableprefix.core import record as records
from stableprefix.core import streams
from stableprefix.core.analyzer import Analyzer
from stableprefix.core.fingerprint import detail
from stableprefix.core.fingerprint import fingerprint
from stableprefix.core.shapes import Parts
from stableprefix.demo import samples

ONE = samples.Session(suffix="a01", task="Find why the parser drops the last token and fix it.")
TWO = samples.Session(suffix="b02", task="Write the release notes for version 2.")
BILLING_CHARS = len(samples.billing_line(suffix="a01", cch="00000"))


def send(a: Analyzer, body: dict[str, Any], host: str = "127.0.0.1") -> dict[str, Any]:
    r = a.request("POST", host, "/v1/messages", json.dumps(body).encode(), {})
    assert r is not None and not r.warning
    return r.record


def test_the_second_conversation_names_billing_in_observe_mode() -> None:
    a = Analyzer(pipeline.Settings(observe=True))
    one = [send(a, ONE.request(t)) for t in (1, 2, 3)]
    two = send(a, TWO.request(1))
    assert two["verdict"] == "first" and two["stream"] != one[0]["stream"]
    assert two["nearest_stream"] == one[0]["stream"]
    # both headers read "x-anthropic-billing-header: cc_version=2.1.39." then the suffix differs
    prefix = "x-anthropic-billing-header: cc_version=2.1.39."
    assert two["diverged_at"] == f"system[0]@{len(prefix)}"
    assert two["cause"] == "billing"
    assert two["reusable_chars"] == len(prefix)
    # with the header equal, the system texts and the tools would be shared (the first messages differ)
    assert two["shareable_chars"] == two["system_chars"] + two["tools_chars"]
    line = records.log_line(two)
    assert f"diverged at system[0]@{len(prefix)} (billing;" in line
    assert f"with stream {one[0]['stream'][:8]}" in line
    assert "billing" in records.comment(two) and "shares" in records.comment(two)


def test_the_second_conversation_shares_system_and_tools_in_active_mode() -> None:
    a = Analyzer(pipeline.Settings())
    first = send(a, ONE.request(1))
    two = send(a, TWO.request(1))
    assert two["nearest_stream"] == first["stream"]
    head = two["system_chars"] + two["tools_chars"]
    # the reminder block (content[0]) is shared too; the task text (content[1]) differs
    assert head < two["reusable_chars"] < head + two["message_chars"][0]
    assert two["diverged_at"] == "messages[0].content[1]" and two["cause"] == "conversation"


def test_a_subagent_names_system_and_tools() -> None:
    a = Analyzer(pipeline.Settings())
    main = send(a, ONE.request(2))
    sub = samples.Session(suffix="c03", task="Search the code base for callers of parse().", tool_count=6)
    body = sub.request(1)
    body["system"][2]["text"] = "You are an agent for Claude Code. " + samples.instructions(5000, seed=7)
    rec = send(a, body)
    assert rec["verdict"] == "first" and rec["nearest_stream"] == main["stream"]
    assert rec["diverged_at"] == "system[1]@0" and rec["cause"] == "system"  # billing block dropped
    assert rec["tools_changed"]["removed"]  # the subagent has fewer tools: their names are listed
    assert rec["reusable_chars"] == len(samples.IDENTITY)


def test_only_the_same_upstream_is_compared() -> None:
    a = Analyzer(pipeline.Settings())
    send(a, ONE.request(1), host="10.0.0.1")
    other = send(a, TWO.request(1), host="10.0.0.2")
    assert other["nearest_stream"] is None and other["reusable_chars"] == 0


def test_recent_heads_stay_bounded_over_10000_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory: every request a new conversation (another first prompt); what the tracker keeps is capped.
    The canonical memo (64 MB) and the chain steps (32,768) are bounded; small ones here, so that 5,000
    streams pass their caps."""
    monkeypatch.setattr(fingerprint_module, "_MEMO", fingerprint_module.CanonicalMemo(256 * 1024))
    monkeypatch.setattr(fingerprint_module, "_LINKS", {})
    monkeypatch.setattr(fingerprint_module, "LINKS_CAP", 1000)
    t = streams.Tracker()
    tools = [
        {"name": n, "input_schema": {"type": "object"}} for n in ("a", "b", "c")
    ]  # 3: not a side request

    def observe(i: int) -> dict[str, Any]:
        parts = Parts(["You are a helpful assistant."], tools, ["a", "b", "c"],
                      [{"role": "user", "content": f"question {i}"}], {"model": "m"})  # fmt: skip
        fp = fingerprint(parts)
        rec = {"host": "h", "api": "anthropic-messages", "session": None, **fp.as_record()}
        return t.observe(rec, detail(parts, None, fp), parts, 4096)

    tracemalloc.start()
    try:
        for i in range(5000):  # past every other cap (streams, stats rows, message cache)
            observe(i)
        half = tracemalloc.get_traced_memory()[0]
        for i in range(5000, 10_000):
            rec = observe(i)
        grown = tracemalloc.get_traced_memory()[0] - half
    finally:
        tracemalloc.stop()
    assert rec["verdict"] == "first" and rec["nearest_stream"] is not None
    assert rec["diverged_at"] == "messages[0].content[0]"
    assert t.recent_heads() <= streams.RECENT_CAP
    assert len(t) <= streams.STREAM_CAP
    assert grown < 2_000_000, grown  # 5,000 more streams, not 5,000 more heads


def test_the_content_view_shows_the_nearest_stream() -> None:
    from stableprefix.mitm import contentview

    a = Analyzer(pipeline.Settings(observe=True))
    first = send(a, ONE.request(1))
    two = send(a, TWO.request(1))
    text = contentview.render(two, {}, b"{}")
    assert f'nearest_stream: "{first["stream"]}"' in text
    assert 'cause: "billing"' in text and "shareable: " in text


# --- savings are a counterfactual (issue 12, item 2) ---------------------------------------------------------


def replay(observe: bool) -> list[dict[str, Any]]:
    """One recorded-like session: a conversation of 5 turns (cch changes per request), a second conversation
    of 3 turns, then the first one goes on; a date rule on as well (the date never changes here)."""
    rules = pipeline.Settings().rules
    a = Analyzer(pipeline.Settings(rules=rules, observe=observe))
    bodies = [ONE.request(t) for t in range(1, 6)] + [TWO.request(t) for t in (1, 2, 3)] + [ONE.request(6)]
    return [send(a, b) for b in bodies]


def test_observe_and_active_report_the_same_savings() -> None:
    active, observed = replay(False), replay(True)
    assert [r["changed"] for r in active] == [{"billing": 1}] * 9
    assert [r["would_change"] for r in observed] == [{"billing": 1}] * 9
    saved_active = [r["saved_chars"] for r in active]
    saved_observed = [r["saved_chars"] for r in observed]
    assert sum(saved_active) > 0
    assert abs(sum(saved_active) - sum(saved_observed)) <= 0.1 * sum(saved_active)
    assert saved_active == saved_observed  # the same comparison, made from either side
    assert {k for r in active for k in r["saved_by"]} == {"billing"}


def test_a_saving_is_what_the_rewrite_added_to_the_shared_prefix() -> None:
    active = replay(False)
    # turn 2: without the rule the per-request cch differs in system[0], so only the header's start up to
    # "cch=" is shared; with it the whole previous request is
    prev, turn2 = active[0], active[1]
    whole_prev = prev["system_chars"] + prev["tools_chars"] + sum(prev["message_chars"])
    head = os.path.commonprefix([ONE.request(1)["system"][0]["text"], ONE.request(2)["system"][0]["text"]])
    assert head.endswith("cch=") or "cch=" in head
    assert turn2["reusable_chars"] == whole_prev
    assert turn2["saved_chars"] == whole_prev - len(head)
    # the second conversation's first request: the suffix differs at cc_version=2.1.39.|a01 vs b02
    two = active[5]
    at = len("x-anthropic-billing-header: cc_version=2.1.39.")
    assert two["saved_chars"] == two["reusable_chars"] - at
    # a request the rules did not change and whose previous request they did not change saves nothing
    plain = Analyzer(pipeline.Settings())
    body = ONE.request(1)
    body["system"] = body["system"][1:]
    assert send(plain, body)["saved_chars"] == 0


def test_when_the_prefix_was_stable_anyway_the_rules_saved_nothing() -> None:
    """Claude Code >= 2.1.181 to a custom base URL: no cch, the header is stable inside a conversation.
    Dropping it keeps nothing reusable that was not reusable already (the old report said "up to ...")."""
    s = samples.Session(suffix="d04", with_cch=False)
    a = Analyzer(pipeline.Settings())
    recs = [send(a, s.request(t)) for t in (1, 2, 3)]
    assert [r["changed"] for r in recs] == [{"billing": 1}] * 3
    assert [r["saved_chars"] for r in recs[1:]] == [0, 0]


def test_the_log_line_scales_the_shared_prefix_by_the_servers_prompt_size() -> None:
    """SmolLM2's template does not render the tools: the server counts far fewer tokens than chars / 4."""
    a = Analyzer(pipeline.Settings(observe=True))
    send(a, ONE.request(1))
    two = send(a, TWO.request(1))
    total = two["system_chars"] + two["tools_chars"] + sum(two["message_chars"])
    two = {**two, "state": "answered", "status": 200, "prompt_tokens": 4000, "cached_tokens": 25}
    more = two["shareable_chars"] - two["reusable_chars"]
    assert f"~{round(more * 4000 / total):,} tokens more if stable" in records.log_line(two)
