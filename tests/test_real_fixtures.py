"""Recorded traffic of the real Claude Code CLI 2.1.332 (tests/fixtures/real/, see its README.md).

The expected bytes are derived with json alone: the CLI writes compact JSON (JSON.stringify), so the body
without its billing block is json.dumps of the parsed body with ``system[0]`` deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io

from stableprefix.core import pipeline
from stableprefix.report import readers
from tests.support.helpers import FIXTURES

REAL = FIXTURES / "real"
TWO_CONVERSATIONS = REAL / "cc_2_1_332_two_conversations.mitm"
SUBAGENT = REAL / "cc_2_1_332_subagent.mitm"


def flows(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def posts(path: Path) -> list[http.HTTPFlow]:
    return [fl for fl in flows(path) if fl.request.method == "POST"]


def compact(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sse_usage(data: bytes) -> dict[str, Any]:
    """The usage of the `message_start` event of an Anthropic SSE answer."""
    for line in data.decode().splitlines():
        if line.startswith("data: ") and '"message_start"' in line:
            usage: dict[str, Any] = json.loads(line[6:])["message"]["usage"]
            return usage
    raise AssertionError("no message_start event")


@pytest.mark.parametrize("path", [TWO_CONVERSATIONS, SUBAGENT], ids=lambda p: p.stem)
def test_pipeline_cuts_the_real_header_byte_exactly(path: Path) -> None:
    recorded = posts(path)
    assert len(recorded) == 3
    for fl in recorded:
        raw = fl.request.get_content(strict=True) or b""
        body = json.loads(raw)
        assert compact(body) == raw  # what makes the derivation below independent of jsonedit
        header = body["system"][0]["text"]
        assert header.startswith("x-anthropic-billing-header: cc_version=2.1.332.") and "cch=" not in header
        del body["system"][0]
        result = pipeline.process(
            "POST", fl.request.host, fl.request.path, raw, pipeline.Settings(), fl.request.headers
        )
        assert result is not None and result.forward == compact(body)
        assert result.record["changed"] == {"billing": 1}
        assert result.record["billing"]["cc_entrypoint"] == "sdk-cli"
        assert result.record["billing"]["cch"] is False


def test_report_reads_the_recorded_conversations() -> None:
    report = readers.read([TWO_CONVERSATIONS])
    turns = list(report.turns())
    assert [(t.cls, t.verdict) for t in turns] == [
        ("main", "first"),
        ("main", "append-only"),
        ("main", "first"),
    ]
    assert all(t.rec["would_change"] == {"billing": 1} and t.rec["rewritten"] is False for t in turns)
    # the server figures are those the recorded answers carried
    by_id = {fl.id: sse_usage(fl.response.content or b"") for fl in posts(TWO_CONVERSATIONS) if fl.response}
    for t in turns:
        usage = by_id[t.rec["id"]]
        assert t.rec["cached_tokens"] == usage["cache_read_input_tokens"]
        assert t.rec["prompt_tokens"] == usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert not report.problems


def test_report_classes_the_recorded_subagent_flow() -> None:
    report = readers.read([SUBAGENT])
    turns = sorted(report.turns(), key=lambda t: t.rec["ts"])
    assert [(t.cls, t.verdict) for t in turns] == [
        ("main", "first"),
        ("subagent", "first"),
        ("main", "append-only"),
    ]
    sub = json.loads(posts(SUBAGENT)[1].request.content or b"")
    assert sub["system"][0]["text"].endswith("; cc_entrypoint=sdk-cli; cc_is_subagent=true;")


def test_pipeline_on_the_tuis_requests_cuts_turns_and_leaves_counts_byte_identical() -> None:
    """The TUI recording (cc_2_1_332_context.mitm): its turns and side requests lose exactly the billing
    block (entrypoint ``cli``), its count_tokens requests go on as they came (they carry none)."""
    recorded = posts(REAL / "cc_2_1_332_context.mitm")
    for fl in recorded:
        raw = fl.request.get_content(strict=True) or b""
        body = json.loads(raw)
        assert compact(body) == raw
        result = pipeline.process(
            "POST", fl.request.host, fl.request.path, raw, pipeline.Settings(), fl.request.headers
        )
        assert result is not None
        if fl.request.path.startswith("/v1/messages/count_tokens"):
            assert "system" not in body and result.forward is None and result.record["changed"] == {}
            continue
        assert body["system"][0]["text"].startswith("x-anthropic-billing-header: cc_version=2.1.332.")
        del body["system"][0]
        assert result.forward == compact(body) and result.record["changed"] == {"billing": 1}
        assert result.record["billing"]["cc_entrypoint"] == "cli"
    assert len(recorded) == 30  # 4 turns and side requests, 26 counts
