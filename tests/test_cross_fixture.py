"""Recorded traffic of the real Claude Code CLI 2.1.332 to a real llama-server (tests/fixtures/cross/README.md):
the second conversation's first request is explained, and the savings agree both ways (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy import io as mio

from stableprefix.core import pipeline
from stableprefix.core.analyzer import Analyzer
from stableprefix.report import jsondoc
from stableprefix.report import readers

CROSS = Path(__file__).parent / "fixtures" / "cross"
OBSERVE = CROSS / "cc_2_1_332_two_conversations_observe.mitm"
ACTIVE = CROSS / "cc_2_1_332_two_conversations_active.mitm"


def posts(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [
            fl
            for fl in mio.FlowReader(f).stream()
            if isinstance(fl, http.HTTPFlow) and fl.request.method == "POST"
        ]


def test_observe_mode_names_billing_for_the_second_conversation_with_the_servers_figures() -> None:
    turns = list(readers.read([OBSERVE], progress=False).turns())
    assert [(t.verdict, t.cause) for t in turns] == [
        ("first", None),
        ("append-only", None),
        ("first", "billing"),
    ]
    second = turns[2]
    saved = posts(OBSERVE)[2].metadata["stableprefix"]  # what the addon logged live
    assert (second.server_cached, second.server_prompt) == (saved["cached_tokens"], saved["prompt_tokens"])
    assert second.rec["evidence_from"] == "flow-metadata"  # the streamed body is not in the file
    header = json.loads(posts(OBSERVE)[2].request.content or b"")["system"][0]["text"]
    first_header = json.loads(posts(OBSERVE)[0].request.content or b"")["system"][0]["text"]
    at = next(i for i, (a, b) in enumerate(zip(header, first_header, strict=False)) if a != b)
    assert second.rec["diverged_at"] == f"system[0]@{at}"
    assert header[:at].startswith("x-anthropic-billing-header: cc_version=2.1.332.")
    lost, est = second.lost()
    assert lost is not None and lost > 0 and est  # scaled from the server's tokens per character
    assert second.server_prompt is not None and second.server_cached is not None
    assert lost <= second.server_prompt - second.server_cached


def test_the_same_requests_replayed_both_ways_give_the_same_saving() -> None:
    def replay(observe: bool) -> list[dict[str, Any]]:
        a = Analyzer(pipeline.Settings(observe=observe))
        out = []
        for fl in posts(OBSERVE):
            req = fl.request
            r = a.request(req.method, req.host, req.path, req.get_content() or b"", req.headers)
            assert r is not None and not r.warning
            out.append(r.record)
        return out

    observed, active = replay(True), replay(False)
    assert [r["saved_chars"] for r in observed] == [r["saved_chars"] for r in active]
    assert sum(r["saved_chars"] for r in active) > 0


def test_the_two_recordings_agree_within_ten_percent() -> None:
    would = jsondoc.document(readers.read([OBSERVE], progress=False))["totals"]["rules"]["would_save"][
        "tokens"
    ]
    saved = jsondoc.document(readers.read([ACTIVE], progress=False))["totals"]["rules"]["saved"]["tokens"]
    assert saved > 0 and abs(saved - would) <= 0.1 * saved, (saved, would)
