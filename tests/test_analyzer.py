"""The Analyzer: the core object the addon and the offline report share (no mitmproxy)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from stableprefix.core import analyzer as an
from stableprefix.core import pipeline
from stableprefix.core.analyzer import Analyzer
from stableprefix.demo import samples

FIXTURES = Path(__file__).parent / "fixtures"
SESSION = samples.Session(task="SENTINEL-TASK-TEXT: fix the parser.")
PATH = "/v1/messages?beta=true"
REQUEST_FIELDS = [
    "v",
    "state",
    "host",
    "path",
    "api",
    "rewritten",
    "changed",
    "actions",
    "billing",
    "session",
    "system_hash",
    "tools_hash",
    "tool_names",
    "params_hash",
    "prefix_hash",
    "chain",
    "system_chars",
    "tools_chars",
    "message_chars",
    "stream",
    "class",
    "verdict",
    "common_prefix_messages",
    "diverged_at",
    "cause",
    "reusable_chars",
    "reusable_tokens_est",
    "interleaved_side",
    "interleaved_other",
    "nearest_stream",
    "shareable_chars",
    "saved_chars",
    "saved_by",
]
RESPONSE_FIELDS = ["status", "cached_tokens", "prompt_tokens", "evidence", "miss", "server_miss_class"]


def send(
    a: Analyzer, body: dict[str, Any] | bytes, path: str = PATH, headers: dict[str, str] | None = None
) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return a.request("POST", "127.0.0.1", path, raw, headers or {})


def usage_body(cached: int, fresh: int) -> bytes:
    return json.dumps({"usage": {"input_tokens": fresh, "cache_read_input_tokens": cached}}).encode()


def test_request_and_response_fields_are_the_schema_in_order() -> None:
    a = Analyzer()
    result = send(a, SESSION.request(1))
    assert list(result.record) == REQUEST_FIELDS
    record = a.response(result.record, 200, {}, usage_body(0, 8000))
    assert list(record) == REQUEST_FIELDS + RESPONSE_FIELDS
    assert (record["class"], record["verdict"], record["miss"]) == ("main", "first", None)
    assert (record["cached_tokens"], record["prompt_tokens"], record["evidence"]) == (
        0,
        8000,
        "anthropic-usage",
    )
    result = send(a, SESSION.request(2))
    record = a.response(result.record, 200, {}, usage_body(7990, 300))
    assert (record["verdict"], record["common_prefix_messages"], record["miss"]) == ("append-only", 1, None)
    json.dumps(record)  # JSON-able


def test_records_never_carry_prompt_text() -> None:
    a = Analyzer(log_context=True)
    send(a, SESSION.request(2))
    body = SESSION.request(3)
    body["messages"][1]["content"][0]["text"] = "SENTINEL-EDIT changed history"
    rec = send(a, body).record
    assert rec["diverged_at"] == "messages[1].content[0]" and "context" in rec
    text = json.dumps(rec)
    for secret in ("SENTINEL", "parser", "Claude", "x-anthropic", "src/app.py", "Step"):
        assert secret not in text
    assert rec["context"] == {"new": "|AAAAAAAA-AAAA aaaaaaa aaaaaaa"}  # the block's start, masked


def test_log_context_off_by_default() -> None:
    a = Analyzer()
    send(a, SESSION.request(2))
    body = SESSION.request(3)
    body["messages"][1]["content"][0]["text"] = "edited"
    assert "context" not in send(a, body).record


def test_malformed_body_gets_no_stream_fields() -> None:
    a = Analyzer()
    result = send(a, b'{"model": "m", "messages": [')
    assert result.warning and result.forward is None
    assert "stream" not in result.record and "error" in result.record
    assert a.summary() == []


def test_not_an_llm_request() -> None:
    assert Analyzer().request("GET", "h", "/v1/messages", b"", {}) is None
    assert Analyzer().request("POST", "h", "/v1/models", b"{}", {}) is None


def test_observe_mode_still_tracks_streams() -> None:
    a = Analyzer(pipeline.Settings(observe=True))
    r1 = send(a, SESSION.request(1)).record
    r2 = send(a, SESSION.request(2)).record
    assert r1["would_change"] == {"billing": 1} and r1["changed"] == {}
    assert (r2["verdict"], r2["cause"]) == ("changed", "billing")
    assert r2["diverged_at"].startswith("system[0]@")


def test_count_tokens_record() -> None:
    a = Analyzer()
    body = {"model": "m", "messages": [{"role": "user", "content": "foo"}], "tools": samples.tools(3)}
    rec = send(a, body, "/v1/messages/count_tokens").record
    assert (rec["class"], rec["verdict"]) == ("count_tokens", None)
    rec = a.response(rec, 200, {}, b'{"input_tokens": 1234}')
    assert (rec["miss"], rec["cached_tokens"], rec["evidence"]) == (None, None, None)


# --- miss classification ----------------------------------------------------------------------------------


def rec(**kw: Any) -> dict[str, Any]:
    base = {
        "class": "main",
        "verdict": "append-only",
        "status": 200,
        "reusable_chars": 40000,
        "system_chars": 30000,
        "tools_chars": 8000,
        "message_chars": [2000],
        "cached_tokens": 0,
        "prompt_tokens": 10000,
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    ("fields", "miss"),
    [
        ({"cached_tokens": 8000}, None),  # expected 10,000: shortfall 2,000 is not > 2,000
        ({"cached_tokens": 7999}, "server"),
        ({"cached_tokens": 10000}, None),
        ({"cached_tokens": None, "prompt_tokens": None}, "unknown"),
        ({"cached_tokens": None, "prompt_tokens": 10000}, "unknown"),
        ({"verdict": "changed", "cached_tokens": 9999}, "client"),
        ({"verdict": "first"}, None),
        ({"class": "count_tokens", "verdict": None}, None),
        ({"status": 500}, None),
        ({"status": None}, None),
        ({"class": None}, None),
        # small prompt (expected 1,000): the token floor shrinks to 25 %
        ({"prompt_tokens": 1000, "cached_tokens": 750}, None),
        ({"prompt_tokens": 1000, "cached_tokens": 749}, "server"),
        # big prompt (expected 100,000): 5 % decides
        ({"prompt_tokens": 100000, "cached_tokens": 95000}, None),
        ({"prompt_tokens": 100000, "cached_tokens": 94999}, "server"),
        # half the prompt reusable (expected 5,000 of 10,000 server tokens)
        ({"reusable_chars": 20000, "cached_tokens": 3750}, None),
        ({"reusable_chars": 20000, "cached_tokens": 3749}, "server"),
    ],
)
def test_classify_miss(fields: dict[str, Any], miss: str | None) -> None:
    assert an.classify_miss(rec(**fields)) == miss


def test_expected_cached() -> None:
    assert an.expected_cached(rec()) == 10000
    assert an.expected_cached(rec(reusable_chars=10000)) == 2500
    assert an.expected_cached(rec(prompt_tokens=None)) == 10000  # chars / 4
    assert an.expected_cached(rec(prompt_tokens=None, reusable_chars=4003)) == 1000
    assert an.expected_cached(rec(reusable_chars=99999)) == 10000  # never above the prompt


def side_request() -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "Generate a concise title for this conversation."}],
        "messages": [{"role": "user", "content": "Fix the parser."}],
        "metadata": SESSION.request(1)["metadata"],
    }


def test_interleaved_side_request_then_server_miss_warns_once() -> None:
    a = Analyzer()
    r1 = send(a, SESSION.request(1)).record
    a.response(r1, 200, {}, usage_body(0, 8000))
    side = send(a, side_request()).record
    assert side["class"] == "side"
    a.response(side, 200, {}, usage_body(6, 20))
    r2 = send(a, SESSION.request(2)).record
    assert r2["interleaved_side"] is True
    r2 = a.response(r2, 200, {}, usage_body(6, 8300))
    assert r2["miss"] == "server"
    notices = a.pop_notices()
    assert len(notices) == 1
    for word in ("--parallel", "--cache-ram", "route side requests", "6 of ~"):
        assert word in notices[0]
    assert a.pop_notices() == []
    send(a, side_request())
    r3 = a.response(send(a, SESSION.request(3)).record, 200, {}, usage_body(6, 8600))
    assert r3["miss"] == "server" and a.pop_notices() == []  # once
    rows = {r["class"]: r for r in a.summary()}
    assert rows["main"]["server_misses"] == 2 and rows["main"]["interleaved_side"] == 2
    assert rows["side"]["requests"] == 2
    a.reset()
    assert a.summary() == []
    a.response(send(a, SESSION.request(1)).record, 200, {}, usage_body(0, 8000))
    send(a, side_request())
    a.response(send(a, SESSION.request(2)).record, 200, {}, usage_body(6, 8300))
    assert len(a.pop_notices()) == 1  # warned again after a reset


def test_server_miss_without_side_requests_does_not_warn() -> None:
    a = Analyzer()
    a.response(send(a, SESSION.request(1)).record, 200, {}, usage_body(0, 8000))
    r2 = a.response(send(a, SESSION.request(2)).record, 200, {}, usage_body(6, 8300))
    assert r2["miss"] == "server" and r2["interleaved_side"] is False
    assert a.pop_notices() == []


def test_sse_parser_completes_the_record() -> None:
    a = Analyzer()
    record = send(a, SESSION.request(1)).record
    p = a.sse_parser(record, {"Content-Type": "text/event-stream"}, 200)
    data = (FIXTURES / "div_anthropic_sse.txt").read_bytes()
    for i in range(0, len(data), 13):
        p.feed(data[i : i + 13])
    out = p.finish()
    assert out is record
    assert (out["status"], out["cached_tokens"], out["prompt_tokens"], out["evidence"]) == (
        200,
        18204,
        18230,
        "anthropic-usage",
    )
    assert p.finish() is record and a.summary()[0]["prompt_tokens"] == 18230  # counted once


def test_response_reads_concatenated_sse_text() -> None:
    a = Analyzer()
    record = send(a, SESSION.request(1)).record
    data = (FIXTURES / "div_llama_chat_sse.txt").read_bytes()
    out = a.response(record, 200, {}, data)
    assert (out["cached_tokens"], out["prompt_tokens"], out["evidence"]) == (3795, 3810, "llama-timings")


def test_error_record() -> None:
    a = Analyzer()
    record = send(a, SESSION.request(1)).record
    out = a.error(record, "Connection refused")
    assert out["status"] is None and out["error"] == "no response: Connection refused"
    assert (out["miss"], out["cached_tokens"], out["evidence"]) == (None, None, None)
    record = send(a, SESSION.request(2)).record
    out = a.error(record, "server closed connection", 502)
    assert (
        out["status"] == 502
        and out["error"] == "no response: server closed connection; the proxy answered 502"
    )


# --- before-state ------------------------------------------------------------------------------------------


def test_before_state_billing_drop() -> None:
    a = Analyzer()
    body = SESSION.request(1)
    result = send(a, body)
    before = an.before_state(result)
    line = body["system"][0]["text"]
    assert before["rules"] == {"billing": 1}
    assert before["changes"] == [{"path": "system[0]", "op": "removed", "chars": len(json.dumps(body["system"][0], sort_keys=True, separators=(",", ":")))}]  # fmt: skip
    assert before["system_hash"] != result.record["system_hash"]
    assert before["tools_hash"] == result.record["tools_hash"]
    assert line not in json.dumps(before)
    json.dumps(before)


def test_before_state_billing_pin_names_offset() -> None:
    from stableprefix.core import rules

    a = Analyzer(pipeline.Settings(rules=tuple(rules.builtin_rules("pin"))))
    body = SESSION.request(1)
    before = an.before_state(send(a, body))
    line = body["system"][0]["text"]
    assert before["changes"] == [
        {"path": "system[0].text", "op": "changed", "from_chars": len(line), "to_chars": len(line), "at": line.index(".c39") + 1}
    ]  # fmt: skip


def test_before_state_unchanged() -> None:
    a = Analyzer(pipeline.Settings(observe=True))
    assert an.before_state(send(a, SESSION.request(1))) == {"rules": {}, "changes": []}


def test_diff_json() -> None:
    out: list[dict[str, Any]] = []
    old = {"a": 1, "b": [1, 2, 3, 4], "c": "hello", "d": {"x": 1}}
    new = {"a": 2, "b": [1, 3, 4], "c": "help", "e": [1]}
    an.diff_json(old, new, "", out)
    assert out == [
        {"path": "a", "op": "changed"},
        {"path": "b[1]", "op": "removed", "chars": 1},
        {"path": "c", "op": "changed", "from_chars": 5, "to_chars": 4, "at": 3},
        {"path": "d", "op": "removed", "chars": 7},
        {"path": "e", "op": "added", "chars": 3},
    ]
    out = []
    an.diff_json([{"t": "a"}, {"t": "b"}], [{"t": "a"}, {"t": "x"}, {"t": "b"}], "m", out)
    assert out == [{"path": "m[1]", "op": "added", "chars": 9}]
    out = []
    an.diff_json(list(range(100)), list(range(1, 101)), "", out, limit=3)
    assert len(out) == 3
    out = []
    an.diff_json(copy.deepcopy(old), old, "", out)
    assert out == []
