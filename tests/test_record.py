"""The record's log line, flow comment, summary lines and JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stableprefix.core import record as rec


def base(**kw: Any) -> dict[str, Any]:
    r = {
        "v": 2,
        "state": "answered" if "status" in kw else "sent",
        "api": "anthropic-messages",
        "path": "/v1/messages",
        "changed": {"billing": 1},
        "prefix_hash": "a1b2c3d4e5f6a7b8c9d0",
        "chain": ["x"] * 15,
        "class": "main",
        "verdict": "append-only",
        "common_prefix_messages": 14,
        "diverged_at": None,
        "cause": None,
    }
    r.update(kw)
    return r


def test_log_line_append_only_with_server_reuse() -> None:
    r = base(status=200, cached_tokens=18204, prompt_tokens=18230, evidence="anthropic-usage", miss=None)
    assert rec.log_line(r) == (
        "main a1b2c3d4e5f6 append-only 14/15 msgs, server reused 18,204/18,230 (anthropic-messages, changed billing=1)"
    )


def test_log_line_changed_client_miss() -> None:
    r = base(
        verdict="changed",
        common_prefix_messages=0,
        diverged_at="system[1]@8690",
        cause="git_status",
        status=200,
        cached_tokens=2171,
        prompt_tokens=9000,
        miss="client",
    )
    assert rec.log_line(r) == (
        "main a1b2c3d4e5f6 changed at system[1]@8690 (git_status) 0/15 msgs, server reused 2,171/9,000, "
        "client-side miss (anthropic-messages, changed billing=1)"
    )


def test_log_line_tools_server_and_unknown() -> None:
    r = base(
        verdict="changed",
        diverged_at="tools",
        cause="tools",
        common_prefix_messages=0,
        tools_changed={"added": ["mcp__jira__search"], "removed": [], "changed": ["Bash", "Read"]},
        changed={},
    )
    assert rec.log_line(r) == (
        "main a1b2c3d4e5f6 changed at tools (tools) [tools added mcp__jira__search; changed Bash,Read] 0/15 msgs "
        "(anthropic-messages, unchanged)"
    )
    r = base(status=200, cached_tokens=6, prompt_tokens=9000, miss="server", interleaved_side=True)
    assert rec.log_line(r).endswith(
        "server reused 6/9,000, server-side miss, side request interleaved (anthropic-messages, changed billing=1)"
    )
    r = base(status=200, cached_tokens=None, prompt_tokens=900, miss="unknown", changed={}, passthrough=True)
    assert rec.log_line(r) == (
        "main a1b2c3d4e5f6 append-only 14/15 msgs, server: 900 prompt tokens, no cache figure, "
        "server reported nothing (anthropic-messages, passthrough, unchanged)"
    )
    r = base(
        status=502, cached_tokens=None, prompt_tokens=None, miss=None, changed={}, would_change={"billing": 1}
    )
    assert rec.log_line(r) == (
        "main a1b2c3d4e5f6 append-only 14/15 msgs, server: HTTP 502, no cache figure "
        "(anthropic-messages, observe: would change billing=1)"
    )


def test_log_line_first_count_tokens_no_response_and_legacy() -> None:
    assert rec.log_line(base(verdict="first", chain=["x"])) == (
        "main a1b2c3d4e5f6 first 1 msgs (anthropic-messages, changed billing=1)"
    )
    r = base(
        api="anthropic-count-tokens", **{"class": "count_tokens"}, verdict=None, status=200, cached_tokens=None, prompt_tokens=None
    )  # fmt: skip
    assert rec.log_line(r) == "count_tokens a1b2c3d4e5f6 15 msgs (anthropic-count-tokens, changed billing=1)"
    r = base(status=None, error="no response: refused")
    assert (
        rec.log_line(r)
        == "main a1b2c3d4e5f6 append-only 14/15 msgs, no response (anthropic-messages, changed billing=1)"
    )
    legacy = {"api": "anthropic-messages", "removed": {"billing": 1}, "prefix_hash": "0123456789abcdef"}
    assert rec.log_line(rec.upgrade(legacy)) == "anthropic-messages changed billing=1 prefix 0123456789ab"
    bad = {"api": "anthropic-messages", "path": "/v1/messages", "error": "JSONDecodeError: x"}
    assert rec.log_line(bad) == "anthropic-messages /v1/messages left unchanged (JSONDecodeError: x)"


def test_append_only_with_cause_shows_it() -> None:
    assert rec.verdict_text(base(cause="cache_markers_only")) == "append-only 14/15 msgs (cache_markers_only)"


def test_comment() -> None:
    assert rec.comment(base()) == "stableprefix: main append-only"
    assert rec.comment(
        base(verdict="changed", diverged_at="messages[0].content[0]", cause="date", miss="client")
    ) == ("stableprefix: main changed at messages[0].content[0] (date); client-side miss")
    assert rec.comment(base(miss="server")) == "stableprefix: main append-only; server-side miss"
    assert rec.comment(base(**{"class": "count_tokens"}, verdict=None)) == "stableprefix: count_tokens"


def test_summary_lines() -> None:
    assert rec.summary_lines([]) == ["stableprefix summary: no requests seen"]
    rows = [
        {
            "stream": "10ebc0a2",
            "class": "main",
            "session": "5b0f7bbc5c80",
            "streams": 1,
            "requests": 9,
            "first": 1,
            "append_only": 6,
            "changed": 2,
            "append_only_share": 0.75,
            "misses_by_cause": {"date": 1, "git_status": 1},
            "server_misses": 1,
            "unknown": 0,
            "cached_tokens": 51234,
            "prompt_tokens": 80000,
            "interleaved_side": 1,
        },
        {
            "stream": "side:5b0f7bbc5c80",
            "class": "side",
            "session": "5b0f7bbc5c80",
            "streams": 2,
            "requests": 2,
            "first": 2,
            "append_only": 0,
            "changed": 0,
            "append_only_share": None,
            "misses_by_cause": {},
            "server_misses": 0,
            "unknown": 2,
            "cached_tokens": 0,
            "prompt_tokens": 0,
            "interleaved_side": 0,
        },
    ]
    assert rec.summary_lines(rows) == [
        "stableprefix summary: 2 stream(s)",
        "  main 10ebc0a2 session 5b0f7bbc5c80: 9 requests, append-only 6/8 (75%), client misses date=1 git_status=1, "
        "server misses 1, server reused 51,234/80,000 tokens, side requests interleaved 1x",
        "  side side:5b0f7bbc5c80 session 5b0f7bbc5c80: 2 requests, 2 streams, no cache figures 2",
    ]


# --- the schema --------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "record.md"


def test_the_documented_fields_are_the_type() -> None:
    documented = [
        line.split("|")[1].strip().strip("`") for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    ]  # fmt: skip
    assert documented == list(rec.Record.__annotations__)


def test_a_full_record_fits_the_type() -> None:
    from stableprefix.core.analyzer import Analyzer
    from stableprefix.demo import samples

    a = Analyzer()
    body = json.dumps(samples.Session().request(1)).encode()
    result = a.request("POST", "h", "/v1/messages", body, {"x-claude-code-session-id": "s"})
    assert result is not None
    assert result.record["state"] == "sent" and result.record["v"] == rec.VERSION == 2
    usage = b'{"usage": {"input_tokens": 10, "cache_read_input_tokens": 5}}'
    r = a.response({"ts": 1.0, "id": "f", **result.record}, 200, {}, usage)
    assert r["state"] == "answered"
    assert set(r) <= set(rec.Record.__annotations__), set(r) - set(rec.Record.__annotations__)
    simple = {int: int, float: float, str: str, bool: bool}
    for key, value in r.items():
        kind = rec.Record.__annotations__[key]
        if kind in simple:
            assert isinstance(value, simple[kind]), (key, value)
    assert r["changed"] == {"billing": 1} and r["actions"] == {"billing": "drop"}


def test_upgrade_reads_a_v1_record() -> None:
    v1 = {
        "api": "anthropic-messages",
        "class": "main",
        "removed": {"billing": 1},
        "would_remove": {},
        "status": 200,
    }
    up = rec.upgrade(v1)
    assert (up["v"], up["state"], up["changed"], up["would_change"]) == (2, "answered", {"billing": 1}, {})
    assert "removed" not in up
