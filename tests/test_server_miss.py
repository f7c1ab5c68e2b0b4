"""Server-side misses by class (issue 12, item 3): what ran on the same upstream since the stream's previous
request says why the server did not reuse a prefix the client kept; the remedies name real settings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stableprefix.core import pipeline
from stableprefix.core import record as records
from stableprefix.core.analyzer import SERVER_MISS_REMEDY
from stableprefix.core.analyzer import Analyzer
from stableprefix.demo import samples

A = samples.Session(suffix="a01")
B = samples.Session(suffix="b02", task="Write the release notes.")


def run(a: Analyzer, body: dict[str, Any], cached: int, prompt: int = 9000) -> dict[str, Any]:
    r = a.request("POST", "127.0.0.1", "/v1/messages", json.dumps(body).encode(), {})
    assert r is not None
    usage = {"usage": {"input_tokens": prompt - cached, "cache_read_input_tokens": cached}}
    return a.response(r.record, 200, {}, json.dumps(usage).encode())


def side(session: samples.Session) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 512, "metadata": session.request(1)["metadata"],
            "system": [{"type": "text", "text": "Generate a title for this conversation."}],
            "messages": [{"role": "user", "content": "Fix the parser"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("between", "expected"),
    [("nothing", "not-kept"), ("side", "side-interleaved"), ("other", "evicted")],
)
def test_a_server_side_miss_is_classed_by_what_ran_in_between(between: str, expected: str) -> None:
    a = Analyzer(pipeline.Settings())
    run(a, A.request(1), 0)
    if between == "side":
        run(a, side(A), 0, 40)
    elif between == "other":
        run(a, B.request(1), 10)
    rec = run(a, A.request(2), 5)  # append-only, yet the server reused 5 of 9,000 tokens
    assert (rec["verdict"], rec["miss"], rec["server_miss_class"]) == ("append-only", "server", expected)
    line = records.log_line(rec)
    assert records.SERVER_MISS_WORDS[expected] in line


def test_no_class_without_a_server_side_miss() -> None:
    a = Analyzer(pipeline.Settings())
    run(a, A.request(1), 0)
    run(a, B.request(1), 10)
    rec = run(a, A.request(2), 8900)  # the server kept it (more than one slot)
    assert rec["miss"] is None and rec["server_miss_class"] is None and rec["interleaved_other"] is True


def test_remedies_name_the_real_settings() -> None:
    text = " ".join(SERVER_MISS_REMEDY.values())
    for setting in (
        "--parallel",
        "-np",
        "--cache-ram",
        "OLLAMA_NUM_PARALLEL",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    ):
        assert setting in text
    assert "ANTHROPIC_DEFAULT_HAIKU_MODEL" in SERVER_MISS_REMEDY["side-interleaved"]
    assert "--cache-ram" in SERVER_MISS_REMEDY["evicted"]
