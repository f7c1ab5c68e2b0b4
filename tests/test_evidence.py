"""Server cache evidence from JSON bodies and SSE/NDJSON streams."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest

from stableprefix.core import evidence
from stableprefix.core.evidence import Evidence
from stableprefix.core.evidence import SSEParser

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (  # Anthropic: input_tokens is the uncached part only
            {
                "usage": {
                    "input_tokens": 26,
                    "cache_read_input_tokens": 18204,
                    "cache_creation_input_tokens": 0,
                }
            },
            Evidence("anthropic-usage", 18230, 18204),
        ),
        (
            {
                "usage": {
                    "input_tokens": 10,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 5000,
                }
            },
            Evidence("anthropic-usage", 5010, 0),
        ),
        (  # OpenAI Chat (vLLM, llama.cpp without timings)
            {
                "usage": {
                    "prompt_tokens": 3810,
                    "completion_tokens": 2,
                    "prompt_tokens_details": {"cached_tokens": 3795},
                }
            },
            Evidence("openai-usage", 3810, 3795),
        ),
        (  # llama.cpp: timings win over usage
            {
                "usage": {"prompt_tokens": 3810, "prompt_tokens_details": {"cached_tokens": 3700}},
                "timings": {"cache_n": 3795, "prompt_n": 15},
            },
            Evidence("llama-timings", 3810, 3795),
        ),
        (  # OpenAI Responses
            {
                "usage": {
                    "input_tokens": 2006,
                    "input_tokens_details": {"cached_tokens": 1920},
                    "output_tokens": 5,
                }
            },
            Evidence("openai-usage", 2006, 1920),
        ),
        (
            {"prompt_eval_count": 5120, "prompt_eval_cached_count": 4096, "done": True},
            Evidence("ollama", 5120, 4096),
        ),
        # a prompt size but no cache figure: unknown, not a miss
        ({"prompt_eval_count": 5120, "done": True}, Evidence(None, 5120, None)),
        ({"usage": {"input_tokens": 300, "output_tokens": 3}}, Evidence(None, 300, None)),
        ({"usage": {"prompt_tokens": 300, "completion_tokens": 3}}, Evidence(None, 300, None)),
        ({"input_tokens": 300}, None),  # count_tokens answer
        ({"usage": {"prompt_tokens": "many", "prompt_tokens_details": {"cached_tokens": -1}}}, None),
    ],
)
def test_json_bodies(body: dict, expected: Evidence | None) -> None:
    assert evidence.from_body(json.dumps(body).encode()) == expected


def test_as_record_names_source_only_with_a_cache_figure() -> None:
    assert Evidence("ollama", 10, 4).as_record() == {
        "cached_tokens": 4,
        "prompt_tokens": 10,
        "evidence": "ollama",
    }
    assert Evidence(None, 10, None).as_record() == {
        "cached_tokens": None,
        "prompt_tokens": 10,
        "evidence": None,
    }


@pytest.mark.parametrize("body", [None, b"", b"not json", b"[1,2]", b"\xff\xfe", b'{"usage": 5}'])
def test_bodies_without_evidence(body: bytes | None) -> None:
    assert evidence.from_body(body) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("div_anthropic_sse.txt", Evidence("anthropic-usage", 18230, 18204)),
        ("div_llama_chat_sse.txt", Evidence("llama-timings", 3810, 3795)),
        ("div_responses_sse.txt", Evidence("openai-usage", 2006, 1920)),
        ("div_ollama_chat.ndjson", Evidence("ollama", 5120, 4096)),
    ],
)
def test_streams_whole_and_split_at_every_byte(name: str, expected: Evidence) -> None:
    data = fixture(name)
    assert evidence.from_body(data) == expected
    for cut in range(0, len(data), 7):
        p = SSEParser()
        p.feed(data[:cut])
        p.feed(data[cut:])
        assert p.finish() == expected, cut
    p = SSEParser()
    for i in range(len(data)):
        p.feed(data[i : i + 1])
    assert p.finish() == expected


def test_crlf_lines_and_no_trailing_newline() -> None:
    data = fixture("div_anthropic_sse.txt").replace(b"\n", b"\r\n").rstrip()
    assert evidence.from_body(data) == Evidence("anthropic-usage", 18230, 18204)


def test_message_delta_values_override_message_start() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 0}}}
    delta = {"type": "message_delta", "usage": {"input_tokens": 26, "cache_read_input_tokens": 18204}}
    stream = f"event: message_start\ndata: {json.dumps(start)}\n\nevent: message_delta\ndata: {json.dumps(delta)}\n\n"
    assert evidence.from_body(stream.encode()) == Evidence("anthropic-usage", 18230, 18204)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_streams(encoding: str) -> None:
    data = fixture("div_anthropic_sse.txt")
    packed = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    p = SSEParser(encoding)
    for i in range(0, len(packed), 5):
        p.feed(packed[i : i + 5])
    assert p.finish() == Evidence("anthropic-usage", 18230, 18204)


def test_unsupported_or_broken_encoding_gives_nothing_and_never_raises() -> None:
    p = SSEParser("br")
    p.feed(fixture("div_anthropic_sse.txt"))
    assert p.finish() is None
    p = SSEParser("gzip")
    p.feed(b"definitely not gzip")
    p.feed(b"more")
    assert p.finish() is None


def test_overlong_line_is_dropped_and_parsing_resumes() -> None:
    p = SSEParser()
    p.feed(b"data: " + b"x" * (evidence.MAX_LINE + 10))
    p.feed(b"y" * 100 + b"\n\n")
    p.feed(fixture("div_llama_chat_sse.txt"))
    assert p.finish() == Evidence("llama-timings", 3810, 3795)
    assert len(p._buf) == 0


def test_bad_json_line_is_counted_not_raised() -> None:
    p = SSEParser()
    p.feed(b'data: {"usage": {"prompt_tokens": 4,\n\n')
    assert p.finish() is None and p.errors == 1


# --- a usage block that cannot be true is no figure (issue 12, item 6) -----------------------------------

ROUTER_SSE = (  # claude-code-router 2.0.0 in front of llama-server: every answer carries 0/0
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"m","role":"assistant","usage":'
    b'{"input_tokens":0,"output_tokens":0,"cache_read_input_tokens":0}}}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":'
    b'{"input_tokens":0,"output_tokens":12,"cache_read_input_tokens":0}}\n\n'
)


@pytest.mark.parametrize(
    "body",
    [
        ROUTER_SSE,
        json.dumps({"usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 5}}).encode(),
        json.dumps({"usage": {"prompt_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}}).encode(),
        json.dumps({"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}}}).encode(),
    ],
)
def test_an_impossible_usage_block_is_no_figure(body: bytes) -> None:
    ev = evidence.from_body(body)
    assert ev is not None
    assert (ev.source, ev.cached_tokens) == (None, None)
    assert ev.ignored is not None and "not a figure" in ev.ignored
    rec = ev.as_record()
    assert rec["evidence"] is None and rec["cached_tokens"] is None and "evidence_ignored" in rec


def test_a_router_zero_usage_is_unknown_not_a_server_miss() -> None:
    """Before the fix an append-only turn answered with 0/0 read "server reused 0/0, server-side miss"."""
    from stableprefix.core import pipeline
    from stableprefix.core.analyzer import Analyzer
    from stableprefix.core.record import log_line
    from stableprefix.demo import samples

    a = Analyzer(pipeline.Settings())
    s = samples.Session()
    recs = []
    for t in (1, 2):
        r = a.request("POST", "127.0.0.1", "/v1/messages", json.dumps(s.request(t)).encode(), {})
        assert r is not None
        feed = a.sse_parser(r.record, {"content-type": "text/event-stream"}, 200)
        feed.feed(ROUTER_SSE)
        recs.append(feed.finish())
    assert recs[1]["verdict"] == "append-only"
    assert recs[1]["miss"] == "unknown"
    assert recs[1]["cached_tokens"] is None and recs[1]["prompt_tokens"] is None
    line = log_line(recs[1])
    assert "server reused 0" not in line and "server-side miss" not in line
    assert "not plausible" in line
