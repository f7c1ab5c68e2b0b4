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
