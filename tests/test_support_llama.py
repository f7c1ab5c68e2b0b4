"""The pure helpers of stableprefix.llamaserver: /metrics parsing, usage, installer output, chat conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from stableprefix.demo import samples
from tests.support import llama as ls

METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1234
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens taken from the cache.
llamacpp:prompt_tokens_cached_total 5678
llamacpp:prompt_seconds_total 2.5e+00
llamacpp:requests_processing{slot="0"} 1 1700000000000
garbage line without value
llamacpp:broken notanumber
"""


def test_parse_metrics() -> None:
    m = ls.parse_metrics(METRICS)
    assert m["llamacpp:prompt_tokens_total"] == 1234
    assert m["llamacpp:prompt_tokens_cached_total"] == 5678
    assert m["llamacpp:prompt_seconds_total"] == 2.5
    assert m['llamacpp:requests_processing{slot="0"}'] == 1
    assert "llamacpp:broken" not in m and "garbage" not in m
    assert ls.parse_metrics("") == {}


def test_usage_of_each_response_shape() -> None:
    assert ls.usage_of({"usage": {"input_tokens": 18, "cache_read_input_tokens": 3791}}) == ls.Usage(3791, 18)
    assert ls.usage_of({"usage": {"input_tokens": 7}}) == ls.Usage(0, 7)
    chat = {"timings": {"cache_n": 38, "prompt_n": 3812}, "usage": {"prompt_tokens": 3850}}
    assert ls.usage_of(chat) == ls.Usage(38, 3812)
    assert ls.usage_of(chat).prompt == 3850
    openai = {"usage": {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 60}}}
    assert ls.usage_of(openai) == ls.Usage(60, 40)
    with pytest.raises(ValueError, match="no usage"):
        ls.usage_of({"content": []})


def test_parse_install_output() -> None:
    out = "noise\nLLAMA_SERVER=/c/llama/bin/llama-server\nLLAMA_MODEL=/c/llama/model/m.gguf\n"
    assert ls.parse_install_output(out) == (Path("/c/llama/bin/llama-server"), Path("/c/llama/model/m.gguf"))
    with pytest.raises(ValueError, match="LLAMA_SERVER"):
        ls.parse_install_output("LLAMA_SERVER=/x\n")


def test_locate_prefers_env_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.delenv("LLAMA_MODEL", raising=False)
    monkeypatch.setenv("STABLEPREFIX_CACHE", str(tmp_path))
    assert ls.locate() is None
    server = tmp_path / "llama" / "bin" / "llama-server"
    model = tmp_path / "llama" / "model" / ls.MODEL_NAME
    server.parent.mkdir(parents=True)
    model.parent.mkdir(parents=True)
    server.write_text("#!/bin/sh\n")
    model.write_bytes(b"GGUF")
    assert ls.locate() is None  # not executable
    server.chmod(0o755)
    assert ls.locate() == (server, model)
    monkeypatch.setenv("LLAMA_MODEL", str(tmp_path / "missing.gguf"))
    assert ls.locate() is None


def test_to_chat_flattens_system_like_a_router() -> None:
    body = samples.Session(system_chars=500, tool_count=3, result_chars=80).request(3)
    chat = ls.to_chat(body)
    system = chat["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("x-anthropic-billing-header: cc_version=2.1.39.c39;")
    assert system["content"] == "\n".join(b["text"] for b in body["system"])
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool"]
    call = chat["messages"][2]["tool_calls"][0]
    assert call["id"] == "toolu_0001" and call["function"]["name"] == "Read"
    assert chat["messages"][3]["tool_call_id"] == "toolu_0001"
    assert [t["function"]["name"] for t in chat["tools"]] == [t["name"] for t in body["tools"]]
    assert chat["stream"] is False and "system" not in chat


def test_side_request_is_small_and_toolless() -> None:
    side = ls.side_request(samples.Session(), 2, max_tokens=1)
    assert "tools" not in side and side["max_tokens"] == 1
    assert side["system"][0]["text"].startswith("x-anthropic-billing-header:")
