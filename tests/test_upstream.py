from __future__ import annotations

import gzip
import json
from typing import Any

from stableprefix.demo.upstream import Upstream
from tests.support.helpers import post


def test_records_exact_bytes_and_simulates_a_one_slot_cache() -> None:
    with Upstream() as up:
        body: dict[str, Any] = {"system": "s" * 400, "messages": [{"role": "user", "content": "a"}]}
        status, resp = post(up.port, "/v1/messages?beta=true", body)
        assert status == 200 and json.loads(resp)["usage"]["cache_read_input_tokens"] == 0
        body["messages"].append({"role": "user", "content": "b"})
        usage = json.loads(post(up.port, "/v1/messages", body)[1])["usage"]
        assert usage["cache_read_input_tokens"] > 100 and usage["input_tokens"] < 20
        assert (
            up.received[0].body
            == json.dumps({"system": "s" * 400, "messages": [{"role": "user", "content": "a"}]}).encode()
        )
        assert up.received[0].path == "/v1/messages?beta=true"


def test_answers_in_each_api_shape_and_streams_sse() -> None:
    with Upstream() as up:
        chat = json.loads(post(up.port, "/v1/chat/completions", {"messages": []})[1])
        assert "cached_tokens" in chat["usage"]["prompt_tokens_details"] and "cache_n" in chat["timings"]
        resp = json.loads(post(up.port, "/v1/responses", {"input": "x"})[1])
        assert "cached_tokens" in resp["usage"]["input_tokens_details"]
        assert "prompt_eval_cached_count" in json.loads(post(up.port, "/api/chat", {"messages": []})[1])
        sse = post(up.port, "/v1/messages", {"messages": [], "stream": True})[1].decode()
        assert sse.startswith("event: message_start") and "message_stop" in sse


def test_gzip_body_is_decoded_for_the_cache_but_kept_raw() -> None:
    with Upstream() as up:
        post(up.port, "/v1/messages", {"messages": []}, gzip_body=True)
        got = up.received[-1]
        assert got.headers["content-encoding"] == "gzip"
        assert json.loads(got.decoded()) == {"messages": []} and gzip.decompress(got.body) == got.decoded()


def test_cache_markers_and_count_tokens_do_not_cost_reuse() -> None:
    with Upstream() as up:
        first = {"system": "s" * 400, "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]}]}  # fmt: skip
        post(up.port, "/v1/messages", first)
        post(up.port, "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "zzz"}]})
        again = {"system": "s" * 400, "messages": [{"role": "user", "content": "a"}]}  # marker moved away
        usage = json.loads(post(up.port, "/v1/messages", again)[1])["usage"]
        assert usage["input_tokens"] <= 1


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_anthropic_stream_events_in_protocol_order_and_usage_in_start_and_delta() -> None:
    with Upstream() as up:
        body = {"model": "m1", "system": "s" * 80, "messages": [], "stream": True}
        text = post(up.port, "/v1/messages", body)[1].decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    events = sse_data(text)
    assert [e["type"] for e in events] == names
    start = events[0]["message"]
    assert (start["type"], start["role"], start["model"], start["content"]) == (
        "message",
        "assistant",
        "m1",
        [],
    )
    assert start["usage"]["input_tokens"] == len(json.dumps("s" * 80) + json.dumps([])) // 4
    assert events[-2]["delta"]["stop_reason"] == "end_turn" and events[-2]["usage"]["output_tokens"] >= 1


def test_replier_answers_tool_use_and_openai_gets_the_text_only() -> None:
    call = {"type": "tool_use", "name": "Agent", "input": {"prompt": "p"}}
    with Upstream(replier=lambda path, body: [{"type": "text", "text": "hi"}, call]) as up:
        msg = json.loads(post(up.port, "/v1/messages", {"messages": []})[1])
        chat = json.loads(post(up.port, "/v1/chat/completions", {"messages": []})[1])
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][1]["input"] == {"prompt": "p"} and msg["content"][1]["name"] == "Agent"
    assert chat["choices"][0]["message"]["content"] == "hi"


def test_chat_stream_carries_usage_only_when_asked() -> None:
    with Upstream() as up:
        plain = sse_data(post(up.port, "/v1/chat/completions", {"messages": [], "stream": True})[1].decode())
        asked = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
        withu = sse_data(post(up.port, "/v1/chat/completions", asked)[1].decode())
    assert not any("usage" in c for c in plain) and "timings" in plain[-1]
    assert withu[-1]["choices"] == [] and withu[-1]["usage"]["prompt_tokens"] >= 1
    assert all(c["object"] == "chat.completion.chunk" for c in plain + withu)


def test_ollama_streams_ndjson_when_asked() -> None:
    with Upstream() as up:
        lines = post(up.port, "/api/chat", {"messages": [], "stream": True})[1].decode().splitlines()
        gen = json.loads(post(up.port, "/api/generate", {"prompt": "x"})[1])
    objs = [json.loads(line) for line in lines]
    assert "".join(o["message"]["content"] for o in objs) == "ok done"
    assert [o["done"] for o in objs][-1] is True and "prompt_eval_cached_count" in objs[-1]
    assert gen["response"] == "ok done" and gen["done"] is True


def test_string_content_and_one_marked_text_block_render_alike() -> None:
    with Upstream() as up:
        listed = {"role": "system", "content": [{"type": "text", "text": "e" * 400, "cache_control": {"type": "ephemeral"}}]}  # fmt: skip
        post(up.port, "/v1/messages", {"messages": [{"role": "user", "content": "a"}, listed]})
        plain = {"role": "system", "content": "e" * 400}
        usage = json.loads(post(up.port, "/v1/messages", {"messages": [{"role": "user", "content": "a"}, plain]})[1])["usage"]  # fmt: skip
    assert usage["input_tokens"] == 0 and usage["cache_read_input_tokens"] > 100
